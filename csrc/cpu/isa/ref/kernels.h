// Portable reference kernels (baseline flags): the bottom of every table's ladder and the oracle
// every SIMD path must match bit for bit (int32 results) or operation for operation (fp32 epilogue).
// Signatures: cpu/dispatch/kernel_table.h.
#pragma once

#include "cpu/dispatch/kernel_table.h"

namespace fastinfer::cpu::ref {

void quantize_rows(const void* x, DType dt, int64_t ldx, int64_t m0, int64_t m1, int64_t k, int8_t* q,
                   int64_t ldq, int64_t kp, float* scale, bool shift_u8);
void gemm(const Activations& a, const PackedW& w, const Epilogue& ep, int64_t m0, int64_t m1, int64_t nb0,
          int64_t nb1);

void csr_f32(const SparseView& w, const float* x, int64_t ldx, const float* xt, int64_t ldt, int64_t m0,
             int64_t m1, const float* bias, float* out, int64_t ldo, int64_t n0, int64_t n1);  // reads x, never xt
void csr_i8(const SparseView& w, const CsrI8Act& a, int64_t m0, int64_t m1, const Epilogue& ep, int64_t n0,
            int64_t n1);  // int8 rows
void ell_f32(const SparseView& w, const float* xp, int64_t ldp, int64_t m0, int64_t m1, const float* bias,
             float* out, int64_t ldo, int64_t nb0, int64_t nb1);

}  // namespace fastinfer::cpu::ref
