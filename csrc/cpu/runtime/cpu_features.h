#pragma once

#include "cpu/common.h"

namespace fastinfer::cpu {

struct CpuFeatures {
    bool avx2 = false, avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false,
         avx512vnni = false, avx512vbmi = false, avx512vbmi2 = false, avx512bf16 = false, amx_tile = false,
         amx_int8 = false, amx_os = false;
};

const CpuFeatures& cpu_features();  // detected once
Isa detected_isa();                 // highest ISA whose kernels are built and usable here

}  // namespace fastinfer::cpu
