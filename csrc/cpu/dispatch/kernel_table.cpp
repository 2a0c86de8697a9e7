// The kernel tables, filled once from CPUID, and the ISA cap that selects one (baseline flags: only
// pointers to the ISA files' kernels are taken here, none is called).
#include "cpu/dispatch/kernel_table.h"

#include <atomic>

#include "cpu/engine.h"
#include "cpu/formats/sparse/traits.h"
#include "cpu/isa/avx2/kernels.h"
#include "cpu/isa/avx512_bf16/kernels.h"
#include "cpu/isa/avx512_vbmi/kernels.h"
#include "cpu/isa/avx512_vnni/kernels.h"
#include "cpu/isa/ref/kernels.h"
#include "cpu/runtime/cpu_features.h"
#include "cpu/sparse.h"

namespace fastinfer::cpu {
namespace {

std::atomic<int> g_isa_cap{int(Isa::kAmx)};
std::atomic<bool> g_allow_vbmi{true};

enum Level { kRefLevel, kAvx2Level, kVnniLevel, kVbmiLevel, kLevels };

struct Tables {
    KernelTable level[kLevels];
    Level top = kRefLevel;  // the machine's: levels above it are never filled
};

// The ladder: each level copies the one below, then replaces what it has its own kernels for.
Tables fill_tables() {
    Tables s;
    KernelTable t;
    t.name = "ref";
    t.isa = Isa::kRef;
    t.quantize_rows = ref::quantize_rows;
    t.quantize_static = ref::quantize_static;
    t.gemm = ref::gemm;
    t.wo_gemm = ref::wo_gemm;
    t.csr = {ref::csr_f32, ref::csr_i8, 0, false};
    t.panel = decompress_panel;  // one portable decompress for every ISA
    t.ell_f32 = ref::ell_f32;
    t.range = ref::range;
    t.quantize_scaled = ref::quantize_scaled;
    t.depthwise = ref::depthwise;
    t.depthwise_f32 = ref::depthwise_f32;
    t.gather_quantize = ref::gather_quantize;
    t.attention = ref::attention;
    t.layer_norm = ref::layer_norm;
    s.level[kRefLevel] = t;

    const Isa isa = detected_isa();
    if (isa < Isa::kAvx2) return s;
    t.name = "avx2";
    t.isa = Isa::kAvx2;
    t.quantize_rows = avx2::quantize_rows;
    t.quantize_static = avx2::quantize_static;
    t.gemm = avx2::gemm;
    t.wo_gemm = avx2::wo_gemm;
    t.dot_peak = avx2::dot_peak;
    t.dot_peak_macs = 12 * 16;
    s.level[s.top = kAvx2Level] = t;

    if (isa < Isa::kAvx512Vnni) return s;  // AMX machines too: no AMX kernels yet (amx_gemm stays null)
    t.name = "avx512_vnni";
    t.isa = Isa::kAvx512Vnni;
    t.quantize_rows = avx512_vnni::quantize_rows;
    t.quantize_static = avx512_vnni::quantize_static;
    t.gemm = avx512_vnni::gemm;
    t.wo_gemm = avx512_vnni::wo_gemm;
    t.shift_u8 = true;  // every kernel reading quantized activations is replaced here (none is inherited)
    // CSR: gathers for up to 4 rows; from 5, each nonzero scales a run of transposed rows
    t.csr = {avx512_vnni::csr_f32, avx512_vnni::csr_i8, 5, true};
    t.block_i8 = avx512_vnni::block_gemm;
    t.ell_f32 = avx512_vnni::ell_f32;
    t.range = avx512_vnni::range;
    t.quantize_scaled = avx512_vnni::quantize_scaled;
    t.depthwise = avx512_vnni::depthwise;
    t.depthwise_f32 = avx512_vnni::depthwise_f32;
    t.gather_quantize = avx512_vnni::gather_quantize;
    t.attention = cpu_features().avx512bf16 ? avx512_bf16::attention : avx512_vnni::attention;  // bf16: vdpbf16ps
    t.attention_name = cpu_features().avx512bf16 ? "avx512_bf16" : "avx512_vnni";
    t.attention_simd = true;
    t.layer_norm = cpu_features().avx512bf16 ? avx512_bf16::layer_norm : avx512_vnni::layer_norm;
    t.layer_norm_simd = true;
    t.dot_peak = avx512_vnni::dot_peak;
    t.dot_peak_macs = 24 * 64;
    t.read_sum = avx512_vnni::read_sum;
    s.level[s.top = kVnniLevel] = t;

    if (!cpu_features().avx512vbmi) return s;
    t.name = "avx512_vnni+vbmi";
    t.vbmi = true;
    // activations gathered in registers at every M: decompressing 4 panels to memory first and
    // running the dense kernel measured 0.46x-0.68x of dense at M = 5..16 (2:4)
    t.nm24_i8 = avx512_vbmi::nm24_gemm;
    t.ell_i8 = avx512_vbmi::ell_gemm;
    s.level[s.top = kVbmiLevel] = t;
    return s;
}

const Tables& tables() {
    static const Tables s = fill_tables();
    return s;
}

}  // namespace

Isa active_isa() {
    int cap = g_isa_cap.load(std::memory_order_relaxed);
    int det = int(detected_isa());
    return Isa(cap < det ? cap : det);
}

Status set_isa_cap(int isa) {
    if (isa < 0 || isa > int(detected_isa())) return Status::invalid("ISA not supported on this CPU");
    g_isa_cap.store(isa);
    return Status::ok();
}

const KernelTable& active_kernels() {
    const Tables& s = tables();
    switch (active_isa()) {
        case Isa::kRef: return s.level[kRefLevel];
        case Isa::kAvx2: return s.level[kAvx2Level];
        default:
            if (s.top == kVbmiLevel && g_allow_vbmi.load(std::memory_order_relaxed)) return s.level[kVbmiLevel];
            return s.level[kVnniLevel];
    }
}

const KernelTable& machine_kernels() { return tables().level[tables().top]; }

bool set_sparse_vbmi(bool allow) { return g_allow_vbmi.exchange(allow); }

bool sparse_vbmi_active() { return active_kernels().vbmi; }

}  // namespace fastinfer::cpu
