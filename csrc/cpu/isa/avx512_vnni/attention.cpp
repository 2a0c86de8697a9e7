// AVX-512 attention in fp32 FMA (AVX-512 F/BW/VL only). One task = query rows [q0, q1) of one head:
// the head's K^T and V are widened to fp32 into scratch once, then 4 query rows at a time:
// scores in register tiles of 4 rows x 64 keys (scaled, masked and their row maxima taken as they
// leave the registers), a one-pass softmax over each row (exp, sum),
// and P.V in tiles of 4 rows x 64 value columns, divided by the sum on the way out.
#include "cpu/isa/avx512_vnni/attention_inl.h"
#include "cpu/isa/avx512_vnni/kernels.h"

namespace fastinfer::cpu::avx512_vnni {

void attention(const AttentionArgs& a, int64_t bh, int64_t q0, int64_t q1, float* scratch) {
    const int64_t b = bh / a.heads, h = bh % a.heads, hk = h / (a.heads / a.kv_heads);
    // by the whole problem, not the task: the two paths sum in another order, and which rows a task
    // gets depends on the thread count
    if (a.lq < kDirectRows) return attention_direct(a, b, h, hk, q0, q1, scratch);
    const AttentionLayout l = attention_layout(a);
    float *kt = scratch + l.kt, *vp = scratch + l.v, *qs = scratch + l.q, *s = scratch + l.s;
    // keys this task reads: causal rows stop at their own index
    const int64_t lk = a.causal ? std::min(a.lk, q1) : a.lk, lkp = l.lkp;
    // K^T [d][lkp] (zero past lk) and V [lk][dvp] of the head, in fp32
    const int64_t kb = b * a.k_sb + hk * a.k_sh, vb = b * a.v_sb + hk * a.v_sh;
    for (int64_t j = 0; j < std::min(lk, kAhead); ++j) {
        prefetch_row(a.k, a.dt, kb + j * a.k_sl, a.d);
        prefetch_row(a.v, a.dt, vb + j * a.v_sl, a.dv);
    }
    pack_keys_transposed(a, kb, lk, kt, lkp);
    for (int64_t j = 0; j < lk; ++j) {
        if (j + kAhead < lk) prefetch_row(a.v, a.dt, vb + (j + kAhead) * a.v_sl, a.dv);
        widen_row(a.v, a.dt, vb + j * a.v_sl, a.dv, vp + j * l.dvp, l.dvp);
    }
    for (int64_t i = q0; i < std::min(q1, q0 + 4); ++i) prefetch_row(a.q, a.dt, b * a.q_sb + h * a.q_sh + i * a.q_sl, a.d);

    const int64_t obase = b * a.o_sb + h * a.o_sh;
    for (int64_t i0 = q0; i0 < q1; i0 += 4) {
        const int64_t rows = std::min<int64_t>(4, q1 - i0);
        const int64_t jn = a.causal ? std::min(a.lk, i0 + rows) : a.lk;  // keys of the tile's longest row
        for (int64_t r = 0; r < rows; ++r)
            widen_row(a.q, a.dt, b * a.q_sb + h * a.q_sh + (i0 + r) * a.q_sl, a.d, qs + r * l.dp, l.dp);
        for (int64_t i = i0 + 4; i < std::min(q1, i0 + 8); ++i)  // the next tile's rows
            prefetch_row(a.q, a.dt, b * a.q_sb + h * a.q_sh + i * a.q_sl, a.d);
        upto4(rows, [&](auto R) {
            ScoreRow sr[R];
            score_pass<R>(a, b, h, i0, jn, sr, [&](auto K, auto NV, int64_t j0) { score_tile<R, NV, K>(qs, l.dp, kt, lkp, a.d, j0, s, a, sr); });
            float inv[4];
            for (int64_t r = 0; r < R; ++r) {
                float* sp = s + r * lkp;
                inv[r] = softmax_exp(sp, round_up(jn, 16), sr[r], [&](int64_t j, __m512 e) { _mm512_store_ps(sp + j, e); });
            }
            for (int64_t c0 = 0; c0 < a.dv; c0 += 64)
                upto4((std::min<int64_t>(64, a.dv - c0) + 15) / 16,
                      [&](auto NV) { value_tile<R, NV>(s, lkp, vp, l.dvp, jn, c0, inv, a, obase, i0); });
        });
    }
}

}  // namespace fastinfer::cpu::avx512_vnni
