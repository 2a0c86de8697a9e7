// Attention on bf16 q, k, v with vdpbf16ps: each instruction multiplies 16 lanes of bf16 pairs and
// adds both products to fp32 sums, half the instructions of widening to fp32 and FMA. Pairs run
// along the head dimension for q.k^T (K^T packed as [d/2][keys] dwords of two bf16: a 16x16 dword
// transpose) and along the keys for P.V (V packed as [keys/2][dv] dwords, P rounded to bf16 in
// place); scores, softmax and the 1/sum scaling stay fp32 (attention_inl.h). fp32 inputs take it
// when the call asks for bf16 arithmetic (AttentionArgs::bf16_math: rounded to bf16 as they are
// loaded), else avx512_vnni::attention, as decoding (fewer than 4 query rows) does.
#include "cpu/isa/avx512_bf16/kernels.h"
#include "cpu/isa/avx512_vnni/attention_inl.h"
#include "cpu/isa/avx512_vnni/kernels.h"

namespace fastinfer::cpu::avx512_bf16 {

namespace {

inline __mmask32 lanes32(int64_t n) { return n >= 32 ? ~__mmask32(0) : n <= 0 ? __mmask32(0) : __mmask32((1u << n) - 1); }

inline __m512 dot2(__m512 acc, __m512i a, __m512i b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }

// The elements [0, n) of a row from element off on, as 16 dwords of bf16 pairs from pair c0 on (zero
// past n: an odd head size pairs its last element with 0); fp32 rows rounded to bf16 (nearest even).
inline __m512i load_pairs(const void* base, DType dt, int64_t off, int64_t n, int64_t c0) {
    if (dt == DType::kF32) {
        const float* p = static_cast<const float*>(base) + off + 2 * c0;
        const __m512 lo = _mm512_maskz_loadu_ps(lanes(n - 2 * c0), p);
        const __m512 hi = _mm512_maskz_loadu_ps(lanes(n - 2 * c0 - 16), p + 16);
        return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
    }
    return _mm512_maskz_loadu_epi16(lanes32(n - 2 * c0), static_cast<const uint16_t*>(base) + off + 2 * c0);
}

// 16 values of a row (those in mk) as bf16 in the low halves of 16 dwords.
inline __m512i load_bf16_dwords(const void* base, DType dt, int64_t off, __mmask16 mk) {
    if (dt == DType::kF32)
        return _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mk, static_cast<const float*>(base) + off)));
    return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, static_cast<const uint16_t*>(base) + off));
}

// kt2[c][j] = dims (2c, 2c + 1) of key j, c < d2 = ceil(d / 2), keys [0, round_up(lk, 16)) (zero past lk).
inline void pack_key_pairs(const AttentionArgs& a, int64_t kb, int64_t lk, int64_t d2, uint32_t* kt2, int64_t lkp) {
    __m512 r[16];
    for (int64_t j0 = 0; j0 < lk; j0 += 16) {
        for (int64_t j = j0 + 16; j < std::min(lk, j0 + 32); ++j) prefetch_row(a.k, a.dt, kb + j * a.k_sl, a.d);
        for (int64_t c0 = 0; c0 < d2; c0 += 16) {
            for (int i = 0; i < 16; ++i)
                r[i] = j0 + i < lk ? _mm512_castsi512_ps(load_pairs(a.k, a.dt, kb + (j0 + i) * a.k_sl, a.d, c0)) : _mm512_setzero_ps();
            transpose16(r);
            for (int64_t c = 0; c < std::min<int64_t>(16, d2 - c0); ++c)
                _mm512_store_ps(reinterpret_cast<float*>(kt2 + (c0 + c) * lkp + j0), r[c]);
        }
    }
}

