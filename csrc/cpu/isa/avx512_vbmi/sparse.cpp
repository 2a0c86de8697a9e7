// The 2:4 and ell int8 kernels: activations gathered in registers with AVX-512 VBMI's vpermb /
// vpermi2b, multiplied with vpdpbusd (compiled with the VNNI flags plus -mavx512vbmi; called only
// when the CPU reports VBMI).
#include <immintrin.h>

#include <cstring>

#include "cpu/formats/sparse/ell.h"
#include "cpu/formats/sparse/nm.h"
#include "cpu/isa/avx512_vbmi/kernels.h"
#include "cpu/isa/avx512_vnni/avx512_inl.h"

namespace fastinfer::cpu::avx512_vbmi {
namespace {

// 2:4: MR rows x one 16-channel block. Per 64-input window the MR activation vectors sit in
// registers; each 80-byte step (8 inputs) turns its 16 bytes of 2-bit positions into 64 activation
// indices (vpermw spreads 2 bytes to each qword, vpmultishiftqb pulls every 2-bit field into a byte,
// vpternlogd keeps 2 bits and adds the step's offset), then per row one vpermb gathers the
// activations and one vpdpbusd multiplies 4 kept weights per channel. (A vpexpandb of the weights
// into dense vectors measured 2.4 cycles per 64 weights here with vpdpbusd consuming it; this is
// ~1 cycle per 64 weights.) The first row chunk prefetches the step stream 2 KiB ahead.
template <int MR>
void nm24_micro(const Activations& a, const SparseView& w, const Epilogue& ep, int64_t m, int64_t nb, bool prefetch) {
    constexpr int64_t kAhead = 2048;
    constexpr int NA = MR == 1 ? 4 : (MR <= 3 ? 2 : 1);  // accumulator sets rotating over steps
    __m512i acc[NA][MR];
    _Pragma("GCC unroll 8") for (int h = 0; h < NA; ++h)
        _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) acc[h][i] = _mm512_setzero_si512();
    // qword q of the index vector holds channels 2q, 2q+1: their position bytes are 16-bit word q
    const __m512i spread = _mm512_set_epi16(0, 0, 0, 7, 0, 0, 0, 6, 0, 0, 0, 5, 0, 0, 0, 4,
                                            0, 0, 0, 3, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0);
    const __m512i fields = _mm512_set1_epi64(0x0E0C0A0806040200LL);  // byte i <- bits 2i.. of its qword
    const __m512i three = _mm512_set1_epi8(3);
    // slot b = 4j + 2g + i reads input 4g + position of its step: offset 4 * ((b % 4) / 2)
    const __m512i group = _mm512_set1_epi32(0x04040000);
    const uint8_t* blk = w.panels + nb * nm24_block_bytes(w.kp);
    const int8_t* rows[MR];
    _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) rows[i] = a.q + (m + i) * a.ldq;
    __m512i xr[MR];
    auto step = [&](const uint8_t* st, int s, __m512i* acc_set) {
        if (prefetch) {
            _mm_prefetch(reinterpret_cast<const char*>(st + kAhead), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(st + kAhead + 64), _MM_HINT_T0);
        }
        const __m512i pos = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(st)));
        const __m512i f = _mm512_multishift_epi64_epi8(fields, _mm512_permutexvar_epi16(spread, pos));
        const __m512i off = _mm512_add_epi8(group, _mm512_set1_epi8(char(8 * s)));
        const __m512i idx = _mm512_ternarylogic_epi32(f, three, off, 0xEA);  // (f & 3) | off
        const __m512i wv = _mm512_loadu_si512(st + kNm24Meta);
        _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i)
            dpbusd(acc_set[i], _mm512_permutexvar_epi8(idx, xr[i]), wv);
    };
    for (int64_t win = 0; win < w.kp / 64; ++win) {
        _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) xr[i] = _mm512_load_si512(rows[i] + win * 64);
        const uint8_t* st = blk + win * 8 * kNm24Step;
        // constant accumulator indices (the compiler keeps them in registers)
        step(st, 0, acc[0]);
        step(st + kNm24Step, 1, acc[1 % NA]);
        step(st + 2 * kNm24Step, 2, acc[2 % NA]);
        step(st + 3 * kNm24Step, 3, acc[3 % NA]);
        step(st + 4 * kNm24Step, 4, acc[4 % NA]);
        step(st + 5 * kNm24Step, 5, acc[5 % NA]);
        step(st + 6 * kNm24Step, 6, acc[6 % NA]);
        step(st + 7 * kNm24Step, 7, acc[7 % NA]);
    }
    _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) {
        __m512i t = acc[0][i];
        _Pragma("GCC unroll 4") for (int h = 1; h < NA; ++h) t = _mm512_add_epi32(t, acc[h][i]);
        store_cols(t, w.n, w.colsum, ep, m + i, nb * kNBlock);
    }
}

