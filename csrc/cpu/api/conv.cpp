// The CPU convolution entry points (FBGEMM's ConvFastPath idea: the path is chosen next to the
// kernels). Input and output are NHWC.
//
// int8_conv2d, all exact in the integer part:
//   general (any kernel, stride, padding, dilation, groups; 1x1 included): implicit GEMM. Each task
//     takes a chunk of output pixels and gathers their im2col rows (taps x channels of one group)
//     straight from the float input into a thread-local int8 tile (at most ~384 KiB: never the
//     whole im2col matrix), quantizing each row with its own scale, which is exact because a row
//     is one GEMM row: the input is read once, no quantized copy of it is written. A row whose
//     values are all >= 0 (after a ReLU) is uint8 with max / 255 (one more bit).
//   depthwise (groups = channels = output channels): the k x k sums mix pixels of one channel, so
//     the scale is per sample (int8 max|x| / 127, or uint8 max / 255 when the whole input is >= 0,
//     as after a ReLU: one more bit); its own kernel over the quantized image.
// depthwise_conv2d_f32: the depthwise convolution in fp32 (fma over the taps in order), for the
//   layers where int8 has nothing to gain: memory-bound, and quantizing costs an extra pass.
// int8_conv2d: the CPU convolution entry point (FBGEMM's ConvFastPath idea: the path is chosen next
// to the kernels). Input and output are NHWC. Each sample is quantized with one scale (the rows of
// a k x k conv GEMM mix pixels, so a per-row scale would not factor out of the sums): int8 with
// max|x| / 127, or uint8 with max / 255 when every value of the call is >= 0 (after ReLU: one more
// bit). Then one of three paths, all exact in the integer part:
//   depthwise (groups = channels = output channels): its own kernel over the quantized image;
//   pointwise (1x1, stride 1, no padding, one group): the GEMM straight on the quantized rows;
//   general: implicit GEMM, each task gathering the (tap, channel) rows of its pixels into a
//   thread-local tile (at most ~384 KiB: never the whole im2col matrix) and running the GEMM on it.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "cpu/api/internal.h"
#include "cpu/engine.h"
#include "cpu/runtime/threads.h"

