// Torch-free entry points of the CUDA engine (fastinfer._C_cuda). Pointers are device pointers,
// `stream` is a cudaStream_t passed as void*. Every function returns nullptr on success or a
// message (static storage) that the pybind11 shim turns into a Python exception.
#pragma once

#include <cstdint>

namespace fastinfer::cuda {

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2, kI32 = 3 };

// Weight layout on the GPU ("RN128"): int8 rows [np][kp], np = N rounded up to 128, kp = K rounded
// up to 64, zero padded. Row-major W [N, K] is exactly the column-major B operand of
// mma.sync.m16n8k32.row.col, so tiles go from global memory to shared memory to ldmatrix unchanged.
constexpr int64_t kTileN = 128;
constexpr int64_t kTileK = 64;

// x [m, k] (row stride ldx; fp32 / bf16 / fp16) -> q int8 [m, kp] zero padded, scale fp32 [m]:
// the CPU engine's rule exactly (scale = amax / 127, q = rint(x * (127 / amax)), NaN/Inf rows get
// scale NaN and q = 0, rows with 127 / amax = Inf are zero rows).
const char* quantize_rows(const void* x, int dtype, int64_t m, int64_t k, int64_t ldx, int8_t* q, int64_t kp,
                          float* scale, void* stream);

// out [m, n] (row stride ldo) = q [m, kp] @ w[:n]^T with w in the RN128 layout ([np, kp]).
// out_dtype kI32: the exact int32 accumulator; otherwise fma(float(acc), sa[m] * sw[n], bias[n])
// (bias may be null) rounded to fp32 / bf16 / fp16. M <= 16 uses a weight-streaming dp4a kernel,
// larger M the tensor-core kernel (mma.sync m16n8k32 s8, cp.async 3-stage pipeline, ldmatrix).
const char* gemm_i8(const int8_t* q, int64_t m, int64_t kp, const int8_t* w, int64_t n, int64_t np,
                    const float* sa, const float* sw, const float* bias, void* out, int out_dtype, int64_t ldo,
                    void* stream);

int device_count();  // 0 when no driver / device (never throws)
const char* last_error_name();

}  // namespace fastinfer::cuda
