// AVX-512 BF16 kernels (isa/avx512_bf16/, compiled with the AVX-512 VNNI flags + -mavx512bf16 only),
// in the avx512_vnni table where CPUID reports AVX512_BF16.
#pragma once

#include "cpu/dispatch/kernel_table.h"

namespace fastinfer::cpu::avx512_bf16 {

// bf16 q/k/v on vdpbf16ps (products exact, fp32 sums; the probabilities rounded to bf16 for P.V, as
// torch's bf16 attention does); fp32 inputs too when AttentionArgs::bf16_math asks (rounded to bf16
// as loaded); other fp32 calls and decoding go to avx512_vnni::attention.
AttentionKernel attention;
// avx512_vnni::layer_norm with bf16 outputs rounded by vcvtneps2bf16 (the same bits).
LayerNormKernel layer_norm;

}  // namespace fastinfer::cpu::avx512_bf16
