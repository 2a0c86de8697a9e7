// Inline helpers of the AVX-512 attention kernels (avx512_vnni/attention.cpp, fp32 FMA, and
// avx512_bf16/attention.cpp, vdpbf16ps): AVX-512 translation units only, each gets its own copy.
#pragma once

#include <algorithm>
#include <type_traits>

#include "cpu/dispatch/kernel_table.h"
#include "cpu/isa/avx512_vnni/avx512_inl.h"

namespace fastinfer::cpu {
namespace {

// The rows of q, k and v sit far apart (heads interleaved in [batch][tokens][heads * d] activations)
// and the hardware prefetcher does not follow them: rows are fetched this many ahead.
constexpr int64_t kAhead = 6;
// Problems with fewer query rows read k and v in place (attention_direct) instead of packing them.
constexpr int64_t kDirectRows = 4;

inline void prefetch_row(const void* base, DType dt, int64_t off, int64_t n) {
    const size_t elt = dt == DType::kF32 ? 4 : 2;
    const char* p = static_cast<const char*>(base) + size_t(off) * elt;
    for (size_t b = 0; b < size_t(n) * elt; b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
}

// Lanes [0, n) of a 16-lane step (none for n <= 0).
inline __mmask16 lanes(int64_t n) { return n >= 16 ? __mmask16(0xffff) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1); }

// dst[0, np) = row[0, n) widened to fp32, zero past n (dst 64-byte aligned, np a multiple of 16).
inline void widen_row(const void* src, DType dt, int64_t off, int64_t n, float* dst, int64_t np) {
    for (int64_t c = 0; c < np; c += 16) _mm512_store_ps(dst + c, load_x16(src, dt, off + c, lanes(n - c)));
}

// Calls f(std::integral_constant<int, n>) for n in [1, 4].
template <class F>
inline void upto4(int64_t n, F&& f) {
    switch (n) {
        case 1: f(std::integral_constant<int, 1>{}); break;
        case 2: f(std::integral_constant<int, 2>{}); break;
        case 3: f(std::integral_constant<int, 3>{}); break;
        default: f(std::integral_constant<int, 4>{}); break;
    }
}

// Transposes the 16x16 fp32 block held as rows r[0..15] in place (out row c = input column c).
inline void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    __m512 u[4][4];  // u[g][c]: 128-bit lane k holds rows 4g..4g+3 of column 4k + c
    for (int g = 0; g < 4; ++g) {
        u[g][0] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], _MM_SHUFFLE(1, 0, 1, 0));
        u[g][1] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], _MM_SHUFFLE(3, 2, 3, 2));
        u[g][2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], _MM_SHUFFLE(1, 0, 1, 0));
        u[g][3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int c = 0; c < 4; ++c) {  // gather lane k of every group into output row 4k + c
        const __m512 a = _mm512_shuffle_f32x4(u[0][c], u[1][c], 0x88), b = _mm512_shuffle_f32x4(u[2][c], u[3][c], 0x88);
        const __m512 e = _mm512_shuffle_f32x4(u[0][c], u[1][c], 0xdd), f = _mm512_shuffle_f32x4(u[2][c], u[3][c], 0xdd);
        r[c] = _mm512_shuffle_f32x4(a, b, 0x88);
        r[8 + c] = _mm512_shuffle_f32x4(a, b, 0xdd);
        r[4 + c] = _mm512_shuffle_f32x4(e, f, 0x88);
        r[12 + c] = _mm512_shuffle_f32x4(e, f, 0xdd);
    }
}

// kt[c][j] = k row j, column c, for keys [0, round_up(lk, 16)) (zero past lk) and c < d, in 16x16
// blocks; rows of k start at element kb, j * k_sl apart.
inline void pack_keys_transposed(const AttentionArgs& a, int64_t kb, int64_t lk, float* kt, int64_t lkp) {
    __m512 r[16];
    for (int64_t j0 = 0; j0 < lk; j0 += 16) {
        for (int64_t j = j0 + 16; j < std::min(lk, j0 + 32); ++j) prefetch_row(a.k, a.dt, kb + j * a.k_sl, a.d);
        for (int64_t c0 = 0; c0 < a.d; c0 += 16) {
            const __mmask16 mk = lanes(a.d - c0);
            for (int i = 0; i < 16; ++i)
                r[i] = j0 + i < lk ? load_x16(a.k, a.dt, kb + (j0 + i) * a.k_sl + c0, mk) : _mm512_setzero_ps();
            transpose16(r);
            for (int64_t c = 0; c < std::min<int64_t>(16, a.d - c0); ++c) _mm512_store_ps(kt + (c0 + c) * lkp + j0, r[c]);
        }
    }
}

