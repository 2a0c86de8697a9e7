// AVX2 kernels (compiled with only -mavx2 -mfma -mf16c).
// GEMM without VNNI: int8 is widened to int16 and multiplied with vpmaddwd (pairs of s16*s16 summed
// into int32: at most 2*128*128 = 32768, never saturating, unlike vpmaddubsw on u8 data).
#include <immintrin.h>

#include <cmath>
#include <cstdlib>
#include <cstring>

#include "cpu/isa/avx2/kernels.h"
#include "cpu/isa/ref/kernels.h"

namespace fastinfer::cpu::avx2 {
namespace {

inline __m256 load_x8(const void* x, DType dt, int64_t off) {
    if (dt == DType::kF32) return _mm256_loadu_ps(static_cast<const float*>(x) + off);
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + off));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline float load_x1(const void* x, DType dt, int64_t off) {
    if (dt == DType::kF32) return static_cast<const float*>(x)[off];
    return bf16_to_f32(static_cast<const uint16_t*>(x)[off]);
}

inline __m128i to_bf16(__m256 y) {
    __m256i u = _mm256_castps_si256(y);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    __m256i mag = _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff));
    __m256i nan = _mm256_cmpgt_epi32(mag, _mm256_set1_epi32(0x7f800000));  // mag < 2^31: signed ok
    __m256i qn = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    r = _mm256_blendv_epi8(r, qn, nan);
    // 8 x u32 (each < 2^16) -> 8 x u16
    __m256i p = _mm256_packus_epi32(r, r);
    p = _mm256_permute4x64_epi64(p, 0x08);
    return _mm256_castsi256_si128(p);
}

// gelu_f32 on 8 lanes: the same operations in the same order (common.h).
inline __m256 gelu8(__m256 y) {
    __m256 x = _mm256_mul_ps(y, _mm256_set1_ps(kSqrtHalf));
    x = _mm256_min_ps(x, _mm256_set1_ps(kErfClamp));
    x = _mm256_max_ps(x, _mm256_set1_ps(-kErfClamp));
    const __m256 x2 = _mm256_mul_ps(x, x);
    __m256 p = _mm256_fmadd_ps(x2, _mm256_set1_ps(kErfAlpha13), _mm256_set1_ps(kErfAlpha11));
    p = _mm256_fmadd_ps(x2, p, _mm256_set1_ps(kErfAlpha9));
    p = _mm256_fmadd_ps(x2, p, _mm256_set1_ps(kErfAlpha7));
    p = _mm256_fmadd_ps(x2, p, _mm256_set1_ps(kErfAlpha5));
    p = _mm256_fmadd_ps(x2, p, _mm256_set1_ps(kErfAlpha3));
    p = _mm256_fmadd_ps(x2, p, _mm256_set1_ps(kErfAlpha1));
    p = _mm256_mul_ps(x, p);
    __m256 q = _mm256_fmadd_ps(x2, _mm256_set1_ps(kErfBeta8), _mm256_set1_ps(kErfBeta6));
    q = _mm256_fmadd_ps(x2, q, _mm256_set1_ps(kErfBeta4));
    q = _mm256_fmadd_ps(x2, q, _mm256_set1_ps(kErfBeta2));
    q = _mm256_fmadd_ps(x2, q, _mm256_set1_ps(kErfBeta0));
    const __m256 h = _mm256_mul_ps(_mm256_set1_ps(0.5f), y);
    return _mm256_fmadd_ps(h, _mm256_div_ps(p, q), h);
}

// exp_f32 on 8 lanes (common.h): the same operations in the same order.
inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(kExpHi)), _mm256_set1_ps(kExpLo));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_CUR_DIRECTION);
    __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-kLn2Hi), x);
    r = _mm256_fmadd_ps(n, _mm256_set1_ps(-kLn2Lo), r);
    __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(kExpP0), r, _mm256_set1_ps(kExpP1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP5));
    __m256 y = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r);
    y = _mm256_add_ps(y, _mm256_set1_ps(1.f));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
}

// act_f32 on 8 lanes (common.h).
inline __m256 act8(__m256 y, int act) {
    const __m256 zero = _mm256_setzero_ps(), six = _mm256_set1_ps(6.f);
    switch (act) {
        case kActGelu: return gelu8(y);
        case kActRelu: return _mm256_max_ps(zero, y);
        case kActRelu6: return _mm256_min_ps(six, _mm256_max_ps(zero, y));
        case kActSilu:
            return _mm256_div_ps(y, _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(zero, y))));
        case kActHardswish: {
            const __m256 t = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(y, _mm256_set1_ps(3.f)), zero), six);
            return _mm256_div_ps(_mm256_mul_ps(y, t), six);
        }
        case kActGeluTanh: {
            const __m256 t = _mm256_fmadd_ps(_mm256_mul_ps(y, y), _mm256_set1_ps(kGeluTanhK1), _mm256_set1_ps(kGeluTanhK0));
            return _mm256_div_ps(y, _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_mul_ps(y, t))));
        }
        default: return y;
    }
}

