// LayerNorm on AVX-512 (kernel_table.h, LayerNormArgs) for the translation units that build it:
// avx512_vnni/norm.cpp, and avx512_bf16/norm.cpp, where the same code compiled with AVX512_BF16
// rounds bf16 outputs with vcvtneps2bf16 (avx512_inl.h's to_bf16; the same bits). The reference's
// operations in the same order, 16 lanes at a time: four accumulators hold the 64 partial sums, the
// row is read three times (sum, squares, output) from L1. Whole vectors run unmasked; the tail is
// masked once.
#pragma once

#include <immintrin.h>

#include <cmath>

#include "cpu/dispatch/kernel_table.h"
#include "cpu/isa/avx512_vnni/avx512_inl.h"

namespace fastinfer::cpu {
namespace {

// layer_norm_sum of the partials held in acc[j] lane l (= partial 16 j + l).
inline float sum64(const __m512* acc) {
    const __m512 s = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1));
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}

template <DType DT>
inline __m512 ld(const void* x, int64_t off) {
    if constexpr (DT == DType::kF32) return _mm512_loadu_ps(static_cast<const float*>(x) + off);
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(x) + off));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <DType DT, bool W, bool B>
void rows(const LayerNormArgs& a, int64_t m0, int64_t m1) {
    const int64_t h = a.h, hf = h & ~int64_t(15);
    const __mmask16 tail = tail_mask(h - hf);
    const float* w = static_cast<const float*>(a.w);
    const float* b = static_cast<const float*>(a.b);
    constexpr int64_t elt = DT == DType::kF32 ? 4 : 2;
    for (int64_t m = m0; m < m1; ++m) {
        const int64_t row = m * a.ldx;
        if (m + 2 < m1) {  // rows stream in from the layer before: prefetch two ahead
            const char* next = static_cast<const char*>(a.x) + (row + 2 * a.ldx) * elt;
            for (int64_t off = 0; off < h * elt; off += 64) _mm_prefetch(next + off, _MM_HINT_T0);
        }
        __m512 acc[4];
        for (auto& v : acc) v = _mm512_setzero_ps();
        int64_t i = 0;
        for (; i + 64 <= hf; i += 64)
            for (int j = 0; j < 4; ++j) acc[j] = _mm512_add_ps(acc[j], ld<DT>(a.x, row + i + 16 * j));
        for (int j = 0; i < hf; i += 16, ++j) acc[j] = _mm512_add_ps(acc[j], ld<DT>(a.x, row + i));
        if (tail) acc[(hf / 16) & 3] = _mm512_add_ps(acc[(hf / 16) & 3], load_x16(a.x, DT, row + hf, tail));
        const float mean = sum64(acc) / float(h);
        const __m512 vmean = _mm512_set1_ps(mean);
        for (auto& v : acc) v = _mm512_setzero_ps();
        for (i = 0; i + 64 <= hf; i += 64)
            for (int j = 0; j < 4; ++j) {
                const __m512 d = _mm512_sub_ps(ld<DT>(a.x, row + i + 16 * j), vmean);
                acc[j] = _mm512_fmadd_ps(d, d, acc[j]);
            }
        for (int j = 0; i < hf; i += 16, ++j) {
            const __m512 d = _mm512_sub_ps(ld<DT>(a.x, row + i), vmean);
            acc[j] = _mm512_fmadd_ps(d, d, acc[j]);
        }
        if (tail) {  // masked lanes: (0 - mean) zeroed, so they add +0 where the reference adds nothing
            const __m512 d = _mm512_maskz_sub_ps(tail, load_x16(a.x, DT, row + hf, tail), vmean);
            acc[(hf / 16) & 3] = _mm512_fmadd_ps(d, d, acc[(hf / 16) & 3]);
        }
        const float rstd = 1.f / std::sqrt(sum64(acc) / float(h) + a.eps);
        const __m512 vrstd = _mm512_set1_ps(rstd);
        auto out = [&](__m512 x, int64_t c, __mmask16 mk) {
            __m512 y = _mm512_mul_ps(_mm512_sub_ps(x, vmean), vrstd);
            if constexpr (W && B) y = _mm512_fmadd_ps(y, _mm512_maskz_loadu_ps(mk, w + c), _mm512_maskz_loadu_ps(mk, b + c));
            else if constexpr (W) y = _mm512_mul_ps(y, _mm512_maskz_loadu_ps(mk, w + c));
            else if constexpr (B) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mk, b + c));
            if constexpr (DT == DType::kF32) _mm512_mask_storeu_ps(static_cast<float*>(a.out) + m * a.ldo + c, mk, y);
            else _mm256_mask_storeu_epi16(static_cast<uint16_t*>(a.out) + m * a.ldo + c, mk, to_bf16(y));
        };
        for (i = 0; i < hf; i += 16) out(ld<DT>(a.x, row + i), i, 0xffff);
        if (tail) out(load_x16(a.x, DT, row + hf, tail), hf, tail);
    }
}

template <DType DT>
void rows_dt(const LayerNormArgs& a, int64_t m0, int64_t m1) {
    if (a.w && a.b) rows<DT, true, true>(a, m0, m1);
    else if (a.w) rows<DT, true, false>(a, m0, m1);
    else if (a.b) rows<DT, false, true>(a, m0, m1);
    else rows<DT, false, false>(a, m0, m1);
}

// The kernel (LayerNormArgs) for rows [m0, m1).
inline void layer_norm_rows(const LayerNormArgs& a, int64_t m0, int64_t m1) {
    if (a.dt == DType::kF32) rows_dt<DType::kF32>(a, m0, m1);
    else rows_dt<DType::kBF16>(a, m0, m1);
}

}  // namespace
}  // namespace fastinfer::cpu
