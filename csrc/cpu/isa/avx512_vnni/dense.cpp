// AVX-512 VNNI kernels (compiled with only the AVX-512 F/BW/VL/DQ/VNNI flags).
// GEMM: C[M,N] = A_u8[M,K] @ W_s8[N,K]^T via vpdpbusd, with A stored as q + 128 and the shift
// removed in the epilogue by subtracting 128 * colsum(W). All int32 arithmetic wraps, so the result
// equals the int64 product mod 2^32 (exact whenever it fits in int32).
#include <immintrin.h>

#include <cstring>

#include "cpu/isa/avx512_vnni/avx512_inl.h"
#include "cpu/isa/avx512_vnni/kernels.h"

namespace fastinfer::cpu::avx512_vnni {
namespace {

// MR rows x NR 16-channel blocks, the whole K in registers. Small tiles (few rows: the
// memory-bound case) keep two accumulator sets, even and odd k-groups, so the vpdpbusd latency
// chain does not cap the weight stream.
template <int MR, int NR>
void micro(const Activations& a, const PackedW& w, const Epilogue& ep, int64_t m, int64_t nb) {
    constexpr int S = MR * NR <= 8 ? 2 : 1;
    __m512i acc[S][MR][NR];
    _Pragma("GCC unroll 32") for (int s = 0; s < S; ++s)
        _Pragma("GCC unroll 32") for (int i = 0; i < MR; ++i)
            _Pragma("GCC unroll 32") for (int j = 0; j < NR; ++j) acc[s][i][j] = _mm512_setzero_si512();
    const int8_t* wp[NR];
    _Pragma("GCC unroll 32") for (int j = 0; j < NR; ++j) wp[j] = w.data + (nb + j) * kNBlock * w.kp;
    const int8_t* ap[MR];
    _Pragma("GCC unroll 32") for (int i = 0; i < MR; ++i) ap[i] = a.q + (m + i) * a.ldq;
    const int64_t groups = (a.k_used ? a.k_used : w.kp) / 4;  // a multiple of 2, so of S
    for (int64_t g = 0; g < groups; g += S) {
        _Pragma("GCC unroll 32") for (int s = 0; s < S; ++s) {
            __m512i wv[NR];
            _Pragma("GCC unroll 32") for (int j = 0; j < NR; ++j) wv[j] = _mm512_load_si512(wp[j] + (g + s) * 64);
            _Pragma("GCC unroll 32") for (int i = 0; i < MR; ++i) {
                int32_t a4;
                std::memcpy(&a4, ap[i] + (g + s) * 4, 4);
                const __m512i av = _mm512_set1_epi32(a4);
                _Pragma("GCC unroll 32") for (int j = 0; j < NR; ++j) dpbusd(acc[s][i][j], av, wv[j]);
            }
        }
    }
    alignas(64) __m512i sums[MR * NR];
    _Pragma("GCC unroll 32") for (int i = 0; i < MR; ++i)
        _Pragma("GCC unroll 32") for (int j = 0; j < NR; ++j) {
            __m512i t = acc[0][i][j];
            if constexpr (S == 2) t = _mm512_add_epi32(t, acc[S - 1][i][j]);
            sums[i * NR + j] = t;
        }
    store_tile(sums, MR, NR, w.n, w.colsum, ep, m, nb * kNBlock);
}

template <int NR>
void rows(const Activations& a, const PackedW& w, const Epilogue& ep, int64_t m0, int64_t m1, int64_t nb) {
    constexpr int kMR = 6;
    int64_t m = m0;
    for (; m + kMR <= m1; m += kMR) micro<kMR, NR>(a, w, ep, m, nb);
    switch (m1 - m) {
        case 5: micro<5, NR>(a, w, ep, m, nb); break;
        case 4: micro<4, NR>(a, w, ep, m, nb); break;
        case 3: micro<3, NR>(a, w, ep, m, nb); break;
        case 2: micro<2, NR>(a, w, ep, m, nb); break;
        case 1: micro<1, NR>(a, w, ep, m, nb); break;
        default: break;
    }
}

}  // namespace

namespace {

// 16 values from x + off (fp32 or bf16 widened), all lanes or those in mk.
template <DType DT>
inline __m512 load16(const void* x, int64_t off) {
    if constexpr (DT == DType::kF32) return _mm512_loadu_ps(static_cast<const float*>(x) + off);
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(x) + off));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// quantize_rows for one input dtype. The range pass takes the integer max of the |x| bit patterns
// (finite |x| order as their bits do; Inf and NaN lie above every finite pattern), so one
// comparison at the end finds a non-finite row; full vectors run unmasked, the tail masked once.
template <DType DT>
void quantize_rows_as(const void* x, int64_t ldx, int64_t m0, int64_t m1, int64_t k, int8_t* q, int64_t ldq,
                      int64_t kp, float* scale, bool shift_u8) {
    const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
    const uint8_t bias = shift_u8 ? 0x80 : 0;
    const __m128i flip = _mm_set1_epi8(char(bias));
    const size_t elt = DT == DType::kF32 ? 4 : 2;
    const int64_t kf = k & ~int64_t(15);  // whole vectors
    const __mmask16 tail = tail_mask(k - kf);
    for (int64_t m = m0; m < m1; ++m) {
        const int64_t row = m * ldx;
        if (m + 4 < m1) {  // rows stream from memory (a conv's pixels, a long batch of tokens): prefetch ahead
            const char* next = static_cast<const char*>(x) + size_t(row + 4 * ldx) * elt;
            for (size_t off = 0; off < size_t(k) * elt && off < 4096; off += 64) _mm_prefetch(next + off, _MM_HINT_T0);
        }
        __m512i m0v = _mm512_setzero_si512(), m1v = _mm512_setzero_si512();
        int64_t i = 0;
        for (; i + 32 <= kf; i += 32) {
            m0v = _mm512_max_epu32(m0v, _mm512_and_si512(_mm512_castps_si512(load16<DT>(x, row + i)), abs_mask));
            m1v = _mm512_max_epu32(m1v, _mm512_and_si512(_mm512_castps_si512(load16<DT>(x, row + i + 16)), abs_mask));
        }
        if (i < kf) m0v = _mm512_max_epu32(m0v, _mm512_and_si512(_mm512_castps_si512(load16<DT>(x, row + i)), abs_mask));
        if (tail)
            m1v = _mm512_max_epu32(m1v, _mm512_and_si512(_mm512_castps_si512(load_x16(x, DT, row + kf, tail)), abs_mask));
        const uint32_t bits = uint32_t(_mm512_reduce_max_epu32(_mm512_max_epu32(m0v, m1v)));
        const bool bad = bits >= 0x7f800000u;  // Inf or NaN
        float amax;
        std::memcpy(&amax, &bits, 4);
        const float inv = 127.f / amax;
        int8_t* qr = q + m * ldq;
        if (bad || amax == 0.f || !(inv < __builtin_inff())) {
            scale[m] = bad ? __builtin_nanf("") : 0.f;
            std::memset(qr, bias, size_t(kp));
            continue;
        }
        scale[m] = amax / 127.f;
        const __m512 vinv = _mm512_set1_ps(inv);
        auto quant = [&](__m512 v) {
            const __m512i r = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v, vinv)), lo), hi);
            return _mm_xor_si128(_mm512_cvtepi32_epi8(r), flip);
        };
        for (i = 0; i < kf; i += 16)
            _mm_storeu_si128(reinterpret_cast<__m128i*>(qr + i), quant(load16<DT>(x, row + i)));
        if (tail) _mm_mask_storeu_epi8(qr + kf, tail, quant(load_x16(x, DT, row + kf, tail)));
        std::memset(qr + k, bias, size_t(kp - k));
    }
}

}  // namespace