// f32_to_u8 on 8 lanes, in the low 8 bytes.
inline __m128i to_u8(__m256 y) {
    __m256 t = _mm256_max_ps(_mm256_mul_ps(y, _mm256_set1_ps(kU8Inv)), _mm256_setzero_ps());
    t = _mm256_min_ps(t, _mm256_set1_ps(254.f));
    __m256i q = _mm256_cvtps_epi32(t);
    q = _mm256_blendv_epi8(q, _mm256_set1_epi32(kU8NaN), _mm256_castps_si256(_mm256_cmp_ps(y, y, _CMP_UNORD_Q)));
    const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));  // 0..255 fit
    return _mm_packus_epi16(w, w);
}

// 8 consecutive channels of one row; n0 + 8 <= N.
inline void store8(__m256i acc, const Epilogue& ep, int64_t m, int64_t n0) {
    if (ep.colsum_add && (!ep.u8_rows || ep.u8_rows[m]))
        acc = _mm256_add_epi32(
            acc, _mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ep.colsum_add + n0)), 7));
    if (ep.kind == DType::kI32) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<int32_t*>(ep.out) + m * ep.ldo + n0), acc);
        return;
    }
    __m256 s = _mm256_mul_ps(_mm256_set1_ps(ep.sa[m]), _mm256_loadu_ps(ep.sw + n0));
    __m256 b = ep.bias ? _mm256_loadu_ps(ep.bias + n0) : _mm256_setzero_ps();
    __m256 y = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), s, b);
    if (ep.res) {  // 8 residual values of the output's kind, widened to fp32
        const int64_t off = m * ep.ldo + n0;
        y = _mm256_add_ps(y, ep.kind == DType::kF32
                                 ? _mm256_loadu_ps(static_cast<const float*>(ep.res) + off)
                                 : _mm256_castsi256_ps(_mm256_slli_epi32(
                                       _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(
                                           static_cast<const uint16_t*>(ep.res) + off))), 16)));
    }
    y = act8(y, ep.act);
    if (ep.kind == DType::kF32)
        _mm256_storeu_ps(static_cast<float*>(ep.out) + m * ep.ldo + n0, y);
    else if (ep.kind == DType::kU8)
        _mm_storel_epi64(reinterpret_cast<__m128i*>(static_cast<uint8_t*>(ep.out) + m * ep.ldo + n0), to_u8(y));
    else
        _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(ep.out) + m * ep.ldo + n0), to_bf16(y));
}

// acc_lo holds (c0k01 c0k23 c1k01 c1k23 | c2.. c3..), acc_hi the same for c4..c7: sum the pairs.
inline __m256i reduce_pairs(__m256i lo, __m256i hi) {
    return _mm256_permute4x64_epi64(_mm256_hadd_epi32(lo, hi), 0xd8);
}

// acc += madd(a, w) as one asm block: GCC 12 otherwise renames every accumulator through an extra
// register move and spills one of them per iteration.
inline void madd_acc(__m256i& acc, __m256i a, __m256i w) {
    __m256i t;
    __asm__("vpmaddwd %[w], %[a], %[t]\n\tvpaddd %[t], %[acc], %[acc]"
            : [acc] "+x"(acc), [t] "=&x"(t)
            : [a] "x"(a), [w] "x"(w));
}

