// AVX2 kernels (isa/avx2/, compiled with -mavx2 -mfma -mf16c only). The sparse formats run on the
// ref CSR kernels and on panels.
#pragma once

#include "cpu/dispatch/kernel_table.h"

namespace fastinfer::cpu::avx2 {

QuantizeRowsKernel quantize_rows;
QuantizeStaticKernel quantize_static;
GemmKernel gemm;
WoGemmKernel wo_gemm;
DotPeakKernel dot_peak;  // iters * 12 * 16 multiply-adds

}  // namespace fastinfer::cpu::avx2