namespace fastinfer::cpu {

using namespace detail;

namespace {

thread_local Scratch t_tile;  // a worker's im2col tile

Status invalid(const std::string& msg) { return Status::invalid("int8_conv2d: " + msg); }

bool mul_ok(int64_t a, int64_t b, int64_t* r) { return !__builtin_mul_overflow(a, b, r) && *r <= kMaxDim; }

Status check_shape(const Conv2dShape& s, int64_t* in_elems, int64_t* m) {
    const int64_t v[] = {s.n, s.h, s.w, s.c, s.cout, s.kh, s.kw, s.sh, s.sw, s.ph, s.pw, s.dh, s.dw, s.groups, s.oh, s.ow};
    for (int64_t x : v)
        if (x < 0 || x > kMaxDim) return invalid("sizes must be in [0, 2^40]");
    if (s.kh < 1 || s.kw < 1 || s.sh < 1 || s.sw < 1 || s.dh < 1 || s.dw < 1 || s.groups < 1)
        return invalid("kernel size, stride, dilation and groups must be >= 1");
    if (s.c % s.groups || s.cout % s.groups) return invalid("groups must divide the input and output channels");
    int64_t t;
    if (!mul_ok(s.n, s.h, &t) || !mul_ok(t, s.w, &t) || !mul_ok(t, s.c, in_elems))
        return invalid("input too large");
    if (!mul_ok(s.n, s.oh, &t) || !mul_ok(t, s.ow, m) || !mul_ok(*m, s.cout, &t)) return invalid("output too large");
    if (!mul_ok(s.kh, s.kw, &t) || !mul_ok(t, s.c, &t)) return invalid("kernel too large");
    if (!mul_ok(s.oh, s.sh, &t) || !mul_ok(s.kh, s.dh, &t) || !mul_ok(s.ow, s.sw, &t) || !mul_ok(s.kw, s.dw, &t))
        return invalid("stride or dilation too large");
    return Status::ok();
}

// Scale and quantization range of one sample; u8: the whole call is non-negative.
struct SampleQuant {
    float scale, inv;
};

}  // namespace

bool conv2d_is_depthwise(const Conv2dShape& s) { return s.groups > 1 && s.groups == s.c && s.cout == s.c; }

namespace {

ConvGeom geometry(const void* x, DType dt, const Conv2dShape& s) {
    return ConvGeom{x, dt, s.h, s.w, s.c, s.oh, s.ow, s.kh, s.kw, s.sh, s.sw, s.ph, s.pw, s.dh, s.dw};
}

// out = act(bias + residual) (or act(0 + ...)) at every pixel: an empty image or no input channels.
void fill_bias(const Conv2dShape& s, int64_t m, const float* bias, void* out, DType out_dt, int act,
               const void* residual = nullptr) {
    const Epilogue ep{out_dt, out, s.cout, nullptr, nullptr, nullptr, kActNone, nullptr, nullptr, false, residual};
    for (int64_t p = 0; p < m; ++p)
        for (int64_t c = 0; c < s.cout; ++c) {
            const float y = (bias ? bias[c] : 0.f) + (residual ? residual_at(ep, p * s.cout + c) : 0.f);
            store_as(out_dt, out, p * s.cout + c, act_f32(y, act));
        }
}

// x: fp32, bf16 or kU8 (a ReLU6 output handed on); out the same, kU8 only after ReLU6 (its range).
Status check_io(DType dt, DType out_dt, int act) {
    if (dt != DType::kF32 && dt != DType::kBF16 && dt != DType::kU8) return invalid("x must be float32, bfloat16 or uint8");
    if (out_dt != DType::kF32 && out_dt != DType::kBF16 && out_dt != DType::kU8)
        return invalid("out must be float32, bfloat16 or uint8");
    if (!valid_act(act)) return invalid("unknown activation code " + std::to_string(act));
    if (out_dt == DType::kU8 && act != kActRelu6) return invalid("a uint8 output needs the relu6 activation (its range)");
    return Status::ok();
}

// The int8 depthwise path: per-sample quantization, then the table's depthwise kernel.
Status depthwise_int8(const KernelTable& kt, const void* x, DType dt, const Conv2dShape& s, int64_t m,
                      const int8_t* wt, const float* sw, const float* bias, void* out, DType out_dt, int act) {
    const int64_t sample = s.h * s.w * s.c, pix = s.oh * s.ow, taps = s.kh * s.kw;
    const size_t elt = dtype_bytes(dt);
    // 1. the range of each sample, in chunks over the threads
    const int64_t chunk = 1 << 16, per = (sample + chunk - 1) / chunk;
    std::vector<ValueRange> parts(size_t(s.n * per));
    parallel_for(s.n * per, [&](int64_t t) {
        const int64_t i = t / per, j = t % per, off = i * sample + j * chunk;
        parts[size_t(t)] = kt.range(static_cast<const uint8_t*>(x) + size_t(off) * elt, dt,
                                    std::min(chunk, sample - j * chunk));
    });
    bool u8 = true;  // a kU8 input: every finite range is nonneg
    std::vector<ValueRange> ranges(size_t(s.n));
    for (int64_t i = 0; i < s.n; ++i) {
        ValueRange& r = ranges[size_t(i)];
        for (int64_t j = 0; j < per; ++j) {
            const ValueRange& p = parts[size_t(i * per + j)];
            r.amax = std::max(r.amax, p.amax);
            r.finite = r.finite && p.finite;
            r.nonneg = r.nonneg && p.nonneg;
        }
        if (r.finite && !r.nonneg) u8 = false;
    }
    const int qmax = u8 ? 255 : 127;
    std::vector<SampleQuant> sq(size_t(s.n));
    for (int64_t i = 0; i < s.n; ++i) {
        const ValueRange& r = ranges[size_t(i)];
        const float inv = float(qmax) / r.amax;
        if (dt == DType::kU8)  // quantized already: its bytes, scale kU8Scale (NaN: a NaN byte)
            sq[size_t(i)] = {r.finite ? kU8Scale : __builtin_nanf(""), 0.f};
        else if (!r.finite)
            sq[size_t(i)] = {__builtin_nanf(""), 0.f};  // NaN outputs; q = 0
        else if (r.amax == 0.f || !(inv < __builtin_inff()))
            sq[size_t(i)] = {0.f, 0.f};
        else
            sq[size_t(i)] = {r.amax / float(qmax), inv};
    }
    // 2. the quantized input (plain int8 / uint8), the per-pixel scales, the widened weights
    const int64_t cp = round_up(s.c, 16), qbytes = dt == DType::kU8 ? 0 : s.n * sample;
    uint8_t* base = t_scratch.get(size_t(round_up(qbytes, 64) + round_up(m * 4, 64) + taps * cp * 4 + 64));
    if (!base) return Status::runtime("int8_conv2d: out of memory for the quantized input");
    const uint8_t* xq = dt == DType::kU8 ? static_cast<const uint8_t*>(x) : base;
    float* sa = reinterpret_cast<float*>(base + round_up(qbytes, 64));
    int32_t* w32 = reinterpret_cast<int32_t*>(base + round_up(qbytes, 64) + round_up(m * 4, 64));
    const int64_t hw = s.h * s.w, rows_per = std::max<int64_t>(1, chunk / std::max<int64_t>(s.c, 1));
    const int64_t row_tasks = (hw + rows_per - 1) / rows_per;
    if (dt != DType::kU8) parallel_for(s.n * row_tasks, [&](int64_t t) {
        const int64_t i = t / row_tasks, r0 = t % row_tasks * rows_per, r1 = std::min(hw, r0 + rows_per);
        const uint8_t* src = static_cast<const uint8_t*>(x) + size_t(i * sample + r0 * s.c) * elt;
        kt.quantize_scaled(src, dt, r1 - r0, s.c, s.c, sq[size_t(i)].inv, u8 ? 0 : -127, qmax, 0,
                           base + (i * hw + r0) * s.c, s.c, s.c);
    });
    for (int64_t p = 0; p < m; ++p) sa[p] = sq[size_t(p / pix)].scale;
    for (int64_t t = 0; t < taps; ++t)
        for (int64_t c = 0; c < cp; ++c) w32[t * cp + c] = c < s.c ? int32_t(wt[t * s.c + c]) : 0;
    DepthwiseArgs a{geometry(x, dt, s), xq, u8, w32, nullptr, cp, Epilogue{out_dt, out, s.cout, sa, sw, bias, act}};
    const int64_t rows = s.n * s.oh, per_task = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, s.ow * cp / 16));
    parallel_for((rows + per_task - 1) / per_task, [&](int64_t t) {
        kt.depthwise(a, t * per_task, std::min(rows, (t + 1) * per_task));
    });
    return Status::ok();
}

}  // namespace

