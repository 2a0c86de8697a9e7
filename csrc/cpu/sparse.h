// The sparse entry points of the CPU engine (torch-free; validated, Status instead of exceptions).
// The formats: cpu/formats/sparse/header.h.
#pragma once

#include "cpu/common.h"
#include "cpu/formats/sparse/header.h"

namespace fastinfer::cpu {

// Tests: turn the VBMI 2:4 and ell kernels off (they then run on decompressed panels); returns the old value.
bool set_sparse_vbmi(bool allow);
bool sparse_vbmi_active();

// Entry points (validated; Status instead of exceptions).
// Size of the buffer sparse_pack will write for w ([n, k], row stride ldw; fp32 for kCsrF32, int8
// otherwise). Fails when w does not fit the format (2:4: a group of 4 with more than 2 nonzeros).
Status sparse_measure(SparseFormat fmt, const void* w, int64_t n, int64_t k, int64_t ldw, int64_t* nbytes);
Status sparse_pack(SparseFormat fmt, const void* w, int64_t n, int64_t k, int64_t ldw, uint8_t* out,
                   int64_t nbytes);
// Header checks only (O(1)); the kernels additionally rely on sparse_validate having passed.
Status sparse_view(const uint8_t* buf, int64_t nbytes, SparseView* v);
// Full check of a buffer (pointers monotonic, indices in range, masks well formed): O(nnz).
Status sparse_validate(const uint8_t* buf, int64_t nbytes);
// Nonzero weights of a buffer (validated first), read from the stored values: O(stored bytes) time,
// no memory, never the dense [n, k] (a layer's repr and sparsity stats must not expand a buffer).
Status sparse_count_nonzero(const uint8_t* buf, int64_t nbytes, int64_t* count);
// Dense [n, k] (fp32 for kCsrF32, int8 otherwise), contiguous.
Status sparse_unpack(const uint8_t* buf, int64_t nbytes, void* w);
// out fp32 [m, n] = x fp32 [m, k] @ W^T + bias (kCsrF32).
Status sparse_linear_f32(const float* x, int64_t m, int64_t k, int64_t ldx, const uint8_t* buf,
                         int64_t nbytes, const float* bias, float* out, int64_t ldo);
// out int32 [m, n] = a int8 [m, k] @ W^T, exact mod 2^32 (int8 formats).
Status sparse_int8_matmul(const int8_t* a, int64_t m, int64_t k, int64_t lda, const uint8_t* buf,
                          int64_t nbytes, int32_t* out, int64_t ldo);
// Dynamic int8 linear on a sparse int8 weight: same quantization, epilogue and act as int8_linear.
Status sparse_int8_linear(const void* x, DType dt, int64_t m, int64_t k, int64_t ldx, const uint8_t* buf,
                          int64_t nbytes, const float* sw, const float* bias, void* out, DType out_dt,
                          int64_t ldo, int act);

}  // namespace fastinfer::cpu
