// One table of kernel pointers per ISA (the MLAS pattern; DESIGN.md, "Kernel table, per ISA"),
// filled once from CPUID down the ladder ref -> avx2 -> avx512_vnni -> avx512_vnni+vbmi: each level
// starts as a copy of the one below and replaces what it has its own kernels for, so a kernel an ISA
// lacks is the next lower one's, down to ref (the fallback and the test oracle). An entry point reads
// the active table once (`const KernelTable& kt = active_kernels();`) and passes it down, so a
// concurrent set_isa_cap or set_sparse_vbmi only decides which table a whole call runs on.
//
// The kernels' signatures are function types (MLAS's MLAS_GEMM_FLOAT_KERNEL): an ISA header declares
// its kernels with them (`GemmKernel gemm;`), so a kernel that does not match its slot does not
// build (the table takes the declared one's address). Every kernel computes a slice of its output (rows [m0, m1), channels [n0, n1) or
// 16-channel blocks [nb0, nb1)), so the entry points split the work over threads without changing
// any result.
#pragma once

#include <algorithm>

#include "cpu/common.h"
#include "cpu/formats/k4n16.h"
#include "cpu/formats/sparse/header.h"

namespace fastinfer::cpu {

// Quantizes rows [m0, m1) of x (fp32 or bf16 [.., k], row stride ldx) per row into q (row stride ldq,
// zero padded from k to kp; stored as q + 128 when shift_u8) and scale (quantize_per_token's rule).
using QuantizeRowsKernel = void(const void* x, DType dt, int64_t ldx, int64_t m0, int64_t m1, int64_t k,
                                int8_t* q, int64_t ldq, int64_t kp, float* scale, bool shift_u8);
// Static (per-tensor) quantization of rows [m0, m1): q = clamp(x * inv rounded in the current mode,
// -127, 127) (quantize_rows' rounding; values past the calibrated range saturate), stored and padded
// as quantize_rows does; scale[m] = s, or NaN for a row holding NaN or Inf (its q all zero).
// inv = 1 / s is computed once by the entry, so every ISA multiplies by the same float.
using QuantizeStaticKernel = void(const void* x, DType dt, int64_t ldx, int64_t m0, int64_t m1, int64_t k,
                                  float inv, float s, int8_t* q, int64_t ldq, int64_t kp, float* scale,
                                  bool shift_u8);
// Exact int32 sums of a @ W^T (W packed K4N16) through the epilogue.
using GemmKernel = void(const Activations& a, const PackedW& w, const Epilogue& ep, int64_t m0, int64_t m1,
                        int64_t nb0, int64_t nb1);
// Weight-only int8 (W8A32): rows [m0, m1) of fp32 x [.., k] (row stride ldx) times blocks [nb0, nb1)
// of the K4N16 weight in fp32: acc = fma(x[m][k], float(W[n][k]), acc) from +0 over k = 0 .. K-1 in
// order (one chain per output on every path: the same bits on every ISA), then the epilogue
// act(fma(acc, sw[n], bias[n])) (store_one_f32; ep.sa unused). Padding past k is never read from x.
using WoGemmKernel = void(const float* x, int64_t ldx, const PackedW& w, const Epilogue& ep, int64_t m0,
                          int64_t m1, int64_t nb0, int64_t nb1);
// The same on a sparse int8 weight (2:4, block, ell int8): a reads q + 128 when the table's shift_u8.
using SparseGemmKernel = void(const Activations& a, const SparseView& w, const Epilogue& ep, int64_t m0,
                              int64_t m1, int64_t nb0, int64_t nb1);
// Decompresses 16-channel block nb of a 2:4, block or ell int8 weight to its dense K4N16 panel
// (16 * kp bytes), which the table's gemm multiplies where the format has no kernel of its own.
using PanelKernel = void(const SparseView& w, int64_t nb, int8_t* out);
// fp32 CSR: out[m][n] = x[m] . W[n] + bias[n] (bias may be null), x [.., k] with row stride ldx;
// xt is x transposed to [k][ldt] when the table's CsrKernels ask for it, else null.
using CsrF32Kernel = void(const SparseView& w, const float* x, int64_t ldx, const float* xt, int64_t ldt,
                          int64_t m0, int64_t m1, const float* bias, float* out, int64_t ldo, int64_t n0,
                          int64_t n1);
// int8 CSR activations (never shifted): int8 rows q [m][ld], or when the table's CsrKernels widen
// them, dwords holding uint16(int16(q)) as rows [m][ld], or transposed [k][ld].
struct CsrI8Act {
    const void* q;
    int64_t ld;
    bool transposed;
};
// int8 CSR: exact int32 sums through the epilogue.
using CsrI8Kernel = void(const SparseView& w, const CsrI8Act& a, int64_t m0, int64_t m1, const Epilogue& ep,
                         int64_t n0, int64_t n1);
// fp32 ell: out[m][n] = x[m] . W[n] + bias[n] with xp = x copied to rows of kp floats (zero padded,
// row stride ldp: kernels may read whole 64-input windows).
using EllF32Kernel = void(const SparseView& w, const float* xp, int64_t ldp, int64_t m0, int64_t m1,
                          const float* bias, float* out, int64_t ldo, int64_t nb0, int64_t nb1);
// Machine-limit probes: register-only multiply-adds (returns a checksum); a streaming read of
// nbytes (a multiple of 256, 64-byte aligned) summed as int32 lanes.
using DotPeakKernel = int64_t(int64_t iters);
using ReadSumKernel = int64_t(const uint8_t* p, int64_t nbytes);
// Convolution (api/conv.cpp). Geometry of an NHWC conv input and output (padding top/left).
struct ConvGeom {
    const void* x;  // [n][h][w][c], fp32, bf16 or kU8 (common.h)
    DType dt;
    int64_t h, w, c, oh, ow, kh, kw, sh, sw, ph, pw, dh, dw;
};
// int8 conv rows: for output pixels [m0, m1) (m = (img * oh + oy) * ow + ox), the im2col row of
// group g (channels [g * cg, (g + 1) * cg), k ordered (ky, kx, channel), taps outside the image
// zero) quantized with its own scale (one scale per row is exact: a row is one GEMM row), rows of kp
// bytes in tile, zero padded past kh * kw * cg; i = m - m0:
//   a row with a negative value: sa[i] = max|row| / 127, q = round(v * 127 / max) in [-127, 127],
//     stored q ^ flip, u8[i] = 0;
//   a row of values >= 0 (after a ReLU): sa[i] = max / 255, q = round(v * 255 / max) in [0, 255],
//     stored (q - 128) ^ flip, u8[i] = 1 (the epilogue adds the 128 * colsum back: u8_rows);
//   NaN/Inf: sa[i] = NaN; zero or too small: sa[i] = 0; both q = 0, u8[i] = 0.
// Rounding as quantize_rows: v * inv rounded in the current mode, then clamped.
// A kU8 input is quantized already: every row is its bytes q as a u8 row (stored (q - 128) ^ flip,
// taps outside the image q = 0) with sa[i] = kU8Scale, u8[i] = 1; a row holding the NaN byte is
// the NaN row above. No rounding: the GEMM sums the handed-on bytes exactly.
using GatherQuantizeKernel = void(const ConvGeom& g, int64_t cg, int64_t group, int64_t m0, int64_t m1,
                                  uint8_t flip, uint8_t* tile, int64_t kp, float* sa, uint8_t* u8);
// Depthwise (groups = channels = output channels), NHWC, output pixels of rows [r0, r1) (row r is
// image r / oh, oy = r % oh, every ox). Over the taps inside the image in (ky, kx) order:
//   int8: acc = sum x[..][c] * w32[tap][c] (x int8, or uint8 when u8), then the epilogue with
//         m = the pixel (sa per pixel);
//   fp32: acc = fma(x, wf[tap][c], acc) from 0, then out = act(acc + bias[c]) (x fp32/bf16, or kU8
//         read as float(q), NaN for kU8NaN: the entry point passes wf * kU8Scale then).
struct DepthwiseArgs {
    ConvGeom g;
    const uint8_t* xq;  // int8 path: the quantized input
    bool u8;
    const int32_t* w32;  // int8 path: [kh * kw][cp] int32, cp = round_up(c, 16), zero past c
    const float* wf;     // fp32 path: [kh * kw][cp]
    int64_t cp;
    Epilogue ep;  // rows = pixels, ldo = c; fp32 path: kind, out, bias, act
};
using DepthwiseKernel = void(const DepthwiseArgs& a, int64_t r0, int64_t r1);
// Per-sample quantization (the int8 depthwise path): range over n values (max |x|, whether every
// one is >= 0, whether every one is finite), then q[r][i] = byte(clamp(round(x[r][i] * inv), lo,
// hi)) ^ flip for rows r < rows, i < k (x row stride ldx, q row stride ldq), q[r][k..kp) = flip.
struct ValueRange {
    float amax = 0.f;
    bool nonneg = true;
    bool finite = true;
};
using RangeKernel = ValueRange(const void* x, DType dt, int64_t n);
using QuantizeScaledKernel = void(const void* x, DType dt, int64_t rows, int64_t k, int64_t ldx, float inv,
                                  int lo, int hi, uint8_t flip, uint8_t* q, int64_t ldq, int64_t kp);

// Scaled dot-product attention (api/attention.cpp): for head h of sample b and query row i,
//   s_j = scale * (q[b,h,i,:] . k[b,hk,j,:]) + mask[b,h,i,j] (j < lk; causal: only j <= i, top-left
//   aligned as torch's is_causal), p = softmax(s), out[b,i,h,:] = sum_j p_j v[b,hk,j,:],
// computed in fp32 (bf16 inputs widened exactly), hk = h / (heads / kv_heads) (grouped-query
// attention). A row whose every score is -inf (all masked) gives zeros, as torch's SDPA does.
// Strides in elements; the innermost stride of q, k, v, out and the mask is 1; a mask stride of 0
// broadcasts.
struct AttentionArgs {
    const void* q;  // [batch][heads][lq][d]
    const void* k;  // [batch][kv_heads][lk][d]
    const void* v;  // [batch][kv_heads][lk][dv]
    DType dt;       // of q, k, v and out: fp32 or bf16
    int64_t batch, heads, kv_heads, lq, lk, d, dv;
    int64_t q_sb, q_sh, q_sl, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl;
    const void* mask;  // null, or [batch][heads][lq][lk] of mask_kind
    int mask_kind;     // kMaskNone, kMaskBool (uint8: nonzero = attend), kMaskF32, kMaskBF16 (added)
    int64_t m_sb, m_sh, m_sl;
    float scale;
    bool causal;
    void* out;  // [batch][lq][heads][dv] (o_sb, o_sl, o_sh)
    int64_t o_sb, o_sl, o_sh;
    // fp32 q, k, v rounded to bf16 (nearest even) for the two products, as bf16 inputs are: a CPU
    // with AVX512_BF16 then runs the vdpbf16ps kernel on fp32 tensors (a request: elsewhere fp32)
    bool bf16_math = false;
};
constexpr int kMaskNone = 0;
constexpr int kMaskBool = 1;
constexpr int kMaskF32 = 2;
constexpr int kMaskBF16 = 3;
// One attention task's scratch, in floats from a 64-byte aligned base: K^T [d][lkp], V [lk][dvp],
// 4 query rows [4][dp], their scores [4][lkp] (ref: scores [lk], output [dv]), lkp/dp/dvp = lk/d/dv rounded up to 16. In an
// unnamed namespace: each file gets its own copy compiled with its own flags (as common.h's helpers).
struct AttentionLayout {
    int64_t lkp, dp, dvp;
    int64_t kt, v, q, s, total;  // offsets, and the whole size
};
namespace {
inline AttentionLayout attention_layout(const AttentionArgs& a) {
    AttentionLayout l;
    l.lkp = round_up(a.lk, 16);
    l.dp = round_up(a.d, 16);
    l.dvp = round_up(a.dv, 16);
    l.kt = 0;
    l.v = l.kt + a.d * l.lkp;
    l.q = l.v + a.lk * l.dvp;
    l.s = l.q + 4 * l.dp;
    l.total = std::max(l.s + 8 * l.lkp, a.lk + l.dvp);  // scores of 8 rows (the bf16 kernel's P.V blocks); ref: one row's scores and output
    return l;
}
}  // namespace
// Query rows [q0, q1) of head bh = b * heads + h.
using AttentionKernel = void(const AttentionArgs& a, int64_t bh, int64_t q0, int64_t q1, float* scratch);

// LayerNorm over rows of h values: out = (x - mean) * rstd, times w, plus b (each when non-null;
// with both, fma(y, w, b)), mean = sum(x) / h, var = sum((x - mean)^2) / h (the squares summed by
// fma), rstd = 1 / sqrt(var + eps), all in fp32. Every sum is defined one way on every path: 64
// partial sums (element i into partial i % 64, in order of i), partial p + 16 j combined as
// (p0 + p1) + (p2 + p3) for lane p < 16, then the 16 lanes halved pairwise (l + l + 8, + 4, + 2,
// + 1): layer_norm_sum in common.h. x and out are fp32 or bf16 (dt); w and b reach the kernels as
// fp32 (wdt kF32: the entry widens bf16 ones).
struct LayerNormArgs {
    const void* x;
    DType dt;
    int64_t h, ldx;
    const void* w;
    const void* b;
    DType wdt;
    float eps;
    void* out;
    int64_t ldo;
};
using LayerNormKernel = void(const LayerNormArgs& a, int64_t m0, int64_t m1);

// The CSR kernels of one ISA and the activation layout they read (the entry points build it).
struct CsrKernels {
    CsrF32Kernel* f32 = nullptr;
    CsrI8Kernel* i8 = nullptr;
    int64_t transpose_from = 0;  // from this many rows up, activations transposed to [k][round_up(m, 16)]; 0: never
    bool widen_i8 = false;       // int8 activations as dwords (see CsrI8Act)
};

struct KernelTable {
    const char* name = nullptr;  // "ref", "avx2", "avx512_vnni", "avx512_vnni+vbmi"
    Isa isa = Isa::kRef;
    bool vbmi = false;  // the VBMI kernels for 2:4 and ell int8 are in

