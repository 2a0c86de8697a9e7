// AVX-512 sparse kernels (same flags as the dense ones): unstructured CSR for fp32 and int8
// weights, fp32 ell, and block-sparse int8 that skips all-zero 16 x 64 tiles in the VNNI GEMM.
#include <immintrin.h>

#include <cstring>

#include "cpu/formats/sparse/block.h"
#include "cpu/formats/sparse/csr.h"
#include "cpu/formats/sparse/ell.h"
#include "cpu/isa/avx512_vnni/avx512_inl.h"
#include "cpu/isa/avx512_vnni/kernels.h"

namespace fastinfer::cpu::avx512_vnni {
namespace {

inline __m512i load_idx(const SparseView& w, int64_t j, __mmask16 mk) {
    if (w.idx_bytes == 2)
        return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, static_cast<const uint16_t*>(w.idx) + j));
    return _mm512_maskz_loadu_epi32(mk, static_cast<const int32_t*>(w.idx) + j);
}

// ---- fp32 CSR. Few rows: 16 nonzeros at a time, x gathered by column index.
template <int MR>
void csr_f32_gather(const SparseView& w, const float* x, int64_t ldx, int64_t m0, const float* bias,
                    float* out, int64_t ldo, int64_t n0, int64_t n1) {
    const auto* vals = static_cast<const float*>(w.values);
    for (int64_t n = n0; n < n1; ++n) {
        __m512 acc[MR];
        _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) acc[i] = _mm512_setzero_ps();
        const int64_t j1 = w.rowptr[n + 1];
        for (int64_t j = w.rowptr[n]; j < j1; j += 16) {
            const __mmask16 mk = tail_mask(j1 - j);
            const __m512i idx = load_idx(w, j, mk);
            const __m512 v = _mm512_maskz_loadu_ps(mk, vals + j);
            _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) {
                const __m512 xv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mk, idx, x + (m0 + i) * ldx, 4);
                acc[i] = _mm512_fmadd_ps(v, xv, acc[i]);
            }
        }
        const float b = bias ? bias[n] : 0.f;
        _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) out[(m0 + i) * ldo + n] = _mm512_reduce_add_ps(acc[i]) + b;
    }
}

// More rows: x transposed to [k][ldt]; each nonzero scales a contiguous run of 16 * MB rows.
template <int MB>
void csr_f32_t(const SparseView& w, const float* xt, int64_t ldt, int64_t m0, int64_t m1, const float* bias,
               float* out, int64_t ldo, int64_t n0, int64_t n1) {
    const auto* vals = static_cast<const float*>(w.values);
    for (int64_t n = n0; n < n1; ++n) {
        __m512 acc[MB];
        _Pragma("GCC unroll 8") for (int b = 0; b < MB; ++b) acc[b] = _mm512_setzero_ps();
        for (int64_t j = w.rowptr[n]; j < w.rowptr[n + 1]; ++j) {
            const __m512 v = _mm512_set1_ps(vals[j]);
            const float* p = xt + csr_col(w, j) * ldt + m0;
            _Pragma("GCC unroll 8") for (int b = 0; b < MB; ++b) acc[b] = _mm512_fmadd_ps(v, _mm512_loadu_ps(p + 16 * b), acc[b]);
        }
        const __m512 bv = _mm512_set1_ps(bias ? bias[n] : 0.f);
        alignas(64) float tmp[16 * MB];
        _Pragma("GCC unroll 8") for (int b = 0; b < MB; ++b) _mm512_store_ps(tmp + 16 * b, _mm512_add_ps(acc[b], bv));
        for (int64_t r = 0; r < m1 - m0; ++r) out[(m0 + r) * ldo + n] = tmp[r];
    }
}

