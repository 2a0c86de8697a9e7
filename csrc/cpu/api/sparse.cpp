// Sparse product entry points: sparse_linear_f32, sparse_int8_matmul, sparse_int8_linear. Each
// reads the kernel table once, prepares the activations in the layout its kernels read, and splits
// the work over the threads (a format's traits name its driver here).
#include <algorithm>
#include <atomic>
#include <cstring>
#include <string>

#include "cpu/api/internal.h"
#include "cpu/formats/sparse/traits.h"
#include "cpu/runtime/threads.h"
#include "cpu/sparse.h"

namespace fastinfer::cpu {

using namespace detail;

namespace {

thread_local Scratch t_sparse_scratch;  // transposed / widened / padded activations (calling thread)
thread_local Scratch t_panel;           // decompressed panels (each thread)

// Rows of N per task for the CSR kernels: about 64 tasks, so the threads balance uneven rows.
int64_t csr_rows_per_task(int64_t n) { return std::max<int64_t>(16, (n + 63) / 64); }

// CSR: tasks over channel ranges, and over 64-row chunks where the activations are transposed.
template <class F>
void run_csr_tasks(int64_t m, int64_t n, bool transposed, F&& kernel) {
    const int64_t rows = csr_rows_per_task(n);
    const int64_t tasks = (n + rows - 1) / rows;
    const int64_t mchunk = 64;
    const int64_t mtasks = transposed ? (m + mchunk - 1) / mchunk : 1;
    parallel_for(tasks * mtasks, [&](int64_t t) {
        const int64_t nt = t / mtasks, mt = t % mtasks;
        const int64_t m0 = transposed ? mt * mchunk : 0, m1 = transposed ? std::min(m, m0 + mchunk) : m;
        kernel(m0, m1, nt * rows, std::min(n, (nt + 1) * rows));
    });
}

// The int8 formats without a kernel of their own in the table: blocks [nb0, nb1) decompressed side
// by side form a dense K4N16 buffer, multiplied by the table's dense kernel with its full register
// tile (4 blocks per A broadcast); exact on every path.
bool panel_gemm(const KernelTable& kt, const Activations& a, const SparseView& w, const Epilogue& ep,
                int64_t m0, int64_t m1, int64_t nb0, int64_t nb1) {
    const int64_t nblk = nb1 - nb0, bstride = kNBlock * w.kp;
    int8_t* p = reinterpret_cast<int8_t*>(t_panel.get(size_t(nblk * bstride)));
    if (!p) return false;
    for (int64_t nb = nb0; nb < nb1; ++nb) kt.panel(w, nb, p + (nb - nb0) * bstride);
    const int64_t n0 = nb0 * kNBlock;
    PackedW pv{std::min(nblk * kNBlock, w.n - n0), w.k, nblk * kNBlock, w.kp, w.colsum + n0, p};
    Epilogue e = ep;
    if (ep.kind == DType::kI32)
        e.out = static_cast<int32_t*>(ep.out) + n0;
    else if (ep.kind == DType::kF32)
        e.out = static_cast<float*>(ep.out) + n0;
    else
        e.out = static_cast<uint16_t*>(ep.out) + n0;
    if (ep.sw) e.sw = ep.sw + n0;
    if (ep.bias) e.bias = ep.bias + n0;
    kt.gemm(a, pv, e, m0, m1, 0, nblk);
    return true;
}

// The panel formats (2:4, block, ell int8) on activations a (shifted as kt.shift_u8 says): the
// format's kernel in kt, else its decompressed panels on kt's dense gemm.
Status run_panels(const KernelTable& kt, const FormatTraits& f, const Activations& a, const SparseView& w,
                  const Epilogue& ep) {
    SparseGemmKernel* const kernel = kt.*f.kernel;
    std::atomic<bool> oom{false};
    const int64_t nblocks = w.np / kNBlock;
    const WorkSplit s = work_split(a.m, nblocks);
    parallel_for(s.ngroups * s.nmchunks, [&](int64_t t) {
        const int64_t m0 = s.m0(t), m1 = std::min(a.m, m0 + s.mchunk);
        const int64_t nb0 = s.nb0(t), nb1 = std::min(nblocks, nb0 + s.group);
        if (kernel)
            kernel(a, w, ep, m0, m1, nb0, nb1);
        else
            for (int64_t b = nb0; b < nb1; b += 4)  // 4 decompressed blocks at a time stay in L2
                if (!panel_gemm(kt, a, w, ep, m0, m1, b, std::min(nb1, b + 4))) oom.store(true);
    });
    return oom.load() ? Status::runtime("out of memory for a decompressed weight panel") : Status::ok();
}

// CSR int8 on quantized rows q (unshifted int8, row stride kp), in the layout kt's kernel reads.
Status run_csr_i8(const KernelTable& kt, const int8_t* q, int64_t m, const SparseView& w, const Epilogue& ep) {
    if (!kt.csr.widen_i8) {
        run_csr_tasks(m, w.n, false, [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
            kt.csr.i8(w, CsrI8Act{q, w.kp, false}, m0, m1, ep, n0, n1);
        });
        return Status::ok();
    }
    // Widen to dwords uint16(int16(q)): rows [m][k] for few rows (gathers), else transposed [k][mp].
    const bool transposed = kt.csr.transpose_from > 0 && m >= kt.csr.transpose_from;
    const int64_t ld = transposed ? round_up(m, 16) : round_up(w.k, 16);
    const int64_t rows_w = transposed ? w.k : m;
    auto* q32 = reinterpret_cast<int32_t*>(t_sparse_scratch.get(size_t(rows_w * ld) * 4));
    if (!q32) return Status::runtime("out of memory for sparse activation scratch");
    for (int64_t r = 0; r < m; ++r)
        for (int64_t c = 0; c < w.k; ++c) {
            const int32_t v = int32_t(uint16_t(int16_t(q[r * w.kp + c])));
            if (transposed)
                q32[c * ld + r] = v;
            else
                q32[r * ld + c] = v;
        }
    if (transposed)
        for (int64_t c = 0; c < w.k; ++c)
            for (int64_t r = m; r < ld; ++r) q32[c * ld + r] = 0;
    run_csr_tasks(m, w.n, transposed, [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
        kt.csr.i8(w, CsrI8Act{q32, ld, transposed}, m0, m1, ep, n0, n1);
    });
    return Status::ok();
}

// CSR fp32: x as given, and transposed once where kt's kernel wants it (each nonzero then scales a
// contiguous run of rows).
Status run_csr_f32(const KernelTable& kt, const float* x, int64_t m, int64_t ldx, const SparseView& w,
                   const float* bias, float* out, int64_t ldo) {
    const float* xt = nullptr;
    int64_t ldt = 0;
    if (kt.csr.transpose_from > 0 && m >= kt.csr.transpose_from) {
        ldt = round_up(m, 16);
        auto* t = reinterpret_cast<float*>(t_sparse_scratch.get(size_t(w.k * ldt) * 4));
        if (!t) return Status::runtime("out of memory for sparse activation scratch");
        for (int64_t c = 0; c < w.k; ++c) {
            for (int64_t r = 0; r < m; ++r) t[c * ldt + r] = x[r * ldx + c];
            for (int64_t r = m; r < ldt; ++r) t[c * ldt + r] = 0.f;
        }
        xt = t;
    }
    run_csr_tasks(m, w.n, xt != nullptr, [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
        kt.csr.f32(w, x, ldx, xt, ldt, m0, m1, bias, out, ldo, n0, n1);
    });
    return Status::ok();
}

// fp32 ell: x copied to rows of kp floats (zero padded: the SIMD kernel reads whole 64-input
// windows), in the work split of the GEMMs with 48-row chunks.
Status run_ell_f32(const KernelTable& kt, const float* x, int64_t m, int64_t ldx, const SparseView& w,
                   const float* bias, float* out, int64_t ldo) {
    auto* xp = reinterpret_cast<float*>(t_sparse_scratch.get(size_t(m * w.kp) * 4));
    if (!xp) return Status::runtime("out of memory for sparse activation scratch");
    for (int64_t r = 0; r < m; ++r) {
        std::memcpy(xp + r * w.kp, x + r * ldx, size_t(w.k) * 4);
        std::memset(xp + r * w.kp + w.k, 0, size_t(w.kp - w.k) * 4);
    }
    const int64_t nblocks = w.np / kNBlock;
    const WorkSplit s = work_split(m, nblocks, 48);
    parallel_for(s.ngroups * s.nmchunks, [&](int64_t t) {
        const int64_t m0 = s.m0(t), nb0 = s.nb0(t);
        kt.ell_f32(w, xp, w.kp, m0, std::min(m, m0 + s.mchunk), bias, out, ldo, nb0,
                   std::min(nblocks, nb0 + s.group));
    });
    return Status::ok();
}

// Sizes, the buffer's header, its value type (fp32 or int8), K and the output stride; *traits: the
// weight's format.
Status check_sparse(const char* name, int64_t m, int64_t k, int64_t ldx, const uint8_t* buf, int64_t nbytes,
                    int64_t ldo, SparseView* w, bool want_int8, const FormatTraits** traits) {
    Status st = check_dims(m, k, ldx, name);
    if (!st.is_ok()) return st;
    if (!(st = sparse_view(buf, nbytes, w)).is_ok()) return st;
    *traits = format_traits(uint32_t(w->fmt));
    if ((*traits)->int8 != want_int8)
        return Status::invalid(std::string(name) + (want_int8 ? ": needs an int8 sparse weight"
                                                              : ": needs an fp32 sparse weight"));
    if (w->k != k) return Status::invalid(std::string(name) + ": K of the input and the weight differ");
    if (m > 0 && ldo < w->n) return Status::invalid(std::string(name) + ": out row stride smaller than N");
    return Status::ok();
}

// Whether an int8 format's kernels read q + 128: the panel formats follow the table; the CSR
// kernels always take signed activations.
bool shifted(const KernelTable& kt, const FormatTraits& f) { return f.run == SparseRun::kPanels && kt.shift_u8; }

// An int8 format's product on activations q (rows of kp bytes, shifted as shifted() says).
Status run_int8(const KernelTable& kt, const FormatTraits& f, const int8_t* q, int64_t m, const SparseView& w,
                const Epilogue& ep) {
    if (f.run == SparseRun::kCsrI8) return run_csr_i8(kt, q, m, w, ep);
    return run_panels(kt, f, Activations{q, m, w.kp}, w, ep);
}

}  // namespace

Status sparse_linear_f32(const float* x, int64_t m, int64_t k, int64_t ldx, const uint8_t* buf,
                         int64_t nbytes, const float* bias, float* out, int64_t ldo) {
    SparseView w;
    const FormatTraits* f;
    Status st = check_sparse("sparse_linear", m, k, ldx, buf, nbytes, ldo, &w, false, &f);
    if (!st.is_ok() || m == 0 || w.n == 0) return st;
    const KernelTable& kt = active_kernels();
    if (f->run == SparseRun::kEllF32) return run_ell_f32(kt, x, m, ldx, w, bias, out, ldo);
    return run_csr_f32(kt, x, m, ldx, w, bias, out, ldo);
}

Status sparse_int8_matmul(const int8_t* a, int64_t m, int64_t k, int64_t lda, const uint8_t* buf,
                          int64_t nbytes, int32_t* out, int64_t ldo) {
    SparseView w;
    const FormatTraits* f;
    Status st = check_sparse("sparse_int8_matmul", m, k, lda, buf, nbytes, ldo, &w, true, &f);
    if (!st.is_ok() || m == 0 || w.n == 0) return st;
    const KernelTable& kt = active_kernels();
    int8_t* q;
    float* sa;
    if (!(st = prepare_activations(m, w.kp, &q, &sa)).is_ok()) return st;
    copy_activations(a, m, k, lda, q, w.kp, shifted(kt, *f));
    const Epilogue ep{DType::kI32, out, ldo, nullptr, nullptr, nullptr};
    return run_int8(kt, *f, q, m, w, ep);
}

Status sparse_int8_linear(const void* x, DType dt, int64_t m, int64_t k, int64_t ldx, const uint8_t* buf,
                          int64_t nbytes, const float* sw, const float* bias, void* out, DType out_dt,
                          int64_t ldo, int act) {
    if (Status io = check_linear_io("sparse_int8_linear", dt, out_dt, act); !io.is_ok()) return io;
    SparseView w;
    const FormatTraits* f;
    Status st = check_sparse("sparse_int8_linear", m, k, ldx, buf, nbytes, ldo, &w, true, &f);
    if (!st.is_ok() || m == 0 || w.n == 0) return st;
    const KernelTable& kt = active_kernels();
    int8_t* q;
    float* sa;
    if (!(st = prepare_activations(m, w.kp, &q, &sa)).is_ok()) return st;
    quantize_activations(kt, x, dt, m, k, ldx, q, w.kp, sa, shifted(kt, *f));
    const Epilogue ep{out_dt, out, ldo, sa, sw, bias, act};
    return run_int8(kt, *f, q, m, w, ep);
}

}  // namespace fastinfer::cpu