// MR rows x 8 channels (two 4-channel quarters of a 16-channel block), the whole K in registers.
// A arrives widened to int16 (a16, row stride lda16), so a group of 4 k is one 8-byte broadcast
// load; only W needs a widening shuffle, shared by MR rows. 2*MR accumulators + 2 W + 1 A <= 16 ymm.
template <int MR>
void micro(const int16_t* a16, int64_t lda16, const PackedW& w, const Epilogue& ep, int64_t m,
           int64_t nb, int half) {
    __m256i acc[MR][2];
    _Pragma("GCC unroll 32")
    for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
    const int8_t* wp = w.data + nb * kNBlock * w.kp + 32 * half;
    const int16_t* ap = a16 + m * lda16;
    const int64_t groups = w.kp / 4;
    for (int64_t g = 0; g < groups; ++g) {
        const __m256i w0 = _mm256_cvtepi8_epi16(_mm_load_si128(reinterpret_cast<const __m128i*>(wp + g * 64)));
        const __m256i w1 = _mm256_cvtepi8_epi16(_mm_load_si128(reinterpret_cast<const __m128i*>(wp + g * 64 + 16)));
        _Pragma("GCC unroll 32")
        for (int i = 0; i < MR; ++i) {
            int64_t a4;
            std::memcpy(&a4, ap + i * lda16 + g * 4, 8);
            const __m256i av = _mm256_set1_epi64x(a4);
            madd_acc(acc[i][0], av, w0);
            madd_acc(acc[i][1], av, w1);
        }
    }
    const int64_t nh = nb * kNBlock + 8 * half;
    _Pragma("GCC unroll 32")
    for (int i = 0; i < MR; ++i) {
        const __m256i c = reduce_pairs(acc[i][0], acc[i][1]);
        if (nh + 8 <= w.n) {
            store8(c, ep, m + i, nh);
        } else {
            alignas(32) int32_t tmp[8];
            _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), c);
            for (int64_t t = 0; t < 8 && nh + t < w.n; ++t) store_one(tmp[t], ep, m + i, nh + t);
        }
    }
}

template <int MR>
void micro_rows(const int16_t* a16, int64_t lda16, const PackedW& w, const Epilogue& ep, int64_t m,
                int64_t nb) {
    for (int half = 0; half < 2; ++half)
        if (nb * kNBlock + 8 * half < w.n) micro<MR>(a16, lda16, w, ep, m, nb, half);
}

// Per-thread buffer of activations widened to int16 (reused across calls).
struct Widened {
    int16_t* p = nullptr;
    size_t cap = 0;
    ~Widened() { std::free(p); }
    int16_t* get(size_t n) {
        if (n > cap) {
            std::free(p);
            p = static_cast<int16_t*>(std::aligned_alloc(64, (n * 2 + 63) / 64 * 64));
            cap = p ? n : 0;
        }
        return p;
    }
};
thread_local Widened t_widened;

}  // namespace

void quantize_rows(const void* x, DType dt, int64_t ldx, int64_t m0, int64_t m1, int64_t k,
                   int8_t* q, int64_t ldq, int64_t kp, float* scale, bool shift_u8) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 inf = _mm256_set1_ps(__builtin_inff());
    const uint8_t bias = shift_u8 ? 0x80 : 0;
    for (int64_t m = m0; m < m1; ++m) {
        const int64_t row = m * ldx;
        __m256 vmax = _mm256_setzero_ps(), vbad = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= k; i += 8) {
            __m256 v = _mm256_and_ps(load_x8(x, dt, row + i), abs_mask);
            vbad = _mm256_or_ps(vbad, _mm256_cmp_ps(v, inf, _CMP_NLT_UQ));
            vmax = _mm256_max_ps(vmax, v);
        }
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, vmax);
        float amax = 0.f;
        for (float l : lanes) amax = std::fmax(amax, l);
        bool bad = _mm256_movemask_ps(vbad) != 0;
        for (; i < k; ++i) {
            float v = std::fabs(load_x1(x, dt, row + i));
            if (!std::isfinite(v)) bad = true;
            amax = std::fmax(amax, v);
        }
        const float inv = 127.f / amax;
        int8_t* qr = q + m * ldq;
        if (bad || amax == 0.f || !std::isfinite(inv)) {
            scale[m] = bad ? NAN : 0.f;
            std::memset(qr, bias, size_t(kp));
            continue;
        }
        scale[m] = amax / 127.f;
        const __m256 vinv = _mm256_set1_ps(inv);
        const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
        i = 0;
        for (; i + 8 <= k; i += 8) {
            __m256i r = _mm256_cvtps_epi32(_mm256_mul_ps(load_x8(x, dt, row + i), vinv));
            r = _mm256_min_epi32(_mm256_max_epi32(r, lo), hi);
            __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(r, r), _mm256_setzero_si256());
            uint32_t b0 = uint32_t(_mm256_extract_epi32(p, 0)) ^ (0x01010101u * bias);
            uint32_t b1 = uint32_t(_mm256_extract_epi32(p, 4)) ^ (0x01010101u * bias);
            std::memcpy(qr + i, &b0, 4);
            std::memcpy(qr + i + 4, &b1, 4);
        }
        for (; i < k; ++i) {
            float r = std::fmin(127.f, std::fmax(-127.f, std::nearbyint(load_x1(x, dt, row + i) * inv)));
            qr[i] = int8_t(uint8_t(int(r)) ^ bias);
        }
        std::memset(qr + k, bias, size_t(kp - k));
    }
}