// ---- int8 CSR. q32 dwords hold uint16(int16(q)): vpmaddwd against the sign-extended weight gives
// q * w exactly (the upper halves multiply to 0), summed in int32.
template <int MR>
void csr_i8_gather(const SparseView& w, const int32_t* q32, int64_t ldq, int64_t m0, const Epilogue& ep,
                   int64_t n0, int64_t n1) {
    const auto* vals = static_cast<const int8_t*>(w.values);
    for (int64_t n = n0; n < n1; ++n) {
        __m512i acc[MR];
        _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) acc[i] = _mm512_setzero_si512();
        const int64_t j1 = w.rowptr[n + 1];
        for (int64_t j = w.rowptr[n]; j < j1; j += 16) {
            const __mmask16 mk = tail_mask(j1 - j);
            const __m512i idx = load_idx(w, j, mk);
            const __m512i v = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mk, vals + j));
            _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) {
                const __m512i xv = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mk, idx, q32 + (m0 + i) * ldq, 4);
                acc[i] = _mm512_add_epi32(acc[i], _mm512_madd_epi16(xv, v));
            }
        }
        _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) store_one(reduce_add_wrap_epi32(acc[i]), ep, m0 + i, n);
    }
}

template <int MB>
void csr_i8_t(const SparseView& w, const int32_t* qt, int64_t ldt, int64_t m0, int64_t m1, const Epilogue& ep,
              int64_t n0, int64_t n1) {
    const auto* vals = static_cast<const int8_t*>(w.values);
    for (int64_t n = n0; n < n1; ++n) {
        __m512i acc[MB];
        _Pragma("GCC unroll 8") for (int b = 0; b < MB; ++b) acc[b] = _mm512_setzero_si512();
        for (int64_t j = w.rowptr[n]; j < w.rowptr[n + 1]; ++j) {
            const __m512i v = _mm512_set1_epi32(int32_t(vals[j]));
            const int32_t* p = qt + csr_col(w, j) * ldt + m0;
            _Pragma("GCC unroll 8") for (int b = 0; b < MB; ++b)
                acc[b] = _mm512_add_epi32(acc[b], _mm512_madd_epi16(_mm512_loadu_si512(p + 16 * b), v));
        }
        alignas(64) int32_t tmp[16 * MB];
        _Pragma("GCC unroll 8") for (int b = 0; b < MB; ++b) _mm512_store_si512(tmp + 16 * b, acc[b]);
        for (int64_t r = 0; r < m1 - m0; ++r) store_one(tmp[r], ep, m0 + r, n);
    }
}

// ---- block-sparse int8: MR rows x one 16-channel block, only its nonzero 16 x 64 tiles.
template <int MR>
void block_micro(const Activations& a, const SparseView& w, const Epilogue& ep, int64_t m, int64_t nb) {
    constexpr int S = MR <= 4 ? 2 : 1;
    __m512i acc[S][MR];
    _Pragma("GCC unroll 32") for (int s = 0; s < S; ++s)
        _Pragma("GCC unroll 32") for (int i = 0; i < MR; ++i) acc[s][i] = _mm512_setzero_si512();
    const int8_t* ap[MR];
    _Pragma("GCC unroll 32") for (int i = 0; i < MR; ++i) ap[i] = a.q + (m + i) * a.ldq;
    for (int64_t t = w.tileptr[nb]; t < w.tileptr[nb + 1]; ++t) {
        const int8_t* wt = w.tiles + t * (kNBlock * kTileK);
        const int64_t k0 = int64_t(w.tilek[t]) * kTileK;
        _Pragma("GCC unroll 16") for (int g = 0; g < kTileK / 4; g += S) {
            _Pragma("GCC unroll 2") for (int s = 0; s < S; ++s) {
                const __m512i wv = _mm512_load_si512(wt + (g + s) * 64);
                _Pragma("GCC unroll 32") for (int i = 0; i < MR; ++i) {
                    int32_t a4;
                    std::memcpy(&a4, ap[i] + k0 + (g + s) * 4, 4);
                    dpbusd(acc[s][i], _mm512_set1_epi32(a4), wv);
                }
            }
        }
    }
    _Pragma("GCC unroll 32") for (int i = 0; i < MR; ++i) {
        __m512i r = acc[0][i];
        if constexpr (S == 2) r = _mm512_add_epi32(r, acc[1][i]);
        store_cols(r, w.n, w.colsum, ep, m + i, nb * kNBlock);
    }
}

