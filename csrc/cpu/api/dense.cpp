// Dense int8 entry points: per-token quantization, the exact int8 matmul and the int8 linears (dynamic,
// static, weight-only). Each
// reads the kernel table once and runs the whole call on it.
#include <algorithm>
#include <string>

#include "cpu/api/internal.h"
#include "cpu/engine.h"
#include "cpu/runtime/threads.h"

namespace fastinfer::cpu {

using namespace detail;

namespace {

void run_gemm(const KernelTable& kt, const Activations& a, const PackedW& w, const Epilogue& ep) {
    const int64_t nblocks = w.np / kNBlock;
    const WorkSplit s = work_split(a.m, nblocks);
    parallel_for(s.ngroups * s.nmchunks, [&](int64_t t) {
        const int64_t m0 = s.m0(t), nb0 = s.nb0(t);
        kt.gemm(a, w, ep, m0, std::min(a.m, m0 + s.mchunk), nb0, std::min(nblocks, nb0 + s.group));
    });
}

// Checks shared by every GEMM entry: sizes, the packed weight's header, K and the output stride.
Status check_gemm(const char* name, int64_t m, int64_t k, int64_t ldx, const uint8_t* packed,
                  int64_t nbytes, int64_t ldo, PackedW* w) {
    Status st = check_dims(m, k, ldx, name);
    if (!st.is_ok()) return st;
    if (!(st = view_packed(packed, nbytes, w)).is_ok()) return st;
    if (w->k != k) return Status::invalid(std::string(name) + ": K of the input and the weight differ");
    if (m > 0 && ldo < w->n) return Status::invalid(std::string(name) + ": out row stride smaller than N");
    return Status::ok();
}

}  // namespace

Status quantize_per_token(const void* x, DType dt, int64_t m, int64_t k, int64_t ldx, int8_t* q,
                          int64_t ldq, float* scale) {
    Status st = check_dims(m, k, ldx, "quantize_per_token");
    if (!st.is_ok()) return st;
    if (dt != DType::kF32 && dt != DType::kBF16)
        return Status::invalid("quantize_per_token: x must be float32 or bfloat16");
    if (m > 0 && ldq < k) return Status::invalid("quantize_per_token: q row stride smaller than K");
    const KernelTable& kt = active_kernels();
    const int64_t rows = std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1));
    parallel_for((m + rows - 1) / rows, [&](int64_t t) {
        kt.quantize_rows(x, dt, ldx, t * rows, std::min(m, (t + 1) * rows), k, q, ldq, k, scale, false);
    });
    return Status::ok();
}

Status int8_matmul(const int8_t* a, int64_t m, int64_t k, int64_t lda, const uint8_t* packed,
                   int64_t packed_nbytes_, int32_t* out, int64_t ldo) {
    PackedW w;
    Status st = check_gemm("int8_matmul", m, k, lda, packed, packed_nbytes_, ldo, &w);
    if (!st.is_ok() || m == 0 || w.n == 0) return st;
    const KernelTable& kt = active_kernels();
    int8_t* q;
    float* sa;
    if (!(st = prepare_activations(m, w.kp, &q, &sa)).is_ok()) return st;
    copy_activations(a, m, k, lda, q, w.kp, kt.shift_u8);
    const Epilogue ep{DType::kI32, out, ldo, nullptr, nullptr, nullptr};
    run_gemm(kt, Activations{q, m, w.kp}, w, ep);
    return Status::ok();
}

