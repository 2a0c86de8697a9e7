// Run-time ISA detection: CPUID feature bits plus XGETBV (the OS must save the wider registers),
// plus, for AMX, Linux's per-process permission to use tile data (arch_prctl).
#include <cpuid.h>

#include "cpu/runtime/cpu_features.h"

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace fastinfer::cpu {
namespace {

uint64_t xgetbv0() {
    uint32_t eax, edx;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
    return (uint64_t(edx) << 32) | eax;
}

bool request_amx_permission() {
#if defined(__linux__)
    constexpr long kArchGetXcompPerm = 0x1022, kArchReqXcompPerm = 0x1023;
    constexpr long kXfeatureXtiledata = 18;
    unsigned long bitmask = 0;
    if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) return false;
    if (syscall(SYS_arch_prctl, kArchGetXcompPerm, &bitmask) != 0) return false;
    return (bitmask & (1ul << kXfeatureXtiledata)) != 0;
#else
    return false;
#endif
}

CpuFeatures detect() {
    CpuFeatures f;
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
    const bool osxsave = c & (1u << 27), fma = c & (1u << 12);
    if (!osxsave) return f;
    const uint64_t xcr0 = xgetbv0();
    const bool os_ymm = (xcr0 & 0x6) == 0x6;         // SSE + AVX state
    const bool os_zmm = (xcr0 & 0xe6) == 0xe6;       // + opmask, ZMM_Hi256, Hi16_ZMM
    const bool os_tile = (xcr0 & 0x60000) == 0x60000;  // XTILECFG + XTILEDATA
    if (__get_cpuid_max(0, nullptr) < 7) return f;
    __cpuid_count(7, 0, a, b, c, d);
    f.avx2 = os_ymm && fma && (b & (1u << 5));
    f.avx512f = os_zmm && (b & (1u << 16));
    f.avx512bw = os_zmm && (b & (1u << 30));
    f.avx512vl = os_zmm && (b & (1u << 31));
    f.avx512dq = os_zmm && (b & (1u << 17));
    f.avx512vnni = os_zmm && (c & (1u << 11));
    f.avx512vbmi = os_zmm && (c & (1u << 1));
    f.avx512vbmi2 = os_zmm && (c & (1u << 6));
    const unsigned max_sub = a;  // leaf 7 subleaf 0: EAX = the highest subleaf
    f.amx_tile = d & (1u << 24);
    f.amx_int8 = d & (1u << 25);
    f.amx_os = os_tile && f.amx_tile && f.amx_int8 && request_amx_permission();
    if (max_sub >= 1) {
        __cpuid_count(7, 1, a, b, c, d);
        f.avx512bf16 = os_zmm && (a & (1u << 5));
    }
    return f;
}

}  // namespace

const CpuFeatures& cpu_features() {
    static const CpuFeatures f = detect();
    return f;
}

Isa detected_isa() {
    const CpuFeatures& f = cpu_features();
    const bool vnni = f.avx2 && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.avx512vnni;
    // AMX kernels are not part of this build yet (see README); an AMX machine runs avx512_vnni.
    if (vnni) return Isa::kAvx512Vnni;
    if (f.avx2) return Isa::kAvx2;
    return Isa::kRef;
}

const char* isa_name(Isa isa) {
    switch (isa) {
        case Isa::kRef: return "ref";
        case Isa::kAvx2: return "avx2";
        case Isa::kAvx512Vnni: return "avx512_vnni";
        case Isa::kAmx: return "amx";
    }
    return "?";
}

}  // namespace fastinfer::cpu
