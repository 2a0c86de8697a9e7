// Sparse buffer entry points: measure, pack, view, validate, unpack. The generic part (sizes, the
// shared header fields, their checks); each format's own part comes from its traits.
#include <cstring>
#include <string>

#include "cpu/api/internal.h"
#include "cpu/formats/sparse/traits.h"
#include "cpu/sparse.h"

namespace fastinfer::cpu {

using namespace detail;

namespace {

// The header for (fmt, w): the shared fields, then the format's; fails when w does not fit it.
Status plan(SparseFormat fmt, const void* w, int64_t n, int64_t k, int64_t ldw, SparseHeader* h,
            const FormatTraits** traits) {
    if (n < 0 || k < 0) return Status::invalid("sparse_pack: negative size");
    if (n > kMaxSparseDim || k > kMaxSparseDim || n * k > kMaxSparseElems)
        return Status::invalid("sparse_pack: size too large");
    if (n > 0 && k > 0 && ldw < k) return Status::invalid("sparse_pack: row stride smaller than K");
    const FormatTraits* f = format_traits(uint32_t(fmt));
    if (!f) return Status::invalid("sparse_pack: unknown format");
    std::memset(h, 0, sizeof(*h));
    h->magic = kSparseMagic;
    h->version = kSparseVersion;
    h->format = uint32_t(fmt);
    h->n = n;
    h->k = k;
    h->np = round_up(n, kNBlock);
    h->kp = round_up(k, kKAlign);
    *traits = f;
    return f->plan(w, ldw, h);
}

SparseLayout layout_of(const FormatTraits& f, const SparseHeader& h);

SparseLayout layout_of(const FormatTraits& f, const SparseHeader& h) {
    SparseLayout l;
    f.layout(h, int64_t(sizeof(SparseHeader)), &l);
    return l;
}

}  // namespace

Status sparse_measure(SparseFormat fmt, const void* w, int64_t n, int64_t k, int64_t ldw, int64_t* nbytes) {
    SparseHeader h;
    const FormatTraits* f;
    Status st = plan(fmt, w, n, k, ldw, &h, &f);
    if (!st.is_ok()) return st;
    *nbytes = layout_of(*f, h).total;
    return Status::ok();
}

Status sparse_pack(SparseFormat fmt, const void* w, int64_t n, int64_t k, int64_t ldw, uint8_t* out,
                   int64_t nbytes) {
    SparseHeader h;
    const FormatTraits* f;
    Status st = plan(fmt, w, n, k, ldw, &h, &f);
    if (!st.is_ok()) return st;
    const SparseLayout l = layout_of(*f, h);
    if (nbytes != l.total) return Status::invalid("sparse_pack: output buffer has the wrong size");
    if (reinterpret_cast<uintptr_t>(out) % 64 != 0)
        return Status::invalid("sparse_pack: output buffer must be 64-byte aligned");
    std::memset(out, 0, size_t(nbytes));
    std::memcpy(out, &h, sizeof(h));
    f->pack(w, ldw, h, l, out);
    return Status::ok();
}

Status sparse_view(const uint8_t* buf, int64_t nbytes, SparseView* v) {
    if (nbytes < int64_t(sizeof(SparseHeader))) return Status::invalid("sparse weight: buffer too small");
    if (reinterpret_cast<uintptr_t>(buf) % 64 != 0)
        return Status::invalid("sparse weight: buffer must be 64-byte aligned");
    SparseHeader h;
    std::memcpy(&h, buf, sizeof(h));
    if (h.magic != kSparseMagic) return Status::invalid("sparse weight: bad magic (not a fastinfer sparse weight)");
    const FormatTraits* f = format_traits(h.format);
    // Version 2 changed the ell and 2:4 layouts: csr and block buffers of version 1 read unchanged.
    if (h.version != kSparseVersion && !(h.version == 1 && f && f->reads_version1))
        return Status::invalid("sparse weight: format version " + std::to_string(h.version) +
                               ", this build reads version " + std::to_string(kSparseVersion));
    if (!f) return Status::invalid("sparse weight: unknown format");
    // The shared fields first: the format's checks and the layout multiply them.
    if (h.n < 0 || h.k < 0 || h.n > kMaxSparseDim || h.k > kMaxSparseDim || h.n * h.k > kMaxSparseElems ||
        h.np != round_up(h.n, kNBlock) || h.kp != round_up(h.k, kKAlign) || h.nnz < 0 || !f->header_ok(h))
        return Status::invalid("sparse weight: inconsistent header");
    const SparseLayout l = layout_of(*f, h);
    if (l.total != nbytes) return Status::invalid("sparse weight: header and buffer size disagree");
    v->fmt = f->fmt;
    v->n = h.n;
    v->k = h.k;
    v->np = h.np;
    v->kp = h.kp;
    v->nnz = h.nnz;
    v->idx_bytes = int(h.idx_bytes);
    v->ell_paired = (h.flags & kSparseEllPaired) != 0;
    return f->view(buf, l, v);
}

Status sparse_validate(const uint8_t* buf, int64_t nbytes) {
    SparseView v;
    Status st = sparse_view(buf, nbytes, &v);
    if (!st.is_ok()) return st;
    return format_traits(uint32_t(v.fmt))->validate(v);
}

Status sparse_count_nonzero(const uint8_t* buf, int64_t nbytes, int64_t* count) {
    SparseView v;
    Status st = sparse_view(buf, nbytes, &v);
    if (!st.is_ok()) return st;
    const FormatTraits& f = *format_traits(uint32_t(v.fmt));
    if (!(st = f.validate(v)).is_ok()) return st;
    *count = f.count_nonzero(v);
    return Status::ok();
}

Status sparse_unpack(const uint8_t* buf, int64_t nbytes, void* w) {
    SparseView v;
    Status st = sparse_view(buf, nbytes, &v);
    if (!st.is_ok()) return st;
    const FormatTraits& f = *format_traits(uint32_t(v.fmt));
    if (!(st = f.validate(v)).is_ok()) return st;
    if (f.unpack) {
        f.unpack(v, w);
        return Status::ok();
    }
    Scratch panel_buf;
    int8_t* p = reinterpret_cast<int8_t*>(panel_buf.get(size_t(kNBlock * v.kp)));
    if (!p) return Status::runtime("out of memory");
    for (int64_t nb = 0; nb < v.np / kNBlock; ++nb) {
        decompress_panel(v, nb, p);
        for (int64_t j = 0; j < kNBlock && nb * kNBlock + j < v.n; ++j)
            for (int64_t c = 0; c < v.k; ++c)
                static_cast<int8_t*>(w)[(nb * kNBlock + j) * v.k + c] = p[(c / 4) * 64 + j * 4 + c % 4];
    }
    return Status::ok();
}

}  // namespace fastinfer::cpu