// Stores out[row][c0, c0 + 16 NV) = acc * inv (columns < dv only; row starts at element o).
template <int NV>
inline void store_out(const __m512* acc, float inv, const AttentionArgs& a, int64_t o, int64_t c0) {
    const __m512 s = _mm512_set1_ps(inv);
    for (int v = 0; v < NV; ++v) {
        const __mmask16 mk = lanes(a.dv - c0 - 16 * v);
        const __m512 y = _mm512_mul_ps(acc[v], s);
        if (a.dt == DType::kF32)
            _mm512_mask_storeu_ps(static_cast<float*>(a.out) + o + c0 + 16 * v, mk, y);
        else
            _mm256_mask_storeu_epi16(static_cast<uint16_t*>(a.out) + o + c0 + 16 * v, mk, to_bf16(y));
    }
}

// A query row's state across its score tiles: where its mask row starts, how many keys it has
// (causal rows fewer), the running max of its scores and the lanes that held NaN.
struct ScoreRow {
    int64_t mrow, n;
    __m512 mx;
    __mmask16 bad;
};

inline ScoreRow score_row(int64_t mrow, int64_t n) { return {mrow, n, _mm512_set1_ps(-__builtin_inff()), 0}; }

// acc = q . k for keys [j, j + 16) of row r -> times the scale, plus the mask (of kind Kind), -inf
// past the row's keys; stored at s and folded into the row's max (one pass over the scores fewer
// than scaling them after the tile). NaN or +inf under a bool mask stays in the row (torch: a NaN
// row). The mask kind is a template argument so that a tile's epilogue unrolls with its
// accumulators in registers.
template <int Kind>
__attribute__((always_inline)) inline void finish_scores(__m512 acc, const AttentionArgs& a, ScoreRow& r, int64_t j,
                                                         float* s) {
    const __m512 ninf = _mm512_set1_ps(-__builtin_inff());
    const __mmask16 mk = lanes(r.n - j);
    __m512 x = _mm512_mul_ps(acc, _mm512_set1_ps(a.scale));
    if constexpr (Kind == kMaskBool) {
        const __m128i m8 = _mm_maskz_loadu_epi8(mk, static_cast<const uint8_t*>(a.mask) + r.mrow + j);
        x = _mm512_mask_add_ps(x, _mm_cmpeq_epi8_mask(m8, _mm_setzero_si128()), x, ninf);
    } else if constexpr (Kind == kMaskF32) {
        x = _mm512_add_ps(x, load_x16(a.mask, DType::kF32, r.mrow + j, mk));
    } else if constexpr (Kind == kMaskBF16) {
        x = _mm512_add_ps(x, load_x16(a.mask, DType::kBF16, r.mrow + j, mk));
    }
    x = _mm512_mask_blend_ps(mk, ninf, x);
    _mm512_store_ps(s, x);
    r.mx = _mm512_max_ps(r.mx, x);
    r.bad |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
}

// Calls f(std::integral_constant<int, kind>) for an AttentionArgs::mask_kind.
template <class F>
inline void with_mask_kind(int kind, F&& f) {
    switch (kind) {
        case kMaskBool: f(std::integral_constant<int, kMaskBool>{}); break;
        case kMaskF32: f(std::integral_constant<int, kMaskF32>{}); break;
        case kMaskBF16: f(std::integral_constant<int, kMaskBF16>{}); break;
        default: f(std::integral_constant<int, kMaskNone>{}); break;
    }
}

// finish_scores for an R x NV register tile of keys [j0, j0 + 16 NV); row r's scores at s + r * lkp.
template <int R, int NV, int Kind>
__attribute__((always_inline)) inline void finish_tile(const __m512 (&acc)[R][NV], const AttentionArgs& a, ScoreRow* rows,
                                                       int64_t j0, float* s, int64_t lkp) {
    // unrolled whole, or acc would be indexed and so kept in memory (slower than the epilogue itself)
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) finish_scores<Kind>(acc[r][v], a, rows[r], j0 + 16 * v, s + r * lkp + j0 + 16 * v);
}

