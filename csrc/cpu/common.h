// Shared declarations of the torch-free CPU engine: status codes, ISA names, the blocking, and what
// every GEMM kernel reads and writes (activations, epilogue). Nothing here includes an ISA
// intrinsic header.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace fastinfer {

// Error channel of every entry point: no C++ exception ever crosses into Python.
struct Status {
    enum Code { kOk = 0, kInvalidArgument = 1, kRuntime = 2 };
    Code code = kOk;
    std::string message;
    static Status ok() { return {}; }
    static Status invalid(std::string msg) { return {kInvalidArgument, std::move(msg)}; }
    static Status runtime(std::string msg) { return {kRuntime, std::move(msg)}; }
    bool is_ok() const { return code == kOk; }
};

namespace cpu {

// Ordered: a larger value is a superset of the smaller ones on every CPU we dispatch to.
enum class Isa : int { kRef = 0, kAvx2 = 1, kAvx512Vnni = 2, kAmx = 3 };
const char* isa_name(Isa isa);

enum class DType : int { kF32 = 0, kBF16 = 1, kI32 = 2, kU8 = 3 };

constexpr size_t dtype_bytes(DType dt) { return dt == DType::kF32 || dt == DType::kI32 ? 4 : dt == DType::kBF16 ? 2 : 1; }

// kU8: a ReLU6 output handed from one conv to the next (QuantConfig.conv_handoff). Byte q in
// [0, 254] stands for q * kU8Scale (6 / 254), 255 for NaN, so a NaN pixel stays NaN down the chain.
// Written from an fp32 y (already through ReLU6, so in [0, 6]) as round(clamp(y * kU8Inv, 0, 254))
// in the current rounding mode (nearest even), NaN -> 255. Read by the int8 conv as the bytes
// themselves (scale kU8Scale: no second rounding) and by the fp32 depthwise conv as float(q) times
// a weight scaled by kU8Scale; u8_to_f32 is the value a byte stands for.
constexpr float kU8Scale = 6.f / 254.f;
constexpr float kU8Inv = 254.f / 6.f;
constexpr uint8_t kU8NaN = 255;

// Weights are processed in blocks of kNBlock output channels (one zmm of int32 sums); K is padded
// to a multiple of kKAlign (one zmm of int8 activations).
constexpr int64_t kNBlock = 16;
constexpr int64_t kKAlign = 64;
// Largest M, N or K an entry point accepts: every size product stays far from int64 overflow. (The
// int32 sums are exact for K up to 2^17; beyond, exact mod 2^32 like a wrapping int32 matmul.)
constexpr int64_t kMaxDim = int64_t(1) << 40;

constexpr int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Sizes of a [m, k] operand with row stride ld: not negative, at most kMaxDim, ld >= k (m > 0).
// what names the entry point in the message.
Status check_dims(int64_t m, int64_t k, int64_t ld, const char* what);

// Where the GEMM result goes. kind kI32: out[m,n] = acc (exact, wrapping mod 2^32).
// kind kF32/kBF16/kU8: out[m,n] = act(acc * sa[m] * sw[n] + bias[n]) (bias may be null), computed in fp32
// (kU8 only after kActRelu6: the conv entry points check).
// Activation codes (the entry points reject any other): kActNone, kActGelu (erf GELU, gelu_f32),
// kActRelu, kActRelu6, kActSilu (x * sigmoid(x), exp_f32), kActHardswish (x * relu6(x + 3) / 6),
// kActGeluTanh (GELU's tanh approximation, GPT-2's "gelu_new": gelu_tanh_f32).
// NaN stays NaN through every one of them.
constexpr int kActNone = 0;
constexpr int kActGelu = 1;
constexpr int kActRelu = 2;
constexpr int kActRelu6 = 3;
constexpr int kActSilu = 4;
constexpr int kActHardswish = 5;
constexpr int kActGeluTanh = 6;
constexpr bool valid_act(int act) { return act >= kActNone && act <= kActGeluTanh; }
struct Epilogue {
    DType kind;
    void* out;
    int64_t ldo;  // row stride of out, in elements
    const float* sa;
    const float* sw;
    const float* bias;
    int act = kActNone;  // applied to the fp32 value before the cast (ignored for kI32)
    // Non-null: acc += 128 * colsum_add[n] (mod 2^32) first, in every row, or with u8_rows only in
    // the rows m where u8_rows[m] != 0. Activations stored as q - 128 (uint8 data q in [0, 255] held
    // in the int8 range: int8_conv2d's rows that are all >= 0) then give sum(q * w) exactly.
    const int32_t* colsum_add = nullptr;
    const uint8_t* u8_rows = nullptr;
    // A hint: the output is too large to stay in cache for its reader, so kernels may write whole
    // 64-byte lines with non-temporal stores (no read for ownership); the values are the same.
    bool stream = false;
    // Non-null: a residual of the output's kind (kF32 or kBF16) and row stride, added in fp32 after
    // the bias and before the activation: y = act(fma(acc, sa * sw, bias) + res) (a ResNet block's
    // conv -> add -> relu in one pass).
    const void* res = nullptr;
};

// erf as a rational function, Eigen's generic_fast_erf_float (Eigen/src/SpecialFunctions/
// SpecialFunctionsImpl.h; MPL2): x clamped to [-4, 4], p = x * P(x^2) (odd, degree 13),
// q = Q(x^2) (even, degree 8), both Horner with fma, then one IEEE division p / q. Every path (scalar
// erf_f32, avx2 and avx512 gelu) uses these constants in this order, so results are bit-identical.
constexpr float kErfAlpha1 = -1.60960333262415e-02f;
constexpr float kErfAlpha3 = -2.95459980854025e-03f;
constexpr float kErfAlpha5 = -7.34990630326855e-04f;
constexpr float kErfAlpha7 = -5.69250639462346e-05f;
constexpr float kErfAlpha9 = -2.10102402082508e-06f;
constexpr float kErfAlpha11 = 2.77068142495902e-08f;
constexpr float kErfAlpha13 = -2.72614225801306e-10f;
constexpr float kErfBeta0 = -1.42647390514189e-02f;
constexpr float kErfBeta2 = -7.37332916720468e-03f;
constexpr float kErfBeta4 = -1.68282697438203e-03f;
constexpr float kErfBeta6 = -2.13374055278905e-04f;
constexpr float kErfBeta8 = -1.45660718464996e-05f;
constexpr float kErfClamp = 4.f;
constexpr float kSqrtHalf = 0.70710678f;

// exp as Cephes expf (range reduction by ln 2 in two parts, degree-5 polynomial), x clamped to
// [kExpLo, kExpHi] so that 2^n stays a normal float; the same operations on every path.
constexpr float kExpHi = 88.3762626647949f;
constexpr float kExpLo = -87.3365478515625f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kExpP0 = 1.9875691500e-4f;
constexpr float kExpP1 = 1.3981999507e-3f;
constexpr float kExpP2 = 8.3334519073e-3f;
constexpr float kExpP3 = 4.1665795894e-2f;
constexpr float kExpP4 = 1.6666665459e-1f;
constexpr float kExpP5 = 5.0000001201e-1f;

// Quantized activations handed to a GEMM kernel: int8 rows of kp bytes (zero padded past k).
// For avx512_vnni the bytes are stored shifted (q + 128 as uint8); the kernel subtracts 128*colsum.
// k_used (0: all kp): a kernel may stop after the first k_used bytes of K (a multiple of 8, at most
// kp, past the layer's k): the weight's bytes past k are zero, so the rest adds nothing to any sum.
// A conv of few input channels (K = 16, 24 or 27 padded to 64) then runs its real K only.
struct Activations {
    const int8_t* q;
    int64_t m;
    int64_t ldq;
    int64_t k_used = 0;
};

// Scalar helpers shared by every path (exactly the same float operations as the SIMD code).
// In an unnamed namespace: each file gets its own copy compiled with its own flags, so the linker
// can never hand baseline code an AVX-512 copy of a helper.
namespace {

inline float bf16_to_f32(uint16_t v) {
    uint32_t u = uint32_t(v) << 16;
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
}

// The sum of LayerNormArgs from its 64 partial sums (kernel_table.h): the SIMD kernels add the same
// values in the same order (four 16-lane vectors, then the lane halving).
inline float layer_norm_sum(const float* part) {
    float l[16];
    for (int i = 0; i < 16; ++i) l[i] = (part[i] + part[16 + i]) + (part[32 + i] + part[48 + i]);
    for (int w = 8; w >= 1; w /= 2)
        for (int i = 0; i < w; ++i) l[i] = l[i] + l[i + w];
    return l[0];
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even; NaN stays NaN
    uint32_t u;
    __builtin_memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return uint16_t(u >> 16);
}

inline float u8_to_f32(uint8_t q) { return q == kU8NaN ? __builtin_nanf("") : float(q) * kU8Scale; }
// kU8's rounding: clamp in fp32 first (the bounds are integers, so before or after the rounding
// gives the same), then round in the current mode, as vcvtps2dq does.
inline uint8_t f32_to_u8(float y) {
    if (y != y) return kU8NaN;
    float t = y * kU8Inv;
    t = t > 0.f ? t : 0.f;
    t = t < 254.f ? t : 254.f;
    return uint8_t(__builtin_nearbyintf(t));
}

// The clamp is written as the SIMD min/max behave: _mm*_min_ps(a, b) returns b when a is NaN
// (a NaN input then gives erf(4); gelu stays NaN through h = 0.5 * NaN).
inline float erf_f32(float a) {
    float x = a < kErfClamp ? a : kErfClamp;
    x = x > -kErfClamp ? x : -kErfClamp;
    const float x2 = x * x;
    float p = __builtin_fmaf(x2, kErfAlpha13, kErfAlpha11);
    p = __builtin_fmaf(x2, p, kErfAlpha9);
    p = __builtin_fmaf(x2, p, kErfAlpha7);
    p = __builtin_fmaf(x2, p, kErfAlpha5);
    p = __builtin_fmaf(x2, p, kErfAlpha3);
    p = __builtin_fmaf(x2, p, kErfAlpha1);
    p = x * p;
    float q = __builtin_fmaf(x2, kErfBeta8, kErfBeta6);
    q = __builtin_fmaf(x2, q, kErfBeta4);
    q = __builtin_fmaf(x2, q, kErfBeta2);
    q = __builtin_fmaf(x2, q, kErfBeta0);
    return p / q;
}

// gelu(y) = 0.5 y (1 + erf(y / sqrt 2)), computed as fma(h, erf(y * sqrt(1/2)), h) with h = 0.5 y.
inline float gelu_f32(float y) {
    const float h = 0.5f * y;
    return __builtin_fmaf(h, erf_f32(y * kSqrtHalf), h);
}

// min/max as _mm*_min_ps(a, b) / _mm*_max_ps(a, b) behave: b when either is NaN.
inline float simd_min(float a, float b) { return a < b ? a : b; }
inline float simd_max(float a, float b) { return a > b ? a : b; }

inline float exp_f32(float x) {
    x = simd_max(simd_min(x, kExpHi), kExpLo);  // NaN -> kExpHi (the SIMD clamp); callers keep NaN
    const float n = __builtin_nearbyintf(x * kLog2e);
    float r = __builtin_fmaf(n, -kLn2Hi, x);
    r = __builtin_fmaf(n, -kLn2Lo, r);
    float p = __builtin_fmaf(kExpP0, r, kExpP1);
    p = __builtin_fmaf(p, r, kExpP2);
    p = __builtin_fmaf(p, r, kExpP3);
    p = __builtin_fmaf(p, r, kExpP4);
    p = __builtin_fmaf(p, r, kExpP5);
    float y = __builtin_fmaf(p, r * r, r);
    y = y + 1.f;
    const uint32_t bits = uint32_t(int32_t(n) + 127) << 23;
    float two_n;
    __builtin_memcpy(&two_n, &bits, 4);
    return y * two_n;
}

// GELU's tanh form 0.5 y (1 + tanh(sqrt(2/pi) (y + 0.044715 y^3))) as y * sigmoid(2u), u the tanh's
// argument: y / (1 + exp(y * (k0 + k1 y^2))) with k0 = -2 sqrt(2/pi), k1 = 0.044715 k0 (exp_f32; the
// SIMD paths do the same operations in this order).
constexpr float kGeluTanhK0 = -1.5957691216057308f;
constexpr float kGeluTanhK1 = -0.0713548162726009f;
inline float gelu_tanh_f32(float y) {
    const float t = __builtin_fmaf(y * y, kGeluTanhK1, kGeluTanhK0);
    return y / (1.f + exp_f32(y * t));
}

// The fused activation of one fp32 value (valid_act codes); the SIMD act8/act16 do the same.
inline float act_f32(float y, int act) {
    switch (act) {
        case kActGelu: return gelu_f32(y);
        case kActRelu: return simd_max(0.f, y);
        case kActRelu6: return simd_min(6.f, simd_max(0.f, y));
        case kActSilu: return y / (1.f + exp_f32(-y));
        case kActHardswish: return y * simd_min(simd_max(y + 3.f, 0.f), 6.f) / 6.f;
        case kActGeluTanh: return gelu_tanh_f32(y);
        default: return y;
    }
}

// One fp32 value stored as element i of out, of type kind (kF32, kBF16 or kU8).
inline void store_as(DType kind, void* out, int64_t i, float y) {
    if (kind == DType::kF32)
        static_cast<float*>(out)[i] = y;
    else if (kind == DType::kU8)
        static_cast<uint8_t*>(out)[i] = f32_to_u8(y);
    else
        static_cast<uint16_t*>(out)[i] = f32_to_bf16(y);
}

// One fp32 output value stored as the epilogue's kind.
inline void store_value(float y, const Epilogue& ep, int64_t m, int64_t n) { store_as(ep.kind, ep.out, m * ep.ldo + n, y); }

// Element i of the epilogue's residual, as fp32 (a bf16 value widened exactly).
inline float residual_at(const Epilogue& ep, int64_t i) {
    return ep.kind == DType::kF32 ? static_cast<const float*>(ep.res)[i]
                                  : bf16_to_f32(static_cast<const uint16_t*>(ep.res)[i]);
}

// The epilogue for one output element: every path computes fma(float(acc), sa*sw, bias) in fp32,
// then the activation.
inline void store_one(int32_t acc, const Epilogue& ep, int64_t m, int64_t n) {
    if (ep.colsum_add && (!ep.u8_rows || ep.u8_rows[m]))
        acc = int32_t(uint32_t(acc) + (uint32_t(ep.colsum_add[n]) << 7));
    if (ep.kind == DType::kI32) {
        static_cast<int32_t*>(ep.out)[m * ep.ldo + n] = acc;
        return;
    }
    float y = __builtin_fmaf(float(acc), ep.sa[m] * ep.sw[n], ep.bias ? ep.bias[n] : 0.f);
    if (ep.res) y += residual_at(ep, m * ep.ldo + n);
    store_value(act_f32(y, ep.act), ep, m, n);
}

// The weight-only epilogue (wo_gemm: fp32 sums): act(fma(acc, sw, bias)), ep.sa unused.
inline void store_one_f32(float acc, const Epilogue& ep, int64_t m, int64_t n) {
    const float y = act_f32(__builtin_fmaf(acc, ep.sw[n], ep.bias ? ep.bias[n] : 0.f), ep.act);
    store_value(y, ep, m, n);
}

}  // namespace

}  // namespace cpu
}  // namespace fastinfer