void quantize_rows(const void* x, DType dt, int64_t ldx, int64_t m0, int64_t m1, int64_t k,
                   int8_t* q, int64_t ldq, int64_t kp, float* scale, bool shift_u8) {
    if (dt == DType::kF32) quantize_rows_as<DType::kF32>(x, ldx, m0, m1, k, q, ldq, kp, scale, shift_u8);
    else quantize_rows_as<DType::kBF16>(x, ldx, m0, m1, k, q, ldq, kp, scale, shift_u8);
}

namespace {

template <DType DT>
void quantize_static_as(const void* x, int64_t ldx, int64_t m0, int64_t m1, int64_t k, float inv, float s, int8_t* q,
                        int64_t ldq, int64_t kp, float* scale, bool shift_u8) {
    const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
    const __m512 vinv = _mm512_set1_ps(inv);
    const __m512 lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
    const uint8_t bias = shift_u8 ? 0x80 : 0;
    const __m128i flip = _mm_set1_epi8(char(bias));
    const size_t elt = DT == DType::kF32 ? 4 : 2;
    const int64_t kf = k & ~int64_t(15);  // whole vectors, unmasked; the tail masked once
    const __mmask16 tail = tail_mask(k - kf);
    for (int64_t m = m0; m < m1; ++m) {
        const int64_t row = m * ldx;
        if (m + 2 < m1) {  // rows streaming from memory: the whole row two ahead prefetched (one pass
                           // of loads, converts and stores keeps fewer loads in flight than a max pass)
            const char* next = static_cast<const char*>(x) + size_t(row + 2 * ldx) * elt;
            for (size_t off = 0; off < size_t(k) * elt; off += 64) _mm_prefetch(next + off, _MM_HINT_T0);
        }
        int8_t* qr = q + m * ldq;
        // the largest |x| bit pattern: at or above Inf's, the row holds Inf or NaN (as in quantize_rows)
        __m512i big = _mm512_setzero_si512();
        auto quant = [&](__m512 v) {
            big = _mm512_max_epu32(big, _mm512_and_si512(_mm512_castps_si512(v), abs_mask));
            // clamped in float first: past the calibrated range x * inv may leave int32 (cvt's INT_MIN)
            const __m512 y = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(v, vinv), lo), hi);
            return _mm_xor_si128(_mm512_cvtepi32_epi8(_mm512_cvtps_epi32(y)), flip);
        };
        for (int64_t i = 0; i < kf; i += 16)  // one pass: no range to find first
            _mm_storeu_si128(reinterpret_cast<__m128i*>(qr + i), quant(load16<DT>(x, row + i)));
        if (tail) _mm_mask_storeu_epi8(qr + kf, tail, quant(load_x16(x, DT, row + kf, tail)));
        std::memset(qr + k, bias, size_t(kp - k));
        const bool bad = uint32_t(_mm512_reduce_max_epu32(big)) >= 0x7f800000u;
        scale[m] = bad ? __builtin_nanf("") : s;
        if (bad) std::memset(qr, bias, size_t(kp));
    }
}

}  // namespace