// MR rows x 4 16-channel blocks whose nonzero tiles sit at the same k positions (what pruning
// with 64-row blocks produces): the dense kernel's 6 x 4 register tile over the shared tiles only.
template <int MR>
void block_micro4(const Activations& a, const SparseView& w, const Epilogue& ep, int64_t m, int64_t nb) {
    __m512i acc[MR][4];
    _Pragma("GCC unroll 32") for (int i = 0; i < MR; ++i)
        _Pragma("GCC unroll 4") for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_si512();
    const int8_t* ap[MR];
    _Pragma("GCC unroll 32") for (int i = 0; i < MR; ++i) ap[i] = a.q + (m + i) * a.ldq;
    const int64_t count = w.tileptr[nb + 1] - w.tileptr[nb];
    for (int64_t tt = 0; tt < count; ++tt) {
        const int8_t* wt[4];
        _Pragma("GCC unroll 4") for (int j = 0; j < 4; ++j) wt[j] = w.tiles + (w.tileptr[nb + j] + tt) * (kNBlock * kTileK);
        const int64_t k0 = int64_t(w.tilek[w.tileptr[nb] + tt]) * kTileK;
        for (int g = 0; g < kTileK / 4; ++g) {
            __m512i wv[4];
            _Pragma("GCC unroll 4") for (int j = 0; j < 4; ++j) wv[j] = _mm512_load_si512(wt[j] + g * 64);
            _Pragma("GCC unroll 32") for (int i = 0; i < MR; ++i) {
                int32_t a4;
                std::memcpy(&a4, ap[i] + k0 + g * 4, 4);
                const __m512i av = _mm512_set1_epi32(a4);
                _Pragma("GCC unroll 4") for (int j = 0; j < 4; ++j) dpbusd(acc[i][j], av, wv[j]);
            }
        }
    }
    _Pragma("GCC unroll 32") for (int i = 0; i < MR; ++i)
        _Pragma("GCC unroll 4") for (int j = 0; j < 4; ++j) store_cols(acc[i][j], w.n, w.colsum, ep, m + i, (nb + j) * kNBlock);
}

// True when blocks nb..nb+3 list the same k-tiles.
bool same_tiles4(const SparseView& w, int64_t nb) {
    const int64_t t0 = w.tileptr[nb], count = w.tileptr[nb + 1] - t0;
    for (int j = 1; j < 4; ++j) {
        const int64_t tj = w.tileptr[nb + j];
        if (w.tileptr[nb + j + 1] - tj != count) return false;
        for (int64_t t = 0; t < count; ++t)
            if (w.tilek[tj + t] != w.tilek[t0 + t]) return false;
    }
    return true;
}

