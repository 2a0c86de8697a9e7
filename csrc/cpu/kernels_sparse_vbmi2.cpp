// 2:4 int8 GEMM with AVX-512 VBMI2 and the ell kernel with VBMI's vpermi2b (compiled with the VNNI flags plus
// -mavx512vbmi -mavx512vbmi2; called only when the CPU reports both). Each 64-byte K4N16 weight vector is rebuilt in a register from its
// 32 kept bytes and 64-bit mask by one vpexpandb, then used by vpdpbusd exactly as in the dense
// kernel: the weight stream is 40/64 of the dense one.
#include <immintrin.h>

#include <cstring>

#include "cpu/avx512_inl.h"
#include "cpu/sparse.h"

namespace fastinfer::cpu::avx512_vbmi2 {
namespace {

template <int MR, int NR>
void micro(const Activations& a, const SparseView& w, const Epilogue& ep, int64_t m, int64_t nb) {
    constexpr int S = MR * NR <= 8 ? 2 : 1;
    __m512i acc[S][MR][NR];
    _Pragma("GCC unroll 32") for (int s = 0; s < S; ++s)
        _Pragma("GCC unroll 32") for (int i = 0; i < MR; ++i)
            _Pragma("GCC unroll 32") for (int j = 0; j < NR; ++j) acc[s][i][j] = _mm512_setzero_si512();
    const int64_t groups = w.kp / 4, bb = nm24_block_bytes(w.kp);
    const uint64_t* mk[NR];
    const uint8_t* vp[NR];
    _Pragma("GCC unroll 32") for (int j = 0; j < NR; ++j) {
        const uint8_t* blk = w.panels + (nb + j) * bb;
        mk[j] = reinterpret_cast<const uint64_t*>(blk);
        vp[j] = blk + groups * 8;
    }
    const int8_t* ap[MR];
    _Pragma("GCC unroll 32") for (int i = 0; i < MR; ++i) ap[i] = a.q + (m + i) * a.ldq;
    for (int64_t g = 0; g < groups; g += S) {
        _Pragma("GCC unroll 32") for (int s = 0; s < S; ++s) {
            __m512i wv[NR];
            _Pragma("GCC unroll 32") for (int j = 0; j < NR; ++j) {
                const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(vp[j] + (g + s) * 32));
                wv[j] = _mm512_maskz_expand_epi8(mk[j][g + s], _mm512_castsi256_si512(packed));
            }
            _Pragma("GCC unroll 32") for (int i = 0; i < MR; ++i) {
                int32_t a4;
                std::memcpy(&a4, ap[i] + (g + s) * 4, 4);
                const __m512i av = _mm512_set1_epi32(a4);
                _Pragma("GCC unroll 32") for (int j = 0; j < NR; ++j) dpbusd(acc[s][i][j], av, wv[j]);
            }
        }
    }
    _Pragma("GCC unroll 32") for (int i = 0; i < MR; ++i)
        _Pragma("GCC unroll 32") for (int j = 0; j < NR; ++j) {
            __m512i t = acc[0][i][j];
            if constexpr (S == 2) t = _mm512_add_epi32(t, acc[S - 1][i][j]);
            store_cols(t, w.n, w.colsum, ep, m + i, (nb + j) * kNBlock);
        }
}

template <int NR>
void rows(const Activations& a, const SparseView& w, const Epilogue& ep, int64_t m0, int64_t m1, int64_t nb) {
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

// ell: MR rows x one 16-channel block. Each 128-byte step is one vpermi2b per row (gathering the
// step's activations from the row's two 64-byte window registers) and one vpdpbusd; the window
// start comes from bit 7 of the index bytes (one vpmovb2m). The window registers are re-loaded per
// step (L1 hits): a block is one branch-free loop over its steps. Two accumulator sets alternate
// between steps to hide the vpdpbusd latency. The first row chunk of a block prefetches the steps
// 2 KiB ahead (M = 1 streams at the read bandwidth with it, ~80% without); later chunks find them
// in L1/L2.
template <int MR>
void ell_micro(const Activations& a, const SparseView& w, const Epilogue& ep, int64_t m, int64_t nb, bool prefetch) {
    constexpr int64_t kAhead = 2048;
    __m512i acc[2][MR];
    _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) acc[0][i] = acc[1][i] = _mm512_setzero_si512();
    const int64_t hi = ell_window(w.kp) - 64;  // second window register: +64, or the same one when kp = 64
    const int8_t* rows[MR];
    _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) rows[i] = a.q + (m + i) * a.ldq;
    auto step = [&](int64_t t, __m512i* acc_set) {
        const uint8_t* st = w.steps + t * kEllStep;
        if (prefetch) {
            _mm_prefetch(reinterpret_cast<const char*>(st + kAhead), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(st + kAhead + 64), _MM_HINT_T0);
        }
        const __m512i idx = _mm512_load_si512(st);
        const __m512i wv = _mm512_load_si512(st + 64);
        const int64_t base = int64_t(_cvtmask64_u64(_mm512_movepi8_mask(idx))) * 64;
        _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) {
            const __m512i lo = _mm512_load_si512(rows[i] + base);
            const __m512i up = _mm512_load_si512(rows[i] + base + hi);
            dpbusd(acc_set[i], _mm512_permutex2var_epi8(lo, idx, up), wv);
        }
    };
    int64_t t = w.stepptr[nb];
    const int64_t t1 = w.stepptr[nb + 1];
    for (; t + 2 <= t1; t += 2) {
        step(t, acc[0]);
        step(t + 1, acc[1]);
    }
    if (t < t1) step(t, acc[0]);
    _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i)
        store_cols(_mm512_add_epi32(acc[0][i], acc[1][i]), w.n, w.colsum, ep, m + i, nb * kNBlock);
}

}  // namespace

void ell_gemm(const Activations& a, const SparseView& w, const Epilogue& ep, int64_t m0, int64_t m1,
              int64_t nb0, int64_t nb1) {
    // Row chunks of up to 6 re-read the block's steps from L1/L2: the steps of 4 blocks are small
    // (16 KiB per block at 90% sparsity, K = 4096), and per row each step costs one vpermi2b and one
    // vpdpbusd.
    for (int64_t nb = nb0; nb < nb1; ++nb) {
        int64_t m = m0;
        for (; m + 6 <= m1; m += 6) ell_micro<6>(a, w, ep, m, nb, m == m0);
        const bool first = m == m0;
        switch (m1 - m) {
            case 5: ell_micro<5>(a, w, ep, m, nb, first); break;
            case 4: ell_micro<4>(a, w, ep, m, nb, first); break;
            case 3: ell_micro<3>(a, w, ep, m, nb, first); break;
            case 2: ell_micro<2>(a, w, ep, m, nb, first); break;
            case 1: ell_micro<1>(a, w, ep, m, nb, first); break;
            default: break;
        }
    }
}

void nm24_gemm(const Activations& a, const SparseView& w, const Epilogue& ep, int64_t m0, int64_t m1,
               int64_t nb0, int64_t nb1) {
    for (int64_t nb = nb0; nb < nb1; nb += 4) {
        switch (std::min<int64_t>(4, nb1 - nb)) {
            case 4: rows<4>(a, w, ep, m0, m1, nb); break;
            case 3: rows<3>(a, w, ep, m0, m1, nb); break;
            case 2: rows<2>(a, w, ep, m0, m1, nb); break;
            default: rows<1>(a, w, ep, m0, m1, nb); break;
        }
    }
}

}  // namespace fastinfer::cpu::avx512_vbmi2
