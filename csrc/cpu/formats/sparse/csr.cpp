// kCsrF32 / kCsrI8: plan, layout, pack, view, validate, unpack (csr.h). One set of functions for
// both value types (4-byte fp32 or 1-byte int8 values).
#include "cpu/formats/sparse/csr.h"

#include <cstring>

#include "cpu/formats/sparse/common.h"
#include "cpu/formats/sparse/traits.h"

namespace fastinfer::cpu {

using namespace sparse_detail;

namespace {

bool is_f32(const SparseHeader& h) { return SparseFormat(h.format) == SparseFormat::kCsrF32; }

bool nonzero_at(const SparseHeader& h, const void* w, int64_t ldw, int64_t r, int64_t c) {
    return is_f32(h) ? nonzero(static_cast<const float*>(w), ldw, r, c)
                     : nonzero(static_cast<const int8_t*>(w), ldw, r, c);
}

Status plan(const void* w, int64_t ldw, SparseHeader* h) {
    h->idx_bytes = h->k <= 65536 ? 2 : 4;
    int64_t nnz = 0;
    for (int64_t r = 0; r < h->n; ++r)
        for (int64_t c = 0; c < h->k; ++c) nnz += nonzero_at(*h, w, ldw, r, c);
    h->nnz = nnz;
    return Status::ok();
}

void layout(const SparseHeader& h, int64_t off, SparseLayout* l) {
    l->rowptr = off;
    off += a64(8 * (h.n + 1));
    l->idx = off;
    off += a64(h.idx_bytes * h.nnz);
    l->values = off;
    off += a64((is_f32(h) ? 4 : 1) * h.nnz);
    l->total = off;
}

bool header_ok(const SparseHeader& h) {
    return h.idx_bytes == (h.k <= 65536 ? 2u : 4u) && h.nnz <= h.n * h.k && h.flags == 0;
}

void pack(const void* w, int64_t ldw, const SparseHeader& h, const SparseLayout& l, uint8_t* out) {
    auto* rowptr = reinterpret_cast<int64_t*>(out + l.rowptr);
    int64_t j = 0;
    for (int64_t r = 0; r < h.n; ++r) {
        rowptr[r] = j;
        for (int64_t c = 0; c < h.k; ++c) {
            if (!nonzero_at(h, w, ldw, r, c)) continue;
            if (h.idx_bytes == 2)
                reinterpret_cast<uint16_t*>(out + l.idx)[j] = uint16_t(c);
            else
                reinterpret_cast<int32_t*>(out + l.idx)[j] = int32_t(c);
            if (is_f32(h))
                reinterpret_cast<float*>(out + l.values)[j] = static_cast<const float*>(w)[r * ldw + c];
            else
                reinterpret_cast<int8_t*>(out + l.values)[j] = static_cast<const int8_t*>(w)[r * ldw + c];
            ++j;
        }
    }
    rowptr[h.n] = j;
}

Status view(const uint8_t* buf, const SparseLayout& l, SparseView* v) {
    v->rowptr = reinterpret_cast<const int64_t*>(buf + l.rowptr);
    v->idx = buf + l.idx;
    v->values = buf + l.values;
    if (v->rowptr[0] != 0 || v->rowptr[v->n] != v->nnz) return Status::invalid("sparse weight: corrupt row pointers");
    return Status::ok();
}

Status validate(const SparseView& v) {
    Status st = check_monotonic(v.rowptr, v.n, "row pointers");
    if (!st.is_ok()) return st;
    ColumnOrder order(v.n);
    for (int64_t r = 0; r < v.n; ++r)
        for (int64_t j = v.rowptr[r]; j < v.rowptr[r + 1]; ++j) {
            const int64_t c = csr_col(v, j);
            if (c < 0 || c >= v.k) return Status::invalid("sparse weight: column index out of range");
            if (!order.next(r, c)) return Status::invalid("sparse weight: columns of a row repeat or are out of order");
            if (v.fmt == SparseFormat::kCsrF32 && !finite_f32(static_cast<const float*>(v.values)[j]))
                return Status::invalid("sparse weight: a stored value is NaN or Inf");
        }
    return Status::ok();
}

void unpack(const SparseView& v, void* w) {
    const size_t es = v.fmt == SparseFormat::kCsrF32 ? 4 : 1;
    if (v.n * v.k == 0) return;  // w may be null then (an empty tensor's data), and memset(nullptr) is UB
    std::memset(w, 0, size_t(v.n * v.k) * es);
    for (int64_t r = 0; r < v.n; ++r)
        for (int64_t j = v.rowptr[r]; j < v.rowptr[r + 1]; ++j) {
            const int64_t c = csr_col(v, j);
            if (es == 4)
                static_cast<float*>(w)[r * v.k + c] = static_cast<const float*>(v.values)[j];
            else
                static_cast<int8_t*>(w)[r * v.k + c] = static_cast<const int8_t*>(v.values)[j];
        }
}

int64_t count_nonzero(const SparseView& v) {
    int64_t c = 0;
    for (int64_t j = v.rowptr[0]; j < v.rowptr[v.n]; ++j)
        c += v.fmt == SparseFormat::kCsrF32 ? static_cast<const float*>(v.values)[j] != 0.f
                                            : static_cast<const int8_t*>(v.values)[j] != 0;
    return c;
}

}  // namespace

const FormatTraits kCsrF32Traits = {
    SparseFormat::kCsrF32, /*int8=*/false, /*reads_version1=*/true, SparseRun::kCsrF32, /*kernel=*/nullptr,
    plan, layout, header_ok, pack, view, validate, unpack, /*panel=*/nullptr, count_nonzero,
};
const FormatTraits kCsrI8Traits = {
    SparseFormat::kCsrI8, /*int8=*/true, /*reads_version1=*/true, SparseRun::kCsrI8, /*kernel=*/nullptr,
    plan, layout, header_ok, pack, view, validate, unpack, /*panel=*/nullptr, count_nonzero,
};

}  // namespace fastinfer::cpu