// ---- fp32 ell: MR rows x one 16-channel block. Per 80-byte step: the window start and the lanes
// holding a value come from the index bytes' top bits, two vpermi2ps pick the 16 activations from
// the row's four window registers (idx bit 5 chooses the pair), a masked FMA adds them (padding
// lanes are never multiplied). ~4 cycles a step even from L1 (the index decoding and two 2-source
// permutes), so unlike the int8 kernels a software prefetch gains nothing here.
template <int MR>
void ell_f32_micro(const SparseView& w, const float* xp, int64_t ldp, int64_t m, int64_t nb, const float* bias,
                   float* out, int64_t ldo) {
    __m512 acc[2][MR];
    _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) acc[0][i] = acc[1][i] = _mm512_setzero_ps();
    const float* rows[MR];
    _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) rows[i] = xp + (m + i) * ldp;
    const __m128i valid_bit = _mm_set1_epi8(0x40);
    const __m128i pair_bit = _mm_set1_epi8(32);
    auto step = [&](int64_t t, __m512* acc_set) {
        const uint8_t* st = w.steps + t * kEllF32Step;
        const __m128i idx8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(st + 64));
        const int64_t base = int64_t(uint16_t(_mm_movepi8_mask(idx8))) * kEllF32Align;
        const __mmask16 valid = _mm_test_epi8_mask(idx8, valid_bit);
        const __m512i idx = _mm512_cvtepu8_epi32(idx8);
        const __mmask16 upper = _mm_test_epi8_mask(idx8, pair_bit);
        const __m512 vals = _mm512_loadu_ps(reinterpret_cast<const float*>(st));
        _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) {
            const float* x = rows[i] + base;
            const __m512 lo = _mm512_permutex2var_ps(_mm512_load_ps(x), idx, _mm512_load_ps(x + 16));
            const __m512 hi = _mm512_permutex2var_ps(_mm512_load_ps(x + 32), idx, _mm512_load_ps(x + 48));
            acc_set[i] = _mm512_mask3_fmadd_ps(vals, _mm512_mask_blend_ps(upper, lo, hi), acc_set[i], valid);
        }
    };
    if (w.ell_paired) {
        // Pairs of steps share a window: each row's four window registers are loaded once per pair.
        for (int64_t t = w.stepptr[nb]; t < w.stepptr[nb + 1]; t += 2) {
            const uint8_t* st = w.steps + t * kEllF32Step;
            const __m128i i0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(st + 64));
            const __m128i i1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(st + kEllF32Step + 64));
            const int64_t base = int64_t(uint16_t(_mm_movepi8_mask(i0))) * kEllF32Align;
            const __mmask16 valid0 = _mm_test_epi8_mask(i0, valid_bit), valid1 = _mm_test_epi8_mask(i1, valid_bit);
            const __mmask16 upper0 = _mm_test_epi8_mask(i0, pair_bit), upper1 = _mm_test_epi8_mask(i1, pair_bit);
            const __m512i idx0 = _mm512_cvtepu8_epi32(i0), idx1 = _mm512_cvtepu8_epi32(i1);
            const __m512 vals0 = _mm512_loadu_ps(reinterpret_cast<const float*>(st));
            const __m512 vals1 = _mm512_loadu_ps(reinterpret_cast<const float*>(st + kEllF32Step));
            _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) {
                const float* x = rows[i] + base;
                const __m512 x0 = _mm512_load_ps(x), x1 = _mm512_load_ps(x + 16);
                const __m512 x2 = _mm512_load_ps(x + 32), x3 = _mm512_load_ps(x + 48);
                const __m512 g0 = _mm512_mask_blend_ps(upper0, _mm512_permutex2var_ps(x0, idx0, x1),
                                                       _mm512_permutex2var_ps(x2, idx0, x3));
                const __m512 g1 = _mm512_mask_blend_ps(upper1, _mm512_permutex2var_ps(x0, idx1, x1),
                                                       _mm512_permutex2var_ps(x2, idx1, x3));
                acc[0][i] = _mm512_mask3_fmadd_ps(vals0, g0, acc[0][i], valid0);
                acc[1][i] = _mm512_mask3_fmadd_ps(vals1, g1, acc[1][i], valid1);
            }
        }
    } else {
        alternating_steps(w.stepptr[nb], w.stepptr[nb + 1], step, acc[0], acc[1]);
    }
    const int64_t n0 = nb * kNBlock;
    const __mmask16 mk = tail_mask(w.n - n0);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mk, bias + n0) : _mm512_setzero_ps();
    _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i)
        _mm512_mask_storeu_ps(out + (m + i) * ldo + n0, mk, _mm512_add_ps(_mm512_add_ps(acc[0][i], acc[1][i]), b));
}

}  // namespace