namespace {

// int8_linear and static_int8_linear: xs null quantizes per token, else with the one scale *xs.
Status linear_int8(const char* name, const void* x, DType dt, int64_t m, int64_t k, int64_t ldx,
                   const uint8_t* packed, int64_t packed_nbytes_, const float* sw, const float* bias, void* out,
                   DType out_dt, int64_t ldo, int act, const float* xs, const void* residual) {
    if (Status io = check_linear_io(name, dt, out_dt, act); !io.is_ok()) return io;
    float s = 0.f, inv = 0.f;
    if (xs) {
        s = *xs;
        inv = 1.f / s;
        if (!(s > 0.f) || !(s < __builtin_inff()) || !(inv < __builtin_inff()))
            return Status::invalid(std::string(name) + ": the input scale must be finite and > 0, with 1 / scale finite");
    }
    PackedW w;
    Status st = check_gemm(name, m, k, ldx, packed, packed_nbytes_, ldo, &w);
    if (!st.is_ok() || m == 0 || w.n == 0) return st;
    const KernelTable& kt = active_kernels();
    int8_t* q;
    float* sa;
    if (!(st = prepare_activations(m, w.kp, &q, &sa)).is_ok()) return st;
    if (xs) {
        const int64_t rows = std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1));
        parallel_for((m + rows - 1) / rows, [&](int64_t t) {
            kt.quantize_static(x, dt, ldx, t * rows, std::min(m, (t + 1) * rows), k, inv, s, q, w.kp, w.kp, sa,
                               kt.shift_u8);
        });
    } else {
        quantize_activations(kt, x, dt, m, k, ldx, q, w.kp, sa, kt.shift_u8);
    }
    const bool stream = size_t(m) * size_t(ldo) * (out_dt == DType::kF32 ? 4 : 2) >= kStreamBytes;
    const Epilogue ep{out_dt, out, ldo, sa, sw, bias, act, nullptr, nullptr, stream, residual};
    run_gemm(kt, Activations{q, m, w.kp}, w, ep);
    return Status::ok();
}

}  // namespace

Status int8_linear(const void* x, DType dt, int64_t m, int64_t k, int64_t ldx, const uint8_t* packed,
                   int64_t packed_nbytes_, const float* sw, const float* bias, void* out, DType out_dt, int64_t ldo,
                   int act, const void* residual) {
    return linear_int8("int8_linear", x, dt, m, k, ldx, packed, packed_nbytes_, sw, bias, out, out_dt, ldo, act,
                       nullptr, residual);
}

Status static_int8_linear(const void* x, DType dt, int64_t m, int64_t k, int64_t ldx, const uint8_t* packed,
                          int64_t packed_nbytes_, const float* sw, const float* bias, void* out, DType out_dt,
                          int64_t ldo, int act, const float* x_scale, const void* residual) {
    if (!x_scale) return Status::invalid("static_int8_linear: no input scale");
    return linear_int8("static_int8_linear", x, dt, m, k, ldx, packed, packed_nbytes_, sw, bias, out, out_dt, ldo,
                       act, x_scale, residual);
}

Status weight_only_linear(const void* x, DType dt, int64_t m, int64_t k, int64_t ldx, const uint8_t* packed,
                          int64_t packed_nbytes_, const float* sw, const float* bias, void* out, DType out_dt,
                          int64_t ldo, int act) {
    if (Status io = check_linear_io("weight_only_linear", dt, out_dt, act); !io.is_ok()) return io;
    PackedW w;
    Status st = check_gemm("weight_only_linear", m, k, ldx, packed, packed_nbytes_, ldo, &w);
    if (!st.is_ok() || m == 0 || w.n == 0) return st;
    const KernelTable& kt = active_kernels();
    const float* xf = static_cast<const float*>(x);
    int64_t ld = ldx;
    if (dt == DType::kBF16) {  // widened once (exact), so the kernels read fp32 rows
        if (k > 0 && m > (int64_t(1) << 60) / k) return Status::invalid("weight_only_linear: input too large");
        float* buf = reinterpret_cast<float*>(t_scratch.get(size_t(m) * size_t(k) * sizeof(float)));
        if (!buf) return Status::runtime("weight_only_linear: out of memory for the widened input");
        const uint16_t* xb = static_cast<const uint16_t*>(x);
        parallel_for(m, [&](int64_t r) {
            for (int64_t i = 0; i < k; ++i) buf[r * k + i] = bf16_to_f32(xb[r * ldx + i]);
        });
        xf = buf;
        ld = k;
    }
    const Epilogue ep{out_dt, out, ldo, nullptr, sw, bias, act};
    const int64_t nblocks = w.np / kNBlock;
    const WorkSplit s = work_split(m, nblocks, 24);
    parallel_for(s.ngroups * s.nmchunks, [&](int64_t t) {
        const int64_t m0 = s.m0(t), nb0 = s.nb0(t);
        kt.wo_gemm(xf, ld, w, ep, m0, std::min(m, m0 + s.mchunk), nb0, std::min(nblocks, nb0 + s.group));
    });
    return Status::ok();
}

}  // namespace fastinfer::cpu