// ell: MR rows x one 16-channel block. Each 128-byte step is one vpermi2b per row (gathering the
// step's activations from the row's two 64-byte window registers) and one vpdpbusd; the window
// start comes from bit 7 of the index bytes (one vpmovb2m). The window registers are re-loaded per
// step (L1 hits): a block is one branch-free loop over its steps. Two accumulator sets alternate
// between steps to hide the vpdpbusd latency. The first row chunk of a block prefetches the steps
// 2 KiB ahead (M = 1 streams at the read bandwidth with it, ~80% without); later chunks find them
// in L1/L2. (Two blocks' streams side by side at M = 1 measured slower: 26-31 us against 22-23.)
constexpr int64_t kEllAhead = 2048;

// One ell step for MR rows: acc_set[i] += the step's weights x row i's gathered activations.
template <int MR>
inline void ell_step(const SparseView& w, const int8_t* const* rows, int64_t hi, int64_t t, __m512i* acc_set,
                     bool prefetch) {
    const uint8_t* st = w.steps + t * kEllStep;
    if (prefetch) {
        _mm_prefetch(reinterpret_cast<const char*>(st + kEllAhead), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(st + kEllAhead + 64), _MM_HINT_T0);
    }
    const __m512i idx = _mm512_load_si512(st);
    const __m512i wv = _mm512_load_si512(st + 64);
    const int64_t base = int64_t(_cvtmask64_u64(_mm512_movepi8_mask(idx))) * 64;
    _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) {
        const __m512i lo = _mm512_load_si512(rows[i] + base);
        const __m512i up = _mm512_load_si512(rows[i] + base + hi);
        dpbusd(acc_set[i], _mm512_permutex2var_epi8(lo, idx, up), wv);
    }
}

template <int MR>
void ell_micro(const Activations& a, const SparseView& w, const Epilogue& ep, int64_t m, int64_t nb, bool prefetch) {
    __m512i acc[2][MR];
    _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) acc[0][i] = acc[1][i] = _mm512_setzero_si512();
    const int64_t hi = ell_window(w.kp) - 64;  // second window register: +64, or the same one when kp = 64
    const int8_t* rows[MR];
    _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) rows[i] = a.q + (m + i) * a.ldq;
    if (MR > 1 && w.ell_paired) {
        // Pairs of steps share a window: each row's two window registers are loaded once per pair.
        for (int64_t t = w.stepptr[nb]; t < w.stepptr[nb + 1]; t += 2) {
            const uint8_t* st = w.steps + t * kEllStep;
            if (prefetch)
                _Pragma("GCC unroll 4") for (int l = 0; l < 4; ++l)
                    _mm_prefetch(reinterpret_cast<const char*>(st + kEllAhead + 64 * l), _MM_HINT_T0);
            const __m512i idx0 = _mm512_load_si512(st), wv0 = _mm512_load_si512(st + 64);
            const __m512i idx1 = _mm512_load_si512(st + kEllStep), wv1 = _mm512_load_si512(st + kEllStep + 64);
            const int64_t base = int64_t(_cvtmask64_u64(_mm512_movepi8_mask(idx0))) * 64;
            _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) {
                const __m512i lo = _mm512_load_si512(rows[i] + base);
                const __m512i up = _mm512_load_si512(rows[i] + base + hi);
                dpbusd(acc[0][i], _mm512_permutex2var_epi8(lo, idx0, up), wv0);
                dpbusd(acc[1][i], _mm512_permutex2var_epi8(lo, idx1, up), wv1);
            }
        }
    } else {
        auto step = [&](int64_t t, __m512i* acc_set) { ell_step<MR>(w, rows, hi, t, acc_set, prefetch); };
        alternating_steps(w.stepptr[nb], w.stepptr[nb + 1], step, acc[0], acc[1]);
    }
    _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i)
        store_cols(_mm512_add_epi32(acc[0][i], acc[1][i]), w.n, w.colsum, ep, m + i, nb * kNBlock);
}

}  // namespace

void ell_gemm(const Activations& a, const SparseView& w, const Epilogue& ep, int64_t m0, int64_t m1,
              int64_t nb0, int64_t nb1) {
    // Row chunks of up to 6 re-read the block's steps from L1/L2: the steps of 4 blocks are small
    // (16 KiB per block at 90% sparsity, K = 4096), and per row each step costs one vpermi2b and one
    // vpdpbusd.
    for (int64_t nb = nb0; nb < nb1; ++nb)
        row_chunks(m0, m1, [&](auto mr, int64_t m, bool first) { ell_micro<decltype(mr)::value>(a, w, ep, m, nb, first); });
}

void nm24_gemm(const Activations& a, const SparseView& w, const Epilogue& ep, int64_t m0, int64_t m1,
               int64_t nb0, int64_t nb1) {
    for (int64_t nb = nb0; nb < nb1; ++nb)
        row_chunks(m0, m1, [&](auto mr, int64_t m, bool first) { nm24_micro<decltype(mr)::value>(a, w, ep, m, nb, first); });
}

}  // namespace fastinfer::cpu::avx512_vbmi