void quantize_static(const void* x, DType dt, int64_t ldx, int64_t m0, int64_t m1, int64_t k, float inv, float s,
                     int8_t* q, int64_t ldq, int64_t kp, float* scale, bool shift_u8) {
    if (dt == DType::kF32) quantize_static_as<DType::kF32>(x, ldx, m0, m1, k, inv, s, q, ldq, kp, scale, shift_u8);
    else quantize_static_as<DType::kBF16>(x, ldx, m0, m1, k, inv, s, q, ldq, kp, scale, shift_u8);
}

void gemm(const Activations& a, const PackedW& w, const Epilogue& ep, int64_t m0, int64_t m1,
          int64_t nb0, int64_t nb1) {
    for (int64_t nb = nb0; nb < nb1; nb += 4) {
        switch (std::min<int64_t>(4, nb1 - nb)) {
            case 4: rows<4>(a, w, ep, m0, m1, nb); break;
            case 3: rows<3>(a, w, ep, m0, m1, nb); break;
            case 2: rows<2>(a, w, ep, m0, m1, nb); break;
            default: rows<1>(a, w, ep, m0, m1, nb); break;
        }
    }
    if (ep.stream) _mm_sfence();  // the non-temporal stores visible before the task ends
}

}  // namespace fastinfer::cpu::avx512_vnni