// The finished scores of query rows [i0, i0 + R) of head h of batch b over keys [0, jn): sr[r]
// set up for each row (its mask row and key count), then tile(Kind, NV, j0) for every 64 keys (NV
// vectors of 16, the last tile shorter), Kind the mask kind as a constant.
template <int R, class Tile>
inline void score_pass(const AttentionArgs& a, int64_t b, int64_t h, int64_t i0, int64_t jn, ScoreRow* sr, Tile&& tile) {
    for (int64_t r = 0; r < R; ++r)
        sr[r] = score_row(b * a.m_sb + h * a.m_sh + (i0 + r) * a.m_sl, a.causal ? std::min(a.lk, i0 + r + 1) : a.lk);
    with_mask_kind(a.mask_kind, [&](auto K) {
        for (int64_t j0 = 0; j0 < jn; j0 += 64)
            upto4((std::min<int64_t>(64, jn - j0) + 15) / 16, [&](auto NV) { tile(K, NV, j0); });
    });
}

// exp(x) for x <= 0 or -inf (a score less its row's max): exp16's range reduction and polynomial,
// 2^n applied by vscalefps (one instruction for exp16's four). Below kExpLo (masked keys, -inf)
// the result is exactly 0 (exp16 clamps there), so no lane depends on how scalef rounds subnormals.
inline __m512 exp16_nonpos(__m512 x) {
    const __mmask16 normal = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpLo), _CMP_GE_OQ);
    __m512 n;
    const __m512 y = exp16_reduced(_mm512_max_ps(x, _mm512_set1_ps(kExpLo)), &n);
    return _mm512_maskz_scalef_ps(normal, y, n);
}

// exp16_nonpos to bf16's precision, for numerators that are rounded to bf16 (the vdpbf16ps
// kernel): ln 2 in one part and a degree-3 polynomial (relative error 1.0e-4, a fortieth of bf16's
// rounding), 9 instructions instead of 16.
inline __m512 exp16_nonpos_bf16(__m512 x) {
    const __mmask16 normal = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpLo), _CMP_GE_OQ);
    x = _mm512_max_ps(x, _mm512_set1_ps(kExpLo));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_CUR_DIRECTION);
    const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693147182f), x);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.165178701f), r, _mm512_set1_ps(0.504129171f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.00019586f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_maskz_scalef_ps(normal, p, n);
}

// The softmax numerators of a row whose finished scores are s[0, jp) (jp a multiple of 16, -inf
// past its keys): store(j, e) gets exp(s - max) for keys [j, j + 16), in one pass (Bf16: the exp
// to bf16's precision); returns 1 / sum.
// A row with NaN or +inf: zeros stored, NaN returned (a NaN output row); every key masked: zeros
// and 0 (a zero row).
template <bool Bf16 = false, class Store>
inline float softmax_exp(const float* s, int64_t jp, const ScoreRow& r, Store&& store) {
    const float mx = _mm512_reduce_max_ps(r.mx);
    if (r.bad || mx == __builtin_inff() || mx == -__builtin_inff()) {
        for (int64_t j = 0; j < jp; j += 16) store(j, _mm512_setzero_ps());
        return r.bad || mx == __builtin_inff() ? __builtin_nanf("") : 0.f;
    }
    const __m512 vm = _mm512_set1_ps(mx);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < jp; j += 16) {
        const __m512 x = _mm512_sub_ps(_mm512_load_ps(s + j), vm);
        const __m512 e = Bf16 ? exp16_nonpos_bf16(x) : exp16_nonpos(x);
        store(j, e);
        sum = _mm512_add_ps(sum, e);
    }
    return 1.f / _mm512_reduce_add_ps(sum);
}

// s[r][j0, j0 + 16 NV) = finished scores q[r] . K^T[:, j0 ...] for R rows (q rows of dp floats, K^T
// rows of lkp).
template <int R, int NV, int Kind>
inline void score_tile(const float* q, int64_t dp, const float* kt, int64_t lkp, int64_t d, int64_t j0, float* s,
                       const AttentionArgs& a, ScoreRow* rows) {
    __m512 acc[R][NV];
    for (int r = 0; r < R; ++r)
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
    const float* kp = kt + j0;
    for (int64_t c = 0; c < d; ++c, kp += lkp) {
        __m512 kv[NV];
        for (int v = 0; v < NV; ++v) kv[v] = _mm512_load_ps(kp + 16 * v);
        for (int r = 0; r < R; ++r) {
            const __m512 qb = _mm512_set1_ps(q[r * dp + c]);
            for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(qb, kv[v], acc[r][v]);
        }
    }
    finish_tile<R, NV, Kind>(acc, a, rows, j0, s, lkp);
}