// v2[j'][c] = (v[2j'][c], v[2j' + 1][c]) for key pairs j' < ceil(lk / 2) (a missing odd key is 0), c < dvp.
inline void pack_value_pairs(const AttentionArgs& a, int64_t vb, int64_t lk, uint32_t* v2, int64_t dvp) {
    for (int64_t j = 0; j < lk; j += 2) {
        for (int64_t t = j + 2; t < std::min(lk, j + 2 + kAhead); ++t) prefetch_row(a.v, a.dt, vb + t * a.v_sl, a.dv);
        for (int64_t c0 = 0; c0 < dvp; c0 += 16) {
            const __mmask16 mk = lanes(a.dv - c0);
            const __m512i lo = load_bf16_dwords(a.v, a.dt, vb + j * a.v_sl + c0, mk);
            const __m512i hi = j + 1 < lk ? load_bf16_dwords(a.v, a.dt, vb + (j + 1) * a.v_sl + c0, mk)
                                          : _mm512_setzero_si512();  // fmt: skip
            _mm512_store_si512(v2 + j / 2 * dvp + c0, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
        }
    }
}

// Two rows of the 4 x 64 score tile, one k-step: a{r}{v} += bcast(q{r}) . k{v}, each query pair
// broadcast by the instruction itself (one load per product row, the key vectors in registers).
#define FASTINFER_DOT_2X4(a0, a1, a2, a3, b0, b1, b2, b3, qa, qb)                                                   \
    __asm__("vdpbf16ps %[q0]%{1to16%}, %[k0], %[x0]\n\tvdpbf16ps %[q0]%{1to16%}, %[k1], %[x1]\n\t"                   \
            "vdpbf16ps %[q0]%{1to16%}, %[k2], %[x2]\n\tvdpbf16ps %[q0]%{1to16%}, %[k3], %[x3]\n\t"                   \
            "vdpbf16ps %[q1]%{1to16%}, %[k0], %[y0]\n\tvdpbf16ps %[q1]%{1to16%}, %[k1], %[y1]\n\t"                   \
            "vdpbf16ps %[q1]%{1to16%}, %[k2], %[y2]\n\tvdpbf16ps %[q1]%{1to16%}, %[k3], %[y3]"                         \
            : [x0] "+v"(a0), [x1] "+v"(a1), [x2] "+v"(a2), [x3] "+v"(a3), [y0] "+v"(b0), [y1] "+v"(b1),              \
              [y2] "+v"(b2), [y3] "+v"(b3)                                                                         \
            : [k0] "v"(k0), [k1] "v"(k1), [k2] "v"(k2), [k3] "v"(k3), [q0] "m"(qa), [q1] "m"(qb))

// s[r][j0, j0 + 16 NV) = finished scores (attention_inl.h) of query pair rows q2[r] and K^T pairs.
template <int R, int NV, int Kind>
inline void score_tile(const uint32_t* q2, int64_t dp2, const uint32_t* kt2, int64_t lkp, int64_t d2, int64_t j0, float* s,
                       const AttentionArgs& a, ScoreRow* rows) {
    __m512 acc[R][NV];
    const uint32_t* kp = kt2 + j0;
    if constexpr (R == 4 && NV == 4) {
        // the full tile in named registers (an array indexed around asm statements lives in memory);
        // with the intrinsic GCC reloaded the four key vectors for every row: 20 loads per 16 products
        const __m512 z = _mm512_setzero_ps();
        __m512 a00 = z, a01 = z, a02 = z, a03 = z, a10 = z, a11 = z, a12 = z, a13 = z;
        __m512 a20 = z, a21 = z, a22 = z, a23 = z, a30 = z, a31 = z, a32 = z, a33 = z;
        for (int64_t c = 0; c < d2; ++c, kp += lkp) {
            const __m512i k0 = _mm512_load_si512(kp), k1 = _mm512_load_si512(kp + 16);
            const __m512i k2 = _mm512_load_si512(kp + 32), k3 = _mm512_load_si512(kp + 48);
            const uint32_t* q = q2 + c;
            FASTINFER_DOT_2X4(a00, a01, a02, a03, a10, a11, a12, a13, q[0], q[dp2]);
            FASTINFER_DOT_2X4(a20, a21, a22, a23, a30, a31, a32, a33, q[2 * dp2], q[3 * dp2]);
        }
        const __m512 t[4][4] = {{a00, a01, a02, a03}, {a10, a11, a12, a13}, {a20, a21, a22, a23}, {a30, a31, a32, a33}};
        for (int r = 0; r < 4; ++r)
            for (int v = 0; v < 4; ++v) acc[r][v] = t[r][v];
    } else {
        for (int r = 0; r < R; ++r)
            for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
        for (int64_t c = 0; c < d2; ++c, kp += lkp) {
            __m512i kv[NV];
            for (int v = 0; v < NV; ++v) kv[v] = _mm512_load_si512(kp + 16 * v);
            for (int r = 0; r < R; ++r) {
                const __m512i qb = _mm512_set1_epi32(int(q2[r * dp2 + c]));
                for (int v = 0; v < NV; ++v) acc[r][v] = dot2(acc[r][v], qb, kv[v]);
            }
        }
    }
    finish_tile<R, NV, Kind>(acc, a, rows, j0, s, lkp);
}
#undef FASTINFER_DOT_2X4

// Calls f(std::integral_constant<int, n>) for n in [1, 8].
template <class F>
inline void upto8(int64_t n, F&& f) {
    if (n <= 4) return upto4(n, f);
    switch (n) {
        case 5: f(std::integral_constant<int, 5>{}); break;
        case 6: f(std::integral_constant<int, 6>{}); break;
        case 7: f(std::integral_constant<int, 7>{}); break;
        default: f(std::integral_constant<int, 8>{}); break;
    }
}

// out[r][c0 ...] = inv[r] * sum over key pairs j' < jn2 of p2[r][j'] . v2[j'][c0 ...]; p2 rows are
// the score rows rewritten as bf16 pairs (row stride lkp dwords).
template <int R, int NV>
inline void value_tile(const uint32_t* p2, int64_t lkp, const uint32_t* v2, int64_t dvp, int64_t jn2, int64_t c0,
                       const float* inv, const AttentionArgs& a, int64_t obase, int64_t i0) {
    __m512 acc[R][NV];
    for (int r = 0; r < R; ++r)
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
    const uint32_t* vr = v2 + c0;
    for (int64_t j = 0; j < jn2; ++j, vr += dvp) {
        __m512i vv[NV];
        for (int v = 0; v < NV; ++v) vv[v] = _mm512_load_si512(vr + 16 * v);
        for (int r = 0; r < R; ++r) {
            const __m512i pb = _mm512_set1_epi32(int(p2[r * lkp + j]));
            for (int v = 0; v < NV; ++v) acc[r][v] = dot2(acc[r][v], pb, vv[v]);
        }
    }
    for (int r = 0; r < R; ++r) store_out<NV>(acc[r], inv[r], a, obase + (i0 + r) * a.o_sl, c0);
}

}  // namespace

