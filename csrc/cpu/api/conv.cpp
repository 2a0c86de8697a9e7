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

Status int8_conv2d(const void* x, DType dt, const Conv2dShape& s, const uint8_t* weight, int64_t weight_nbytes,
                   const float* sw, const float* bias, void* out, DType out_dt, int act) {
    if (dt != DType::kF32 && dt != DType::kBF16) return invalid("x must be float32 or bfloat16");
    if (out_dt != DType::kF32 && out_dt != DType::kBF16) return invalid("out must be float32 or bfloat16");
    if (!valid_act(act)) return invalid("unknown activation code " + std::to_string(act));
    int64_t in_elems = 0, m = 0;
    Status st = check_shape(s, &in_elems, &m);
    if (!st.is_ok()) return st;
    const bool dw = conv2d_is_depthwise(s);
    const int64_t cg = s.c / s.groups, coutg = s.cout / s.groups, taps = s.kh * s.kw, kg = taps * cg;
    // the weight: depthwise int8 [taps][c]; else one K4N16 buffer per group, [coutg, (ky, kx, c)]
    std::vector<PackedW> blobs;
    if (dw) {
        if (weight_nbytes != taps * s.c) return invalid("depthwise weight must hold kh * kw * channels bytes");
    } else {
        int64_t blob;
        if (!checked_packed_nbytes(coutg, kg, &blob) || blob > kMaxDim || weight_nbytes != blob * s.groups)
            return invalid("weight must hold one packed [out/groups, kh*kw*in/groups] int8 weight per group");
        blobs.resize(size_t(s.groups));
        for (int64_t g = 0; g < s.groups; ++g) {
            if (!(st = view_packed(weight + g * blob, blob, &blobs[size_t(g)])).is_ok()) return invalid(st.message);
            if (blobs[size_t(g)].n != coutg || blobs[size_t(g)].k != kg)
                return invalid("packed weight of group " + std::to_string(g) + " has another shape");
        }
    }
    if (m == 0 || s.cout == 0) return Status::ok();
    const size_t out_elt = out_dt == DType::kF32 ? 4 : 2;
    if (in_elems == 0 || kg == 0) {  // no input channels or an empty image: act(bias) everywhere
        for (int64_t p = 0; p < m; ++p)
            for (int64_t c = 0; c < s.cout; ++c) {
                const float y = act_f32(bias ? bias[c] : 0.f, act);
                if (out_dt == DType::kF32)
                    static_cast<float*>(out)[p * s.cout + c] = y;
                else
                    static_cast<uint16_t*>(out)[p * s.cout + c] = f32_to_bf16(y);
            }
        return Status::ok();
    }
    const KernelTable& kt = active_kernels();
    const int64_t sample = s.h * s.w * s.c, pix = s.oh * s.ow;

    // 1. the range of each sample, in chunks over the threads
    const int64_t chunk = 1 << 16, per = (sample + chunk - 1) / chunk;
    std::vector<ValueRange> parts(size_t(s.n * per));
    parallel_for(s.n * per, [&](int64_t t) {
        const int64_t i = t / per, j = t % per, off = i * sample + j * chunk;
        const size_t elt = dt == DType::kF32 ? 4 : 2;
        parts[size_t(t)] = kt.range(static_cast<const uint8_t*>(x) + size_t(off) * elt, dt,
                                    std::min(chunk, sample - j * chunk));
    });
    bool u8 = true;
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
        if (!r.finite)
            sq[size_t(i)] = {__builtin_nanf(""), 0.f};  // NaN rows out; q = 0
        else if (r.amax == 0.f || !(inv < __builtin_inff()))
            sq[size_t(i)] = {0.f, 0.f};
        else
            sq[size_t(i)] = {r.amax / float(qmax), inv};
    }

    // 2. the quantized input (int8, or uint8 as q - 128 in the GEMM's representation) and the
    // per-pixel scales
    const bool pointwise = !dw && s.groups == 1 && s.kh == 1 && s.kw == 1 && s.sh == 1 && s.sw == 1 &&
                           s.ph == 0 && s.pw == 0 && s.oh == s.h && s.ow == s.w;
    // the byte of value v: depthwise reads plain int8/uint8; the GEMM reads (v or v - 128) ^ 0x80
    // on shifted tables (stored as uint8 v + 128, or v for u8), plain int8 (v or v - 128) otherwise
    const uint8_t flip = dw ? 0 : uint8_t((u8 ? 0x80 : 0) ^ (kt.shift_u8 ? 0x80 : 0));
    const int lo = u8 ? 0 : -127;
    const int64_t kp0 = pointwise ? blobs[0].kp : s.c;  // row stride of the quantized pixels
    int64_t qbytes;
    if (!mul_ok(s.n * s.h * s.w, kp0, &qbytes)) return invalid("input too large");
    const int64_t w32_elems = dw ? taps * round_up(s.c, 16) : 0;
    uint8_t* base = t_scratch.get(size_t(round_up(qbytes, 64) + m * 4 + w32_elems * 4 + 64));
    if (!base) return Status::runtime("int8_conv2d: out of memory for the quantized input");
    uint8_t* xq = base;
    float* sa = reinterpret_cast<float*>(base + round_up(qbytes, 64));
    int32_t* w32 = reinterpret_cast<int32_t*>(base + round_up(qbytes, 64) + round_up(m * 4, 64));
    const int64_t rows_per = std::max<int64_t>(1, chunk / std::max<int64_t>(s.c, 1));
    const int64_t hw = s.h * s.w, row_tasks = (hw + rows_per - 1) / rows_per;
    parallel_for(s.n * row_tasks, [&](int64_t t) {
        const int64_t i = t / row_tasks, r0 = t % row_tasks * rows_per, r1 = std::min(hw, r0 + rows_per);
        const size_t elt = dt == DType::kF32 ? 4 : 2;
        const uint8_t* src = static_cast<const uint8_t*>(x) + size_t(i * sample + r0 * s.c) * elt;
        kt.quantize_scaled(src, dt, r1 - r0, s.c, s.c, sq[size_t(i)].inv, lo, qmax, flip,
                           xq + (i * hw + r0) * kp0, kp0, kp0);
    });
    for (int64_t p = 0; p < m; ++p) sa[p] = sq[size_t(p / pix)].scale;

    // 3. the convolution
    if (dw) {
        const int64_t cp = round_up(s.c, 16);
        const int8_t* wt = reinterpret_cast<const int8_t*>(weight);
        for (int64_t t = 0; t < taps; ++t)
            for (int64_t c = 0; c < cp; ++c) w32[t * cp + c] = c < s.c ? int32_t(wt[t * s.c + c]) : 0;
        const DepthwiseArgs a{xq, u8, s.h, s.w, s.c, s.oh, s.ow, s.kh, s.kw, s.sh, s.sw, s.ph, s.pw, s.dh, s.dw,
                              w32, cp, Epilogue{out_dt, out, s.cout, sa, sw, bias, act}};
        const int64_t rows = s.n * s.oh, per_task = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, s.ow * cp / 16));
        parallel_for((rows + per_task - 1) / per_task, [&](int64_t t) {
            kt.depthwise(a, t * per_task, std::min(rows, (t + 1) * per_task));
        });
        return Status::ok();
    }
    auto epilogue = [&](int64_t g, int64_t m0) {
        const PackedW& w = blobs[size_t(g)];
        return Epilogue{out_dt, static_cast<uint8_t*>(out) + size_t(m0 * s.cout + g * coutg) * out_elt, s.cout,
                        sa + m0, sw + g * coutg, bias ? bias + g * coutg : nullptr, act, u8 ? w.colsum : nullptr};
    };
    const int64_t nblocks = blobs[0].np / kNBlock;
    if (pointwise) {
        const WorkSplit ws = work_split(m, nblocks);
        const Epilogue ep = epilogue(0, 0);
        parallel_for(ws.ngroups * ws.nmchunks, [&](int64_t t) {
            const int64_t m0 = ws.m0(t), nb0 = ws.nb0(t);
            kt.gemm(Activations{reinterpret_cast<const int8_t*>(xq), m, kp0}, blobs[0], ep, m0,
                    std::min(m, m0 + ws.mchunk), nb0, std::min(nblocks, nb0 + ws.group));
        });
        return Status::ok();
    }
    // general: tasks of (group, pixel chunk, channel-block group); each gathers its tile
    const int64_t kp = blobs[0].kp;
    const int64_t mt = std::clamp<int64_t>((393216 / kp) / 6 * 6, 6, 96);
    const int64_t mchunks = (m + mt - 1) / mt;
    // enough tasks for every thread even on a small image: split the channels too
    int64_t ngroups = 1;
    while (ngroups < nblocks && s.groups * mchunks * ngroups < 4 * int64_t(num_threads())) ngroups *= 2;
    ngroups = std::min(ngroups, nblocks);
    const int64_t per_group = (nblocks + ngroups - 1) / ngroups;
    ngroups = (nblocks + per_group - 1) / per_group;
    const uint8_t zero = flip;  // the quantized zero: padding taps
    bool oom = false;
    parallel_for(s.groups * mchunks * ngroups, [&](int64_t t) {
        const int64_t g = t / (mchunks * ngroups), rem = t % (mchunks * ngroups);
        const int64_t m0 = rem / ngroups * mt, m1 = std::min(m, m0 + mt), nb0 = rem % ngroups * per_group;
        uint8_t* tile = t_tile.get(size_t(mt * kp));
        if (!tile) {
            oom = true;
            return;
        }
        for (int64_t p = m0; p < m1; ++p) {
            const int64_t img = p / pix, oy = p % pix / s.ow, ox = p % s.ow;
            uint8_t* row = tile + (p - m0) * kp;
            for (int64_t ky = 0; ky < s.kh; ++ky) {
                const int64_t iy = oy * s.sh - s.ph + ky * s.dh;
                for (int64_t kx = 0; kx < s.kw; ++kx) {
                    const int64_t ix = ox * s.sw - s.pw + kx * s.dw;
                    uint8_t* dst = row + (ky * s.kw + kx) * cg;
                    if (iy < 0 || iy >= s.h || ix < 0 || ix >= s.w)
                        std::memset(dst, zero, size_t(cg));
                    else
                        std::memcpy(dst, xq + ((img * s.h + iy) * s.w + ix) * s.c + g * cg, size_t(cg));
                }
            }
            std::memset(row + kg, zero, size_t(kp - kg));
        }
        kt.gemm(Activations{reinterpret_cast<const int8_t*>(tile), m1 - m0, kp}, blobs[size_t(g)], epilogue(g, m0),
                0, m1 - m0, nb0, std::min(nblocks, nb0 + per_group));
    });
    if (oom) return Status::runtime("int8_conv2d: out of memory for an im2col tile");
    return Status::ok();
}

}  // namespace fastinfer::cpu
