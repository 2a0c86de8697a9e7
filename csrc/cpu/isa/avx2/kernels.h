// AVX2 kernels (isa/avx2/, compiled with -mavx2 -mfma -mf16c only). Signatures:
// cpu/dispatch/kernel_table.h. The sparse formats run on the ref CSR kernels and on panels.
#pragma once

#include "cpu/dispatch/kernel_table.h"

namespace fastinfer::cpu::avx2 {

void quantize_rows(const void* x, DType dt, int64_t ldx, int64_t m0, int64_t m1, int64_t k, int8_t* q,
                   int64_t ldq, int64_t kp, float* scale, bool shift_u8);
void gemm(const Activations& a, const PackedW& w, const Epilogue& ep, int64_t m0, int64_t m1, int64_t nb0,
          int64_t nb1);
int64_t dot_peak(int64_t iters);  // iters * 12 * 16 multiply-adds, registers only

}  // namespace fastinfer::cpu::avx2
