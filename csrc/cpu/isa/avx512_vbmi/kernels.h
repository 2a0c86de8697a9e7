// AVX-512 VBMI kernels (isa/avx512_vbmi/, the VNNI flags plus -mavx512vbmi): 2:4 and ell int8 with
// the activations gathered in registers (vpermb / vpermi2b). Signatures: cpu/dispatch/kernel_table.h;
// activations stored as q + 128, like the avx512_vnni table they extend.
#pragma once

#include "cpu/dispatch/kernel_table.h"

namespace fastinfer::cpu::avx512_vbmi {

void nm24_gemm(const Activations& a, const SparseView& w, const Epilogue& ep, int64_t m0, int64_t m1,
               int64_t nb0, int64_t nb1);
void ell_gemm(const Activations& a, const SparseView& w, const Epilogue& ep, int64_t m0, int64_t m1,
              int64_t nb0, int64_t nb1);

}  // namespace fastinfer::cpu::avx512_vbmi