void csr_f32(const SparseView& w, const float* x, int64_t ldx, const float* xt, int64_t ldt, int64_t m0,
             int64_t m1, const float* bias, float* out, int64_t ldo, int64_t n0, int64_t n1) {
    if (xt) {
        for (int64_t m = m0; m < m1; m += 64) {
            const int64_t e = std::min<int64_t>(m1, m + 64);
            switch ((e - m + 15) / 16) {
                case 1: csr_f32_t<1>(w, xt, ldt, m, e, bias, out, ldo, n0, n1); break;
                case 2: csr_f32_t<2>(w, xt, ldt, m, e, bias, out, ldo, n0, n1); break;
                case 3: csr_f32_t<3>(w, xt, ldt, m, e, bias, out, ldo, n0, n1); break;
                default: csr_f32_t<4>(w, xt, ldt, m, e, bias, out, ldo, n0, n1); break;
            }
        }
        return;
    }
    int64_t m = m0;
    for (; m + 4 <= m1; m += 4) csr_f32_gather<4>(w, x, ldx, m, bias, out, ldo, n0, n1);
    switch (m1 - m) {
        case 3: csr_f32_gather<3>(w, x, ldx, m, bias, out, ldo, n0, n1); break;
        case 2: csr_f32_gather<2>(w, x, ldx, m, bias, out, ldo, n0, n1); break;
        case 1: csr_f32_gather<1>(w, x, ldx, m, bias, out, ldo, n0, n1); break;
        default: break;
    }
}

void csr_i8(const SparseView& w, const CsrI8Act& a, int64_t m0, int64_t m1, const Epilogue& ep, int64_t n0,
            int64_t n1) {
    const auto* q32 = static_cast<const int32_t*>(a.q);
    const int64_t ldq = a.ld;
    if (a.transposed) {
        for (int64_t m = m0; m < m1; m += 64) {
            const int64_t e = std::min<int64_t>(m1, m + 64);
            switch ((e - m + 15) / 16) {
                case 1: csr_i8_t<1>(w, q32, ldq, m, e, ep, n0, n1); break;
                case 2: csr_i8_t<2>(w, q32, ldq, m, e, ep, n0, n1); break;
                case 3: csr_i8_t<3>(w, q32, ldq, m, e, ep, n0, n1); break;
                default: csr_i8_t<4>(w, q32, ldq, m, e, ep, n0, n1); break;
            }
        }
        return;
    }
    int64_t m = m0;
    for (; m + 4 <= m1; m += 4) csr_i8_gather<4>(w, q32, ldq, m, ep, n0, n1);
    switch (m1 - m) {
        case 3: csr_i8_gather<3>(w, q32, ldq, m, ep, n0, n1); break;
        case 2: csr_i8_gather<2>(w, q32, ldq, m, ep, n0, n1); break;
        case 1: csr_i8_gather<1>(w, q32, ldq, m, ep, n0, n1); break;
        default: break;
    }
}

void block_gemm(const Activations& a, const SparseView& w, const Epilogue& ep, int64_t m0, int64_t m1,
                int64_t nb0, int64_t nb1) {
    for (int64_t nb = nb0; nb < nb1;) {
        if (nb + 4 <= nb1 && same_tiles4(w, nb)) {
            row_chunks(m0, m1, [&](auto mr, int64_t m, bool) { block_micro4<decltype(mr)::value>(a, w, ep, m, nb); });
            nb += 4;
        } else {
            row_chunks(m0, m1, [&](auto mr, int64_t m, bool) { block_micro<decltype(mr)::value>(a, w, ep, m, nb); });
            nb += 1;
        }
    }
}

void ell_f32(const SparseView& w, const float* xp, int64_t ldp, int64_t m0, int64_t m1, const float* bias,
             float* out, int64_t ldo, int64_t nb0, int64_t nb1) {
    for (int64_t nb = nb0; nb < nb1; ++nb)
        row_chunks(m0, m1, [&](auto mr, int64_t m, bool) {
            ell_f32_micro<decltype(mr)::value>(w, xp, ldp, m, nb, bias, out, ldo);
        });
}

}  // namespace fastinfer::cpu::avx512_vnni