void quantize_static(const void* x, DType dt, int64_t ldx, int64_t m0, int64_t m1, int64_t k, float inv, float s,
                     int8_t* q, int64_t ldq, int64_t kp, float* scale, bool shift_u8) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 inf = _mm256_set1_ps(__builtin_inff());
    const __m256 vinv = _mm256_set1_ps(inv);
    const __m256 lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
    const uint8_t bias = shift_u8 ? 0x80 : 0;
    for (int64_t m = m0; m < m1; ++m) {
        const int64_t row = m * ldx;
        int8_t* qr = q + m * ldq;
        __m256 vbad = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= k; i += 8) {
            const __m256 v = load_x8(x, dt, row + i);
            vbad = _mm256_or_ps(vbad, _mm256_cmp_ps(_mm256_and_ps(v, abs_mask), inf, _CMP_NLT_UQ));
            // clamped in float first: past the calibrated range x * inv may leave int32 (cvt's INT_MIN)
            const __m256i r = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(v, vinv), lo), hi));
            __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(r, r), _mm256_setzero_si256());
            uint32_t b0 = uint32_t(_mm256_extract_epi32(p, 0)) ^ (0x01010101u * bias);
            uint32_t b1 = uint32_t(_mm256_extract_epi32(p, 4)) ^ (0x01010101u * bias);
            std::memcpy(qr + i, &b0, 4);
            std::memcpy(qr + i + 4, &b1, 4);
        }
        bool bad = _mm256_movemask_ps(vbad) != 0;
        for (; i < k; ++i) {
            const float v = load_x1(x, dt, row + i);
            if (!std::isfinite(v)) bad = true;
            const float r = std::nearbyint(std::fmin(127.f, std::fmax(-127.f, v * inv)));
            qr[i] = int8_t(uint8_t(int(r)) ^ bias);
        }
        std::memset(qr + k, bias, size_t(kp - k));
        scale[m] = bad ? NAN : s;
        if (bad) std::memset(qr, bias, size_t(kp));
    }
}

void gemm(const Activations& a, const PackedW& w, const Epilogue& ep, int64_t m0, int64_t m1,
          int64_t nb0, int64_t nb1) {
    // Widen this task's rows once (m1 - m0 rows of kp bytes: ~1/(4 * channels) of the multiply work).
    const int64_t rows = m1 - m0, kp = w.kp;
    int16_t* a16 = t_widened.get(size_t(rows * kp));
    if (!a16) {  // no memory for the scratch: fall back to the portable kernel (same results)
        ref::gemm(a, w, ep, m0, m1, nb0, nb1);
        return;
    }
    for (int64_t r = 0; r < rows; ++r) {
        const int8_t* src = a.q + (m0 + r) * a.ldq;
        int16_t* dst = a16 + r * kp;
        for (int64_t c = 0; c < kp; c += 16)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c),
                                _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + c))));
    }
    const int16_t* base = a16 - m0 * kp;  // index rows by their absolute m
    constexpr int kMR = 6;
    for (int64_t nb = nb0; nb < nb1; ++nb) {
        int64_t m = m0;
        for (; m + kMR <= m1; m += kMR) micro_rows<kMR>(base, kp, w, ep, m, nb);
        switch (m1 - m) {
            case 5: micro_rows<5>(base, kp, w, ep, m, nb); break;
            case 4: micro_rows<4>(base, kp, w, ep, m, nb); break;
            case 3: micro_rows<3>(base, kp, w, ep, m, nb); break;
            case 2: micro_rows<2>(base, kp, w, ep, m, nb); break;
            case 1: micro_rows<1>(base, kp, w, ep, m, nb); break;
            default: break;
        }
    }
}

}  // namespace fastinfer::cpu::avx2

namespace fastinfer::cpu::avx2 {

// Ceiling probe: 12 independent vpmaddwd+vpaddd chains on registers: iters * 12 * 16 multiply-adds.
int64_t dot_peak(int64_t iters) {
    __m256i acc[12];
    _Pragma("GCC unroll 32") for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_epi32(i);
    const __m256i a = _mm256_set1_epi16(1), b = _mm256_set1_epi16(-1);
    for (int64_t t = 0; t < iters; ++t) {
        _Pragma("GCC unroll 32") for (int i = 0; i < 12; ++i) madd_acc(acc[i], a, b);
    }
    __m256i s = acc[0];
    _Pragma("GCC unroll 32") for (int i = 1; i < 12; ++i) s = _mm256_add_epi32(s, acc[i]);
    alignas(32) int32_t l[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(l), s);
    int64_t r = 0;
    for (int32_t v : l) r += v;
    return r;
}

}  // namespace fastinfer::cpu::avx2