Status int8_conv2d(const void* x, DType dt, const Conv2dShape& s, const uint8_t* weight, int64_t weight_nbytes,
                   const float* sw, const float* bias, void* out, DType out_dt, int act, const void* residual) {
    Status st = check_io(dt, out_dt, act);
    if (!st.is_ok()) return st;
    int64_t in_elems = 0, m = 0;
    if (!(st = check_shape(s, &in_elems, &m)).is_ok()) return st;
    const bool dw = conv2d_is_depthwise(s);
    if (residual && (dw || (out_dt != DType::kF32 && out_dt != DType::kBF16)))
        return invalid("a residual is added by the GEMM paths only, into a float32 or bfloat16 output");
    const int64_t cg = s.c / s.groups, coutg = s.cout / s.groups, taps = s.kh * s.kw, kg = taps * cg;
    // the weight: depthwise int8 [taps][c]; else one K4N16 buffer per group, [coutg, (ky, kx, c)]
    std::vector<PackedW> blobs;
    if (dw) {
        if (weight_nbytes != taps * s.c) return invalid("depthwise weight must hold kh * kw * channels bytes");
    } else {
        int64_t blob, total;
        if (!checked_packed_nbytes(coutg, kg, &blob) || blob > kMaxDim || __builtin_mul_overflow(blob, s.groups, &total) ||
            weight_nbytes != total)
            return invalid("weight must hold one packed [out/groups, kh*kw*in/groups] int8 weight per group");
        blobs.resize(size_t(s.groups));
        for (int64_t g = 0; g < s.groups; ++g) {
            if (!(st = view_packed(weight + g * blob, blob, &blobs[size_t(g)])).is_ok()) return invalid(st.message);
            if (blobs[size_t(g)].n != coutg || blobs[size_t(g)].k != kg)
                return invalid("packed weight of group " + std::to_string(g) + " has another shape");
        }
    }
    if (m == 0 || s.cout == 0) return Status::ok();
    if (in_elems == 0 || kg == 0) {
        fill_bias(s, m, bias, out, out_dt, act, residual);
        return Status::ok();
    }
    const KernelTable& kt = active_kernels();
    if (dw) return depthwise_int8(kt, x, dt, s, m, reinterpret_cast<const int8_t*>(weight), sw, bias, out, out_dt, act);

    // tasks of (group, pixel chunk, channel-block group); each gathers and quantizes its rows
    const ConvGeom geom = geometry(x, dt, s);
    const size_t out_elt = dtype_bytes(out_dt);
    const int64_t kp = blobs[0].kp, nblocks = blobs[0].np / kNBlock;
    const int64_t mt = std::clamp<int64_t>((393216 / kp) / 6 * 6, 6, 96);
    const int64_t mchunks = (m + mt - 1) / mt;
    int64_t ngroups = 1;  // enough tasks for every thread on a small image: split the channels too
    while (ngroups < nblocks && s.groups * mchunks * ngroups < 4 * int64_t(num_threads())) ngroups *= 2;
    const int64_t per_group = (nblocks + std::min(ngroups, nblocks) - 1) / std::min(ngroups, nblocks);
    ngroups = (nblocks + per_group - 1) / per_group;
    const uint8_t flip = kt.shift_u8 ? 0x80 : 0;
    const bool stream = size_t(m) * size_t(s.cout) * out_elt >= kStreamBytes;
    std::atomic<bool> oom{false};
    parallel_for(s.groups * mchunks * ngroups, [&](int64_t t) {
        const int64_t g = t / (mchunks * ngroups), rem = t % (mchunks * ngroups);
        const int64_t m0 = rem / ngroups * mt, m1 = std::min(m, m0 + mt), nb0 = rem % ngroups * per_group;
        uint8_t* tile = t_tile.get(size_t(round_up(mt * kp, 64) + mt * 5 + 64));
        if (!tile) {
            oom = true;
            return;
        }
        float* sa = reinterpret_cast<float*>(tile + round_up(mt * kp, 64));
        uint8_t* u8 = reinterpret_cast<uint8_t*>(sa + mt);
        kt.gather_quantize(geom, cg, g, m0, m1, flip, tile, kp, sa, u8);
        const Epilogue ep{out_dt, static_cast<uint8_t*>(out) + size_t(m0 * s.cout + g * coutg) * out_elt, s.cout,
                          sa, sw + g * coutg, bias ? bias + g * coutg : nullptr, act, blobs[size_t(g)].colsum, u8,
                          stream,
                          residual ? static_cast<const uint8_t*>(residual) + size_t(m0 * s.cout + g * coutg) * out_elt
                                   : nullptr};
        kt.gemm(Activations{reinterpret_cast<const int8_t*>(tile), m1 - m0, kp, std::min(kp, round_up(kg, 8))}, blobs[size_t(g)], ep, 0, m1 - m0,
                nb0, std::min(nblocks, nb0 + per_group));
    });
    if (oom) return Status::runtime("int8_conv2d: out of memory for an im2col tile");
    return Status::ok();
}

