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

// 2:4 sparse weights, layout "SP24": kept values [np][kp / 2] int8 (the two kept inputs of every
// group of 4, ascending), then metadata [np / 16][kp / 64][32] uint32 in mma.sp fragment order
// (word w of an m16 tile and k64 step is lane w's metadata operand: rows g + 8 (w & 1) of the
// tile, 32 columns (w & 3) >> 1 of the step, a 4-bit code per group: bits 1:0 the first kept
// position, bits 3:2 the second). np = N rounded up to 128, kp = K rounded up to 128.
constexpr int64_t kSp24TileN = 128;
constexpr int64_t kSp24TileK = 128;

// out [m, n] = q [m, kp] @ W^T as gemm_i8, with W in the SP24 layout (vals, meta). M <= 16: a dp4a
// kernel that widens the kept values in registers; larger M: mma.sp m16n8k64 (tensor cores,
// cp.async 3-stage pipeline, 78 KB of dynamic shared memory).
const char* gemm_sp24(const int8_t* q, int64_t m, int64_t kp, const int8_t* vals, const uint32_t* meta, int64_t n,
                      int64_t np, const float* sa, const float* sw, const float* bias, void* out, int out_dtype,
                      int64_t ldo, void* stream);

int device_count();  // 0 when no driver / device (never throws)
const char* last_error_name();

}  // namespace fastinfer::cuda
