// Portable reference kernels, sparse: CSR (fp32, int8), fp32 ell, and the panel decompress that
// runs the int8 formats without a kernel of their own on the dense GEMM.
#include <cstring>

#include "cpu/isa/ref/kernels.h"

namespace fastinfer::cpu::ref {

namespace {
inline int64_t col(const SparseView& w, int64_t j) {
    return w.idx_bytes == 2 ? int64_t(static_cast<const uint16_t*>(w.idx)[j])
                            : int64_t(static_cast<const int32_t*>(w.idx)[j]);
}
}  // namespace

void csr_f32(const SparseView& w, const float* x, int64_t ldx, const float*, int64_t, int64_t m0, int64_t m1,
             const float* bias, float* out, int64_t ldo, int64_t n0, int64_t n1) {
    const auto* vals = static_cast<const float*>(w.values);
    for (int64_t r = m0; r < m1; ++r)
        for (int64_t n = n0; n < n1; ++n) {
            float acc = 0.f;
            for (int64_t j = w.rowptr[n]; j < w.rowptr[n + 1]; ++j)
                acc = __builtin_fmaf(vals[j], x[r * ldx + col(w, j)], acc);
            out[r * ldo + n] = acc + (bias ? bias[n] : 0.f);
        }
}

void csr_i8(const SparseView& w, const CsrI8Act& a, int64_t m0, int64_t m1, const Epilogue& ep, int64_t n0,
            int64_t n1) {
    const auto* vals = static_cast<const int8_t*>(w.values);
    const auto* q = static_cast<const int8_t*>(a.q);
    const int64_t ldq = a.ld;
    for (int64_t r = m0; r < m1; ++r)
        for (int64_t n = n0; n < n1; ++n) {
            uint32_t acc = 0;
            for (int64_t j = w.rowptr[n]; j < w.rowptr[n + 1]; ++j)
                acc += uint32_t(int32_t(vals[j]) * int32_t(q[r * ldq + col(w, j)]));
            store_one(int32_t(acc), ep, r, n);
        }
}

void panel(const SparseView& w, int64_t nb, int8_t* out) {
    std::memset(out, 0, size_t(kNBlock * w.kp));
    if (w.fmt == SparseFormat::kNm24I8) {
        const uint8_t* blk = w.panels + nb * nm24_block_bytes(w.kp);
        for (int64_t s = 0; s < w.kp / kNm24StepK; ++s) {
            const uint8_t* meta = blk + s * kNm24Step;
            const auto* vals = reinterpret_cast<const int8_t*>(meta + kNm24Meta);
            for (int slot = 0; slot < 64; ++slot) {
                const int j = slot / 4, g = slot % 4 / 2, pos = meta[slot / 4] >> (2 * (slot % 4)) & 3;
                const int64_t c = s * kNm24StepK + 4 * g + pos;
                out[(c / 4) * 64 + j * 4 + c % 4] = vals[slot];
            }
        }
    } else if (w.fmt == SparseFormat::kEllI8) {
        for (int64_t t = w.stepptr[nb]; t < w.stepptr[nb + 1]; ++t) {
            const uint8_t* st = w.steps + t * kEllStep;
            const int64_t base = int64_t(ell_base64(st)) * 64;
            for (int b = 0; b < 64; ++b) {
                const int8_t v = int8_t(st[64 + b]);
                if (v == 0) continue;
                const int64_t col = base + (st[b] & 127), j = b / 4;
                out[(col / 4) * 64 + j * 4 + col % 4] = v;
            }
        }
    } else if (w.fmt == SparseFormat::kBlockI8) {
        for (int64_t t = w.tileptr[nb]; t < w.tileptr[nb + 1]; ++t)
            std::memcpy(out + w.tilek[t] * kTileK * kNBlock, w.tiles + t * kNBlock * kTileK,
                        size_t(kNBlock * kTileK));
    }
}

void ell_f32(const SparseView& w, const float* xp, int64_t ldp, int64_t m0, int64_t m1, const float* bias,
             float* out, int64_t ldo, int64_t nb0, int64_t nb1) {
    for (int64_t nb = nb0; nb < nb1; ++nb)
        for (int64_t r = m0; r < m1; ++r) {
            float acc[kNBlock] = {};
            for_each_ell_f32(w, nb, [&](int j, int64_t col, float val) { acc[j] += val * xp[r * ldp + col]; });
            for (int64_t j = 0; j < kNBlock && nb * kNBlock + j < w.n; ++j)
                out[r * ldo + nb * kNBlock + j] = acc[j] + (bias ? bias[nb * kNBlock + j] : 0.f);
        }
}

}  // namespace fastinfer::cpu::ref
