// LayerNorm, AVX512_BF16 build (norm_inl.h): bf16 outputs rounded by vcvtneps2bf16.
#include "cpu/isa/avx512_bf16/kernels.h"
#include "cpu/isa/avx512_vnni/norm_inl.h"

namespace fastinfer::cpu::avx512_bf16 {

void layer_norm(const LayerNormArgs& a, int64_t m0, int64_t m1) { layer_norm_rows(a, m0, m1); }

}  // namespace fastinfer::cpu::avx512_bf16