namespace fastinfer::cpu::avx512_vnni {
namespace {

// The 16 int32 lanes summed in int64. Not _mm512_reduce_add_epi32: GCC's ends in a scalar int add,
// signed overflow (UB, reported by UBSan) once a probe's checksum passes 2^31.
int64_t sum_lanes_i64(__m512i v) {
    alignas(64) int32_t l[16];
    _mm512_store_si512(l, v);
    int64_t r = 0;
    for (int32_t x : l) r += x;
    return r;
}

}  // namespace

// Ceiling probe: 24 independent vpdpbusd chains on registers (no memory). Returns a checksum so the
// loop is not optimized away; it performs iters * 24 * 64 multiply-adds.
int64_t dot_peak(int64_t iters) {
    __m512i acc[24];
    _Pragma("GCC unroll 32") for (int i = 0; i < 24; ++i) acc[i] = _mm512_set1_epi32(i);
    const __m512i a = _mm512_set1_epi8(1), b = _mm512_set1_epi8(-1);
    for (int64_t t = 0; t < iters; ++t) {
        _Pragma("GCC unroll 32") for (int i = 0; i < 24; ++i) dpbusd(acc[i], a, b);
    }
    __m512i s = acc[0];
    _Pragma("GCC unroll 32") for (int i = 1; i < 24; ++i) s = _mm512_add_epi32(s, acc[i]);
    return sum_lanes_i64(s);
}

// Read-bandwidth probe: sums n bytes (n a multiple of 256, p 64-byte aligned) as int32 lanes, in
// four concurrent streams (one per quarter), the access pattern of the GEMM's 4-block panels.
int64_t read_sum(const uint8_t* p, int64_t n) {
    const int64_t q = n / 4 / 64 * 64;
    __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
    for (int64_t i = 0; i < q; i += 64) {
        s0 = _mm512_add_epi32(s0, _mm512_load_si512(p + i));
        s1 = _mm512_add_epi32(s1, _mm512_load_si512(p + q + i));
        s2 = _mm512_add_epi32(s2, _mm512_load_si512(p + 2 * q + i));
        s3 = _mm512_add_epi32(s3, _mm512_load_si512(p + 3 * q + i));
    }
    return sum_lanes_i64(_mm512_add_epi32(_mm512_add_epi32(s0, s1), _mm512_add_epi32(s2, s3)));
}

}  // namespace fastinfer::cpu::avx512_vnni

// Weight-only int8: fp32 FMA on the K4N16 weight, one chain per output in k order (ref::wo_gemm's).
namespace fastinfer::cpu::avx512_vnni {
namespace {

// Byte t (0..3) of every dword of v, sign-extended, as fp32 (exact: |value| <= 128).
inline __m512 byte_f32(__m512i v, int t) {
    return _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, unsigned(24 - 8 * t)), 24));
}

// act(fma(acc, sw, bias)) for channels [n0, n0 + 16) of row m (those < n): store_one_f32's operations.
inline void store_cols_f32(__m512 acc, int64_t n, const Epilogue& ep, int64_t m, int64_t n0) {
    const __mmask16 mk = tail_mask(n - n0);
    const __m512 b = ep.bias ? _mm512_maskz_loadu_ps(mk, ep.bias + n0) : _mm512_setzero_ps();
    store_x16(ep, m * ep.ldo + n0, mk, act16(_mm512_fmadd_ps(acc, _mm512_maskz_loadu_ps(mk, ep.sw + n0), b), ep.act), false);
}

