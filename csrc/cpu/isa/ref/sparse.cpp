// Portable reference kernels, sparse: CSR (fp32, int8) and fp32 ell. (The int8 formats without a
// kernel of their own run decompressed panels on the dense GEMM: formats/sparse, decompress_panel.)
#include "cpu/formats/sparse/csr.h"
#include "cpu/formats/sparse/ell.h"
#include "cpu/isa/ref/kernels.h"

namespace fastinfer::cpu::ref {

void csr_f32(const SparseView& w, const float* x, int64_t ldx, const float*, int64_t, int64_t m0, int64_t m1,
             const float* bias, float* out, int64_t ldo, int64_t n0, int64_t n1) {
    const auto* vals = static_cast<const float*>(w.values);
    for (int64_t r = m0; r < m1; ++r)
        for (int64_t n = n0; n < n1; ++n) {
            float acc = 0.f;
            for (int64_t j = w.rowptr[n]; j < w.rowptr[n + 1]; ++j)
                acc = __builtin_fmaf(vals[j], x[r * ldx + csr_col(w, j)], acc);
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
                acc += uint32_t(int32_t(vals[j]) * int32_t(q[r * ldq + csr_col(w, j)]));
            store_one(int32_t(acc), ep, r, n);
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
