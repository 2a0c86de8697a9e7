// AVX-512 VNNI kernels (isa/avx512_vnni/, compiled with the AVX-512 F/BW/VL/DQ/VNNI flags only).
// gemm and block_gemm read activations stored as q + 128.
#pragma once

#include "cpu/dispatch/kernel_table.h"

namespace fastinfer::cpu::avx512_vnni {

QuantizeRowsKernel quantize_rows;
QuantizeStaticKernel quantize_static;
GemmKernel gemm;
WoGemmKernel wo_gemm;
DotPeakKernel dot_peak;  // iters * 24 * 64 multiply-adds
ReadSumKernel read_sum;

CsrF32Kernel csr_f32;  // x gathered by column index for few rows; xt (transposed) when non-null
CsrI8Kernel csr_i8;    // widened dwords
SparseGemmKernel block_gemm;
EllF32Kernel ell_f32;
RangeKernel range;
QuantizeScaledKernel quantize_scaled;
DepthwiseKernel depthwise;
DepthwiseKernel depthwise_f32;
GatherQuantizeKernel gather_quantize;
AttentionKernel attention;
LayerNormKernel layer_norm;

}  // namespace fastinfer::cpu::avx512_vnni
