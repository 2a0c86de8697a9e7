// Portable reference kernels (baseline flags): the bottom of every table's ladder and the oracle
// every SIMD path must match bit for bit (int32 results) or operation for operation (fp32 epilogue).
#pragma once

#include "cpu/dispatch/kernel_table.h"

namespace fastinfer::cpu::ref {

QuantizeRowsKernel quantize_rows;
QuantizeStaticKernel quantize_static;
GemmKernel gemm;
WoGemmKernel wo_gemm;
CsrF32Kernel csr_f32;  // reads x, never xt
CsrI8Kernel csr_i8;    // int8 rows
EllF32Kernel ell_f32;
RangeKernel range;
QuantizeScaledKernel quantize_scaled;
DepthwiseKernel depthwise;
DepthwiseKernel depthwise_f32;
GatherQuantizeKernel gather_quantize;
AttentionKernel attention;
LayerNormKernel layer_norm;

}  // namespace fastinfer::cpu::ref
