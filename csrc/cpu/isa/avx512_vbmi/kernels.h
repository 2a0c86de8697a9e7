// AVX-512 VBMI kernels (isa/avx512_vbmi/, the VNNI flags plus -mavx512vbmi): 2:4 and ell int8 with
// the activations gathered in registers (vpermb / vpermi2b), stored as q + 128 like the avx512_vnni
// table they extend.
#pragma once

#include "cpu/dispatch/kernel_table.h"

namespace fastinfer::cpu::avx512_vbmi {

SparseGemmKernel nm24_gemm;
SparseGemmKernel ell_gemm;

}  // namespace fastinfer::cpu::avx512_vbmi