    // Dense int8. shift_u8 belongs to gemm and the sparse int8 kernels (they read q + 128: vpdpbusd
    // is u8 x s8, and subtract 128 * colsum); the entry points quantize or copy accordingly. A level
    // that changes shift_u8 replaces every kernel that reads quantized activations.
    QuantizeRowsKernel* quantize_rows = nullptr;
    QuantizeStaticKernel* quantize_static = nullptr;
    GemmKernel* gemm = nullptr;
    bool shift_u8 = false;
    GemmKernel* amx_gemm = nullptr;  // AMX tiles (tdpbssd): not built yet, null on every CPU
    WoGemmKernel* wo_gemm = nullptr;  // weight-only int8: fp32 FMA on the K4N16 weight
    // Convolution: every int8 path but depthwise gathers + quantizes rows and runs gemm on them.
    GatherQuantizeKernel* gather_quantize = nullptr;
    DepthwiseKernel* depthwise = nullptr;      // int8
    DepthwiseKernel* depthwise_f32 = nullptr;  // fp32
    RangeKernel* range = nullptr;
    QuantizeScaledKernel* quantize_scaled = nullptr;
    // Attention; attention_simd says whether the kernel is this ISA's own (not ref's), attention_name
    // which one runs ("ref", "avx512_vnni" fp32 FMA, "avx512_bf16": bf16 inputs on vdpbf16ps).
    AttentionKernel* attention = nullptr;
    bool attention_simd = false;
    const char* attention_name = "ref";
    // LayerNorm; layer_norm_simd: the kernel is this ISA's own (not ref's).
    LayerNormKernel* layer_norm = nullptr;
    bool layer_norm_simd = false;

    // Sparse. A null int8 format kernel runs the format's blocks through panel + gemm (exact, not faster).
    CsrKernels csr;
    SparseGemmKernel* nm24_i8 = nullptr;
    SparseGemmKernel* block_i8 = nullptr;
    SparseGemmKernel* ell_i8 = nullptr;
    PanelKernel* panel = nullptr;
    EllF32Kernel* ell_f32 = nullptr;

    // Probes (null where the ISA has none): dot_peak does dot_peak_macs multiply-adds per iteration.
    DotPeakKernel* dot_peak = nullptr;
    int64_t dot_peak_macs = 0;
    ReadSumKernel* read_sum = nullptr;
};

// The table of active_isa(), with the VBMI kernels unless set_sparse_vbmi(false) took them out.
const KernelTable& active_kernels();
// The table of the machine (the detected ISA, whatever the cap): the machine-limit probes.
const KernelTable& machine_kernels();

}  // namespace fastinfer::cpu