// MR rows x NR 16-channel blocks. Each k-group's 64 weight bytes per block are widened once (4 x 16
// floats) and used by MR rows; the weight streams are prefetched 16 groups (1 KiB) ahead.
template <int MR, int NR>
void wo_micro(const float* x, int64_t ldx, const PackedW& w, const Epilogue& ep, int64_t m, int64_t nb) {
    __m512 acc[MR][NR];
    _Pragma("GCC unroll 32") for (int i = 0; i < MR; ++i)
        _Pragma("GCC unroll 32") for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
    const int8_t* wp[NR];
    _Pragma("GCC unroll 32") for (int j = 0; j < NR; ++j) wp[j] = w.data + (nb + j) * kNBlock * w.kp;
    const float* xp[MR];
    _Pragma("GCC unroll 32") for (int i = 0; i < MR; ++i) xp[i] = x + (m + i) * ldx;
    auto group = [&](int64_t g, int kk_end) {
        __m512i wv[NR];
        _Pragma("GCC unroll 32") for (int j = 0; j < NR; ++j) {
            wv[j] = _mm512_load_si512(wp[j] + g * 64);
            _mm_prefetch(reinterpret_cast<const char*>(wp[j] + (g + 16) * 64), _MM_HINT_T0);
        }
        _Pragma("GCC unroll 4") for (int t = 0; t < kk_end; ++t) {
            __m512 wf[NR];
            _Pragma("GCC unroll 32") for (int j = 0; j < NR; ++j) wf[j] = byte_f32(wv[j], t);
            _Pragma("GCC unroll 32") for (int i = 0; i < MR; ++i) {
                const __m512 xb = _mm512_set1_ps(xp[i][4 * g + t]);
                _Pragma("GCC unroll 32") for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_ps(xb, wf[j], acc[i][j]);
            }
        }
    };
    const int64_t full = w.k / 4;
    for (int64_t g = 0; g < full; ++g) group(g, 4);
    if (w.k % 4) group(full, int(w.k % 4));  // x is never read past k
    _Pragma("GCC unroll 32") for (int i = 0; i < MR; ++i)
        _Pragma("GCC unroll 32") for (int j = 0; j < NR; ++j) {
            const int64_t n0 = (nb + j) * kNBlock;
            if (n0 < w.n) store_cols_f32(acc[i][j], w.n, ep, m + i, n0);
        }
}

template <int NR>
void wo_rows(const float* x, int64_t ldx, const PackedW& w, const Epilogue& ep, int64_t m0, int64_t m1, int64_t nb) {
    int64_t m = m0;
    for (; m + 4 <= m1; m += 4) wo_micro<4, NR>(x, ldx, w, ep, m, nb);
    switch (m1 - m) {
        case 3: wo_micro<3, NR>(x, ldx, w, ep, m, nb); break;
        case 2: wo_micro<2, NR>(x, ldx, w, ep, m, nb); break;
        case 1: wo_micro<1, NR>(x, ldx, w, ep, m, nb); break;
        default: break;
    }
}

}  // namespace

void wo_gemm(const float* x, int64_t ldx, const PackedW& w, const Epilogue& ep, int64_t m0, int64_t m1,
             int64_t nb0, int64_t nb1) {
    for (int64_t nb = nb0; nb < nb1;) {
        const int64_t left = nb1 - nb;
        if (m1 - m0 == 1 && left >= 8) {  // one row: 8 independent FMA chains hide the latency
            wo_micro<1, 8>(x, ldx, w, ep, m0, nb);
            nb += 8;
        } else if (left >= 4) {
            wo_rows<4>(x, ldx, w, ep, m0, m1, nb);
            nb += 4;
        } else if (left >= 2) {
            wo_rows<2>(x, ldx, w, ep, m0, m1, nb);
            nb += 2;
        } else {
            wo_rows<1>(x, ldx, w, ep, m0, m1, nb);
            nb += 1;
        }
    }
}

}  // namespace fastinfer::cpu::avx512_vnni