void attention(const AttentionArgs& a, int64_t bh, int64_t q0, int64_t q1, float* scratch) {
    if ((a.dt != DType::kBF16 && !a.bf16_math) || a.lq < kDirectRows) return avx512_vnni::attention(a, bh, q0, q1, scratch);
    const int64_t b = bh / a.heads, h = bh % a.heads, hk = h / (a.heads / a.kv_heads);
    const AttentionLayout l = attention_layout(a);
    // the fp32 layout's areas hold the pair layouts: K^T pairs [d2][lkp] in K^T's, V pairs
    // [ceil(lk / 2)][dvp] in V's, query pairs [4][dp2] in the query rows'
    const int64_t d2 = (a.d + 1) / 2, dp2 = round_up(d2, 16), lkp = l.lkp;
    uint32_t* kt2 = reinterpret_cast<uint32_t*>(scratch + l.kt);
    uint32_t* v2 = reinterpret_cast<uint32_t*>(scratch + l.v);
    uint32_t* q2 = reinterpret_cast<uint32_t*>(scratch + l.q);
    float* s = scratch + l.s;
    const int64_t lk = a.causal ? std::min(a.lk, q1) : a.lk;
    const int64_t kb = b * a.k_sb + hk * a.k_sh, vb = b * a.v_sb + hk * a.v_sh;
    for (int64_t i = q0; i < std::min(q1, q0 + 4); ++i) prefetch_row(a.q, a.dt, b * a.q_sb + h * a.q_sh + i * a.q_sl, a.d);
    pack_key_pairs(a, kb, lk, d2, kt2, lkp);
    pack_value_pairs(a, vb, lk, v2, l.dvp);

    const int64_t obase = b * a.o_sb + h * a.o_sh;
    // Query rows per P.V tile: the tile holds rows x ceil(dv / 16) sums. Head sizes up to 32 take 8
    // rows (16 sums; with 4 rows the 8 vdpbf16ps chains waited on each other's latency), larger 4.
    // The scores and numerators are made 4 rows at a time, into the block's rows of s.
    const int64_t block = a.dv <= 32 ? 8 : 4;
    for (int64_t i0 = q0; i0 < q1; i0 += block) {
        const int64_t rows = std::min<int64_t>(block, q1 - i0);
        const int64_t jn = a.causal ? std::min(a.lk, i0 + rows) : a.lk;
        float inv[8];
        for (int64_t g = 0; g < rows; g += 4) {
            const int64_t ig = i0 + g, gr = std::min<int64_t>(4, rows - g);
            for (int64_t r = 0; r < gr; ++r)
                for (int64_t c0 = 0; c0 < dp2; c0 += 16)
                    _mm512_store_si512(q2 + r * dp2 + c0, load_pairs(a.q, a.dt, b * a.q_sb + h * a.q_sh + (ig + r) * a.q_sl, a.d, c0));
            for (int64_t i = ig + 4; i < std::min(q1, ig + 8); ++i)  // the next rows
                prefetch_row(a.q, a.dt, b * a.q_sb + h * a.q_sh + i * a.q_sl, a.d);
            float* sg = s + g * lkp;
            upto4(gr, [&](auto R) {
                ScoreRow sr[R];
                score_pass<R>(a, b, h, ig, jn, sr, [&](auto K, auto NV, int64_t j0) { score_tile<R, NV, K>(q2, dp2, kt2, lkp, d2, j0, sg, a, sr); });
                for (int64_t r = 0; r < R; ++r) {
                    // the numerators rounded to bf16 over the row's own floats: keys [j, j + 16) go
                    // to bytes [2j, 2j + 32), below the floats still to be read; keys past jn are
                    // zero, so an odd jn's last pair is (p, 0)
                    float* sp = sg + r * lkp;
                    uint16_t* p16 = reinterpret_cast<uint16_t*>(sp);
                    inv[g + r] = softmax_exp<true>(sp, round_up(jn, 16), sr[r], [&](int64_t j, __m512 e) {
                        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p16 + j), (__m256i)_mm512_cvtneps_pbh(e));
                    });
                }
            });
        }
        const uint32_t* p2 = reinterpret_cast<const uint32_t*>(s);
        if (block == 8) {  // dv <= 32: one tile of one or two vectors
            upto8(rows, [&](auto R) {
                if (a.dv > 16) value_tile<R, 2>(p2, lkp, v2, l.dvp, (jn + 1) / 2, 0, inv, a, obase, i0);
                else value_tile<R, 1>(p2, lkp, v2, l.dvp, (jn + 1) / 2, 0, inv, a, obase, i0);
            });
        } else {
            upto4(rows, [&](auto R) {
                for (int64_t c0 = 0; c0 < a.dv; c0 += 64)
                    upto4((std::min<int64_t>(64, a.dv - c0) + 15) / 16,
                          [&](auto NV) { value_tile<R, NV>(p2, lkp, v2, l.dvp, (jn + 1) / 2, c0, inv, a, obase, i0); });
            });
        }
    }
}

}  // namespace fastinfer::cpu::avx512_bf16