// Weight-only int8: fp32 FMA on the K4N16 weight, one chain per output in k order (ref::wo_gemm's).
namespace fastinfer::cpu::avx2 {
namespace {

// Byte t (0..3) of every dword of v, sign-extended, as fp32.
inline __m256 byte_f32(__m256i v, int t) {
    return _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 24 - 8 * t), 24));
}

// MR rows x NH 8-channel halves of blocks (half h: block nb + h / 2, channels 8 * (h % 2) ...).
template <int MR, int NH>
void wo_micro(const float* x, int64_t ldx, const PackedW& w, const Epilogue& ep, int64_t m, int64_t h0) {
    __m256 acc[MR][NH];
    _Pragma("GCC unroll 32") for (int i = 0; i < MR; ++i)
        _Pragma("GCC unroll 32") for (int j = 0; j < NH; ++j) acc[i][j] = _mm256_setzero_ps();
    const int8_t* wp[NH];
    _Pragma("GCC unroll 32") for (int j = 0; j < NH; ++j)
        wp[j] = w.data + (h0 + j) / 2 * kNBlock * w.kp + 32 * ((h0 + j) % 2);
    const float* xp[MR];
    _Pragma("GCC unroll 32") for (int i = 0; i < MR; ++i) xp[i] = x + (m + i) * ldx;
    auto group = [&](int64_t g, int kk_end) {
        _Pragma("GCC unroll 4") for (int t = 0; t < kk_end; ++t) {
            __m256 xb[MR];
            _Pragma("GCC unroll 32") for (int i = 0; i < MR; ++i) xb[i] = _mm256_set1_ps(xp[i][4 * g + t]);
            _Pragma("GCC unroll 32") for (int j = 0; j < NH; ++j) {
                const __m256 wf = byte_f32(_mm256_load_si256(reinterpret_cast<const __m256i*>(wp[j] + g * 64)), t);
                _Pragma("GCC unroll 32") for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_fmadd_ps(xb[i], wf, acc[i][j]);
            }
        }
    };
    const int64_t full = w.k / 4;
    for (int64_t g = 0; g < full; ++g) group(g, 4);
    if (w.k % 4) group(full, int(w.k % 4));
    _Pragma("GCC unroll 32") for (int i = 0; i < MR; ++i)
        _Pragma("GCC unroll 32") for (int j = 0; j < NH; ++j) {
            const int64_t n0 = (h0 + j) * 8;
            if (n0 >= w.n) continue;
            if (n0 + 8 <= w.n) {
                const __m256 b = ep.bias ? _mm256_loadu_ps(ep.bias + n0) : _mm256_setzero_ps();
                const __m256 y = act8(_mm256_fmadd_ps(acc[i][j], _mm256_loadu_ps(ep.sw + n0), b), ep.act);
                if (ep.kind == DType::kF32)
                    _mm256_storeu_ps(static_cast<float*>(ep.out) + (m + i) * ep.ldo + n0, y);
                else
                    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(ep.out) + (m + i) * ep.ldo + n0),
                                     to_bf16(y));
            } else {
                alignas(32) float tmp[8];
                _mm256_store_ps(tmp, acc[i][j]);
                for (int64_t t = 0; n0 + t < w.n; ++t) store_one_f32(tmp[t], ep, m + i, n0 + t);
            }
        }
}

}  // namespace

void wo_gemm(const float* x, int64_t ldx, const PackedW& w, const Epilogue& ep, int64_t m0, int64_t m1,
             int64_t nb0, int64_t nb1) {
    const int64_t h1 = 2 * nb1;
    for (int64_t h = 2 * nb0; h < h1;) {
        const int64_t left = h1 - h;
        int64_t m = m0;
        if (m1 - m0 == 1 && left >= 8) {
            wo_micro<1, 8>(x, ldx, w, ep, m, h);
            h += 8;
            continue;
        }
        const int nh = left >= 4 ? 4 : left >= 2 ? 2 : 1;
        for (; m < m1; m += 2) {
            const bool two = m + 2 <= m1;
            if (nh == 4) two ? wo_micro<2, 4>(x, ldx, w, ep, m, h) : wo_micro<1, 4>(x, ldx, w, ep, m, h);
            else if (nh == 2) two ? wo_micro<2, 2>(x, ldx, w, ep, m, h) : wo_micro<1, 2>(x, ldx, w, ep, m, h);
            else two ? wo_micro<2, 1>(x, ldx, w, ep, m, h) : wo_micro<1, 1>(x, ldx, w, ep, m, h);
        }
        h += nh;
    }
}

}  // namespace fastinfer::cpu::avx2
