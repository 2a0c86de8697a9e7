// AVX-512 VNNI kernels (isa/avx512_vnni/, compiled with the AVX-512 F/BW/VL/DQ/VNNI flags only).
// Signatures: cpu/dispatch/kernel_table.h. gemm and block_gemm read activations stored as q + 128.
#pragma once

#include "cpu/dispatch/kernel_table.h"

namespace fastinfer::cpu::avx512_vnni {

void quantize_rows(const void* x, DType dt, int64_t ldx, int64_t m0, int64_t m1, int64_t k, int8_t* q,
                   int64_t ldq, int64_t kp, float* scale, bool shift_u8);
void gemm(const Activations& a, const PackedW& w, const Epilogue& ep, int64_t m0, int64_t m1, int64_t nb0,
          int64_t nb1);
int64_t dot_peak(int64_t iters);                     // iters * 24 * 64 multiply-adds, registers only
int64_t read_sum(const uint8_t* p, int64_t nbytes);  // nbytes % 256 == 0, p 64-byte aligned

// x gathered by column index for few rows; xt (transposed) when non-null.
void csr_f32(const SparseView& w, const float* x, int64_t ldx, const float* xt, int64_t ldt, int64_t m0,
             int64_t m1, const float* bias, float* out, int64_t ldo, int64_t n0, int64_t n1);
void csr_i8(const SparseView& w, const CsrI8Act& a, int64_t m0, int64_t m1, const Epilogue& ep, int64_t n0,
            int64_t n1);  // widened dwords
void block_gemm(const Activations& a, const SparseView& w, const Epilogue& ep, int64_t m0, int64_t m1,
                int64_t nb0, int64_t nb1);
void ell_f32(const SparseView& w, const float* xp, int64_t ldp, int64_t m0, int64_t m1, const float* bias,
             float* out, int64_t ldo, int64_t nb0, int64_t nb1);

}  // namespace fastinfer::cpu::avx512_vnni