// out[r][c0, c0 + 16 NV) = inv[r] * sum_{j < jn} p[r][j] v[j][c0 ...] (only columns < dv stored).
template <int R, int NV>
inline void value_tile(const float* p, int64_t lkp, const float* vp, int64_t dvp, int64_t jn, int64_t c0,
                       const float* inv, const AttentionArgs& a, int64_t obase, int64_t i0) {
    __m512 acc[R][NV];
    for (int r = 0; r < R; ++r)
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
    const float* vr = vp + c0;
    for (int64_t j = 0; j < jn; ++j, vr += dvp) {
        __m512 vv[NV];
        for (int v = 0; v < NV; ++v) vv[v] = _mm512_load_ps(vr + 16 * v);
        for (int r = 0; r < R; ++r) {
            const __m512 pb = _mm512_set1_ps(p[r * lkp + j]);
            for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(pb, vv[v], acc[r][v]);
        }
    }
    for (int r = 0; r < R; ++r) store_out<NV>(acc[r], inv[r], a, obase + (i0 + r) * a.o_sl, c0);
}

// Raw scores s[0, n) of one row (anything past n) -> softmax numerators in s[0, round_up(n, 16)),
// zeros past n; returns 1 / sum (NaN for a NaN row, 0 when every key is masked): softmax_exp.
inline float softmax_row(float* s, int64_t n, const AttentionArgs& a, int64_t mrow) {
    ScoreRow r = score_row(mrow, n);
    const int64_t np = round_up(n, 16);
    with_mask_kind(a.mask_kind, [&](auto K) {
        for (int64_t j = 0; j < np; j += 16) finish_scores<K>(_mm512_load_ps(s + j), a, r, j, s + j);
    });
    return softmax_exp(s, np, r, [&](int64_t j, __m512 e) { _mm512_store_ps(s + j, e); });
}

// Few query rows (decoding: one new token over a cache): packing K^T and V would cost more than
// the rows use them, so each score is a dot product of the query with a key row as it lies, and
// the values are read in place.
inline void attention_direct(const AttentionArgs& a, int64_t b, int64_t h, int64_t hk, int64_t q0, int64_t q1,
                      float* scratch) {
    const AttentionLayout l = attention_layout(a);
    float *qs = scratch + l.q, *s = scratch + l.s;
    const int64_t kb = b * a.k_sb + hk * a.k_sh, vb = b * a.v_sb + hk * a.v_sh;
    for (int64_t i = q0; i < q1; ++i) {
        widen_row(a.q, a.dt, b * a.q_sb + h * a.q_sh + i * a.q_sl, a.d, qs, l.dp);
        const int64_t n = a.causal ? std::min(a.lk, i + 1) : a.lk;
        int64_t j = 0;
        auto key = [&](int64_t jj, int64_t c0) { return load_x16(a.k, a.dt, kb + jj * a.k_sl + c0, lanes(a.d - c0)); };
        for (; j + 4 <= n; j += 4) {
            for (int64_t t = j + 4; t < std::min(n, j + 4 + kAhead); ++t) prefetch_row(a.k, a.dt, kb + t * a.k_sl, a.d);
            __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
            for (int64_t c0 = 0; c0 < a.d; c0 += 16) {
                const __m512 qv = _mm512_load_ps(qs + c0);
                for (int t = 0; t < 4; ++t) acc[t] = _mm512_fmadd_ps(qv, key(j + t, c0), acc[t]);
            }
            for (int t = 0; t < 4; ++t) s[j + t] = _mm512_reduce_add_ps(acc[t]);
        }
        for (; j < n; ++j) {
            __m512 acc = _mm512_setzero_ps();
            for (int64_t c0 = 0; c0 < a.d; c0 += 16) acc = _mm512_fmadd_ps(_mm512_load_ps(qs + c0), key(j, c0), acc);
            s[j] = _mm512_reduce_add_ps(acc);
        }
        const float inv = softmax_row(s, n, a, b * a.m_sb + h * a.m_sh + i * a.m_sl);
        const int64_t o = b * a.o_sb + h * a.o_sh + i * a.o_sl;
        for (int64_t c0 = 0; c0 < a.dv; c0 += 64) {
            upto4((std::min<int64_t>(64, a.dv - c0) + 15) / 16, [&](auto NV) {
                __m512 acc[NV];
                for (int v = 0; v < NV; ++v) acc[v] = _mm512_setzero_ps();
                for (int64_t jj = 0; jj < n; ++jj) {
                    const __m512 p = _mm512_set1_ps(s[jj]);
                    for (int v = 0; v < NV; ++v)
                        acc[v] = _mm512_fmadd_ps(p, load_x16(a.v, a.dt, vb + jj * a.v_sl + c0 + 16 * v,
                                                             lanes(a.dv - c0 - 16 * v)), acc[v]);  // fmt: skip
                }
                store_out<NV>(acc, inv, a, o, c0);
            });
        }
    }
}

}  // namespace
}  // namespace fastinfer::cpu
