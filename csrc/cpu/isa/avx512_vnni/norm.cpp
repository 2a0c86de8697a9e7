// LayerNorm, AVX-512 F/BW/VL/DQ build (norm_inl.h).
#include "cpu/isa/avx512_vnni/kernels.h"
#include "cpu/isa/avx512_vnni/norm_inl.h"

namespace fastinfer::cpu::avx512_vnni {

void layer_norm(const LayerNormArgs& a, int64_t m0, int64_t m1) { layer_norm_rows(a, m0, m1); }

}  // namespace fastinfer::cpu::avx512_vnni