Status depthwise_conv2d_f32(const void* x, DType dt, const Conv2dShape& s, const float* wf, int64_t w_elems,
                            const float* bias, void* out, DType out_dt, int act) {
    Status st = check_io(dt, out_dt, act);
    if (!st.is_ok()) return st;
    int64_t in_elems = 0, m = 0;
    if (!(st = check_shape(s, &in_elems, &m)).is_ok()) return st;
    if (!conv2d_is_depthwise(s)) return Status::invalid("depthwise_conv2d_f32: groups must equal in and out channels");
    const int64_t taps = s.kh * s.kw, cp = round_up(s.c, 16);
    if (w_elems != taps * cp) return Status::invalid("depthwise_conv2d_f32: weight must be fp32 [kh * kw][round_up(channels, 16)]");
    // finite weights: a tap outside the image then adds nothing however a kernel treats it (skipped,
    // or multiplied as a 0: the AVX-512 kernel's rows), so every ISA gives the same sums
    for (int64_t i = 0; i < w_elems; ++i)
        if (!(std::fabs(wf[i]) <= 3.4028234663852886e38f))
            return Status::invalid("depthwise_conv2d_f32: the weight holds NaN or Inf");
    if (m == 0) return Status::ok();
    if (in_elems == 0) {
        fill_bias(s, m, bias, out, out_dt, act);
        return Status::ok();
    }
    const KernelTable& kt = active_kernels();
    const bool stream = size_t(m) * size_t(s.c) * dtype_bytes(out_dt) >= kStreamBytes;
    std::vector<float> scaled;  // a kU8 input is read as float(q): its scale goes into the weight
    if (dt == DType::kU8) {
        scaled.resize(size_t(w_elems));
        for (int64_t i = 0; i < w_elems; ++i) scaled[size_t(i)] = wf[i] * kU8Scale;
        wf = scaled.data();
    }
    DepthwiseArgs a{geometry(x, dt, s), nullptr, false, nullptr, wf, cp,
                    Epilogue{out_dt, out, s.c, nullptr, nullptr, bias, act, nullptr, nullptr, stream}};
    const int64_t rows = s.n * s.oh, per_task = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, s.ow * cp / 16));
    parallel_for((rows + per_task - 1) / per_task, [&](int64_t t) {
        kt.depthwise_f32(a, t * per_task, std::min(rows, (t + 1) * per_task));
    });
    return Status::ok();
}

}  // namespace fastinfer::cpu
