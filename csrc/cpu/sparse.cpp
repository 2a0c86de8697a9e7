// Sparse formats: measure, pack, view, unpack; and the entry points, which run each call on one
// kernel table and split the work over the threads. Baseline flags only.
#include "cpu/sparse.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cpu/api/internal.h"
#include "cpu/isa/ref/kernels.h"
#include "cpu/runtime/threads.h"

namespace fastinfer::cpu {

using namespace detail;

namespace {

constexpr int64_t kMaxSparseDim = int64_t(1) << 31;
constexpr int64_t kMaxSparseElems = int64_t(1) << 40;  // n * k: every section size stays far from overflow

int64_t a64(int64_t x) { return round_up(x, 64); }

// Section offsets (from the start of the buffer) for a header's format and sizes.
struct Layout {
    int64_t rowptr = 0, idx = 0, values = 0, colsum = 0, panels = 0, tileptr = 0, tilek = 0, tiles = 0,
            stepptr = 0, steps = 0, total = 0;
};

Layout layout_of(const SparseHeader& h) {
    Layout l;
    int64_t off = sizeof(SparseHeader);
    switch (SparseFormat(h.format)) {
        case SparseFormat::kCsrF32:
        case SparseFormat::kCsrI8: {
            const int64_t vbytes = SparseFormat(h.format) == SparseFormat::kCsrF32 ? 4 : 1;
            l.rowptr = off;
            off += a64(8 * (h.n + 1));
            l.idx = off;
            off += a64(h.idx_bytes * h.nnz);
            l.values = off;
            off += a64(vbytes * h.nnz);
            break;
        }
        case SparseFormat::kNm24I8:
            l.colsum = off;
            off += a64(4 * h.np);
            l.panels = off;
            off += (h.np / kNBlock) * nm24_block_bytes(h.kp);
            break;
        case SparseFormat::kBlockI8:
            l.colsum = off;
            off += a64(4 * h.np);
            l.tileptr = off;
            off += a64(8 * (h.np / kNBlock + 1));
            l.tilek = off;
            off += a64(4 * h.nnz);
            l.tiles = off;
            off += h.nnz * kNBlock * kTileK;
            break;
        case SparseFormat::kEllI8:
        case SparseFormat::kEllF32: {
            const bool f32 = SparseFormat(h.format) == SparseFormat::kEllF32;
            if (!f32) {
                l.colsum = off;
                off += a64(4 * h.np);
            }
            l.stepptr = off;
            off += a64(8 * (h.np / kNBlock + 1));
            l.steps = off;
            off += h.nnz * (f32 ? kEllF32Step : kEllStep);
            break;
        }
    }
    l.total = off;
    return l;
}

bool is_int8(SparseFormat f) { return f != SparseFormat::kCsrF32 && f != SparseFormat::kEllF32; }

bool valid_format(uint32_t f) { return f >= 1 && f <= 6; }

template <class T>
bool nonzero(const T* w, int64_t ldw, int64_t r, int64_t c) {
    return w[r * ldw + c] != T(0);  // -0.0 == 0: a negative zero is not stored
}

// The ell plan of 16-channel block nb: calls step(base, cols, cnt) once per step, where channel j
// takes cnt[j] <= take nonzeros at columns cols[j][0..cnt[j]). The window [base, base + win) starts at
// the least advanced channel's next nonzero rounded down to `align` (capped at kp - win), and every
// channel takes its next nonzeros inside it, so each step makes progress and no nonzero is skipped.
// int8: win min(128, kp), align 64, take 4; fp32: win 64, align 16, take 1.
// paired: every window serves two steps in a row (the second may be empty: all padding).
template <class T, class F>
void ell_plan_block(const T* w, int64_t ldw, int64_t n, int64_t k, int64_t kp, int64_t nb, int64_t win,
                    int64_t align, int take, bool paired, F&& step) {
    std::vector<int64_t> cols[kNBlock];
    for (int64_t j = 0; j < kNBlock; ++j) {
        const int64_t r = nb * kNBlock + j;
        if (r < n)
            for (int64_t c = 0; c < k; ++c)
                if (nonzero(w, ldw, r, c)) cols[j].push_back(c);
    }
    size_t pos[kNBlock] = {};
    for (;;) {
        int64_t next = kp;
        for (int64_t j = 0; j < kNBlock; ++j)
            if (pos[j] < cols[j].size()) next = std::min(next, cols[j][pos[j]]);
        if (next == kp) return;
        const int64_t base = std::min(next / align * align, kp - win);  // kp - win is a multiple of align too
        for (int rep = 0; rep < (paired ? 2 : 1); ++rep) {
            int64_t taken[kNBlock][4];
            int cnt[kNBlock];
            for (int64_t j = 0; j < kNBlock; ++j) {
                cnt[j] = 0;
                while (cnt[j] < take && pos[j] < cols[j].size() && cols[j][pos[j]] < base + win)
                    taken[j][cnt[j]++] = cols[j][pos[j]++];
            }
            step(base, taken, cnt);
        }
    }
}

// Header for (fmt, w); fails when w does not fit the format.
Status plan(SparseFormat fmt, const void* w, int64_t n, int64_t k, int64_t ldw, SparseHeader* h) {
    if (n < 0 || k < 0) return Status::invalid("sparse_pack: negative size");
    if (n > kMaxSparseDim || k > kMaxSparseDim || n * k > kMaxSparseElems)
        return Status::invalid("sparse_pack: size too large");
    if (n > 0 && k > 0 && ldw < k) return Status::invalid("sparse_pack: row stride smaller than K");
    if (!valid_format(uint32_t(fmt))) return Status::invalid("sparse_pack: unknown format");
    std::memset(h, 0, sizeof(*h));
    h->magic = kSparseMagic;
    h->version = kSparseVersion;
    h->format = uint32_t(fmt);
    h->n = n;
    h->k = k;
    h->np = round_up(n, kNBlock);
    h->kp = round_up(k, kKAlign);
    const auto* w8 = static_cast<const int8_t*>(w);
    const auto* wf = static_cast<const float*>(w);
    switch (fmt) {
        case SparseFormat::kCsrF32:
        case SparseFormat::kCsrI8: {
            h->idx_bytes = k <= 65536 ? 2 : 4;
            int64_t nnz = 0;
            for (int64_t r = 0; r < n; ++r)
                for (int64_t c = 0; c < k; ++c)
                    nnz += fmt == SparseFormat::kCsrF32 ? nonzero(wf, ldw, r, c) : nonzero(w8, ldw, r, c);
            h->nnz = nnz;
            break;
        }
        case SparseFormat::kNm24I8:
            for (int64_t r = 0; r < n; ++r)
                for (int64_t g = 0; g < k; g += 4) {
                    int cnt = 0;
                    for (int64_t t = g; t < std::min(k, g + 4); ++t) cnt += nonzero(w8, ldw, r, t);
                    if (cnt > 2)
                        return Status::invalid("sparse_pack: not 2:4 sparse (row " + std::to_string(r) +
                                               ", inputs " + std::to_string(g) + ".." +
                                               std::to_string(std::min(k, g + 4) - 1) + " hold " +
                                               std::to_string(cnt) + " nonzeros)");
                }
            h->nnz = h->np * h->kp / 2;
            break;
        case SparseFormat::kBlockI8: {
            int64_t tiles = 0;
            for (int64_t nb = 0; nb < h->np / kNBlock; ++nb)
                for (int64_t kt = 0; kt < h->kp / kTileK; ++kt) {
                    bool any = false;
                    for (int64_t r = nb * kNBlock; r < std::min(n, (nb + 1) * kNBlock) && !any; ++r)
                        for (int64_t c = kt * kTileK; c < std::min(k, (kt + 1) * kTileK) && !any; ++c)
                            any = nonzero(w8, ldw, r, c);
                    tiles += any;
                }
            h->nnz = tiles;
            break;
        }
        case SparseFormat::kEllI8:
        case SparseFormat::kEllF32: {
            const bool f32 = fmt == SparseFormat::kEllF32;
            if (f32 && h->kp > kEllF32MaxK)
                return Status::invalid("sparse_pack: the float32 ell format supports K up to " + std::to_string(kEllF32MaxK));
            int64_t steps[2] = {0, 0};  // single, paired
            for (int paired = 0; paired < 2; ++paired)
                for (int64_t nb = 0; nb < h->np / kNBlock; ++nb) {
                    auto count = [&](int64_t, const int64_t (*)[4], const int*) { ++steps[paired]; };
                    if (f32)
                        ell_plan_block(wf, ldw, n, k, h->kp, nb, kEllF32Win, kEllF32Align, 1, paired != 0, count);
                    else
                        ell_plan_block(w8, ldw, n, k, h->kp, nb, ell_window(h->kp), 64, 4, paired != 0, count);
                }
            const bool paired = steps[1] * 100 <= steps[0] * 103;
            h->flags = paired ? kSparseEllPaired : 0;
            h->nnz = steps[paired ? 1 : 0];
            break;
        }
    }
    return Status::ok();
}

void fill_colsum(const int8_t* w, int64_t n, int64_t k, int64_t ldw, int64_t np, int32_t* colsum) {
    for (int64_t r = 0; r < np; ++r) {
        uint32_t s = 0;  // mod 2^32, like the kernels' int32 accumulation
        if (r < n)
            for (int64_t c = 0; c < k; ++c) s += uint32_t(int32_t(w[r * ldw + c]));
        colsum[r] = int32_t(s);
    }
}

}  // namespace

Status sparse_measure(SparseFormat fmt, const void* w, int64_t n, int64_t k, int64_t ldw, int64_t* nbytes) {
    SparseHeader h;
    Status st = plan(fmt, w, n, k, ldw, &h);
    if (!st.is_ok()) return st;
    *nbytes = layout_of(h).total;
    return Status::ok();
}

Status sparse_pack(SparseFormat fmt, const void* w, int64_t n, int64_t k, int64_t ldw, uint8_t* out,
                   int64_t nbytes) {
    SparseHeader h;
    Status st = plan(fmt, w, n, k, ldw, &h);
    if (!st.is_ok()) return st;
    const Layout l = layout_of(h);
    if (nbytes != l.total) return Status::invalid("sparse_pack: output buffer has the wrong size");
    if (reinterpret_cast<uintptr_t>(out) % 64 != 0)
        return Status::invalid("sparse_pack: output buffer must be 64-byte aligned");
    std::memset(out, 0, size_t(nbytes));
    std::memcpy(out, &h, sizeof(h));
    const auto* w8 = static_cast<const int8_t*>(w);
    const auto* wf = static_cast<const float*>(w);
    switch (fmt) {
        case SparseFormat::kCsrF32:
        case SparseFormat::kCsrI8: {
            auto* rowptr = reinterpret_cast<int64_t*>(out + l.rowptr);
            int64_t j = 0;
            for (int64_t r = 0; r < n; ++r) {
                rowptr[r] = j;
                for (int64_t c = 0; c < k; ++c) {
                    const bool nz = fmt == SparseFormat::kCsrF32 ? nonzero(wf, ldw, r, c) : nonzero(w8, ldw, r, c);
                    if (!nz) continue;
                    if (h.idx_bytes == 2)
                        reinterpret_cast<uint16_t*>(out + l.idx)[j] = uint16_t(c);
                    else
                        reinterpret_cast<int32_t*>(out + l.idx)[j] = int32_t(c);
                    if (fmt == SparseFormat::kCsrF32)
                        reinterpret_cast<float*>(out + l.values)[j] = wf[r * ldw + c];
                    else
                        reinterpret_cast<int8_t*>(out + l.values)[j] = w8[r * ldw + c];
                    ++j;
                }
            }
            rowptr[n] = j;
            break;
        }
        case SparseFormat::kNm24I8: {
            fill_colsum(w8, n, k, ldw, h.np, reinterpret_cast<int32_t*>(out + l.colsum));
            for (int64_t nb = 0; nb < h.np / kNBlock; ++nb) {
                uint8_t* blk = out + l.panels + nb * nm24_block_bytes(h.kp);
                for (int64_t s = 0; s < h.kp / kNm24StepK; ++s) {
                    uint8_t* meta = blk + s * kNm24Step;
                    auto* vals = reinterpret_cast<int8_t*>(meta + kNm24Meta);
                    for (int64_t j = 0; j < kNBlock; ++j) {
                        const int64_t r = nb * kNBlock + j;
                        for (int64_t g = 0; g < 2; ++g) {
                            // slots 4j + 2g, 4j + 2g + 1: the group's nonzeros, then explicit zeros at
                            // other positions (the two positions of a group always differ)
                            int pos[2], kept = 0;
                            const int64_t c0 = s * kNm24StepK + 4 * g;
                            for (int t = 0; t < 4 && kept < 2; ++t)
                                if (r < n && c0 + t < k && nonzero(w8, ldw, r, c0 + t)) pos[kept++] = t;
                            for (int t = 0; t < 4 && kept < 2; ++t)
                                if (kept == 0 || pos[0] != t) pos[kept++] = t;
                            for (int i = 0; i < 2; ++i) {
                                const int64_t slot = 4 * j + 2 * g + i, c = c0 + pos[i];
                                meta[slot / 4] |= uint8_t(pos[i] << (2 * (slot % 4)));
                                vals[slot] = (r < n && c < k) ? w8[r * ldw + c] : int8_t(0);
                            }
                        }
                    }
                }
            }
            break;
        }
        case SparseFormat::kBlockI8: {
            fill_colsum(w8, n, k, ldw, h.np, reinterpret_cast<int32_t*>(out + l.colsum));
            auto* tileptr = reinterpret_cast<int64_t*>(out + l.tileptr);
            auto* tilek = reinterpret_cast<int32_t*>(out + l.tilek);
            auto* tiles = reinterpret_cast<int8_t*>(out + l.tiles);
            int64_t t = 0;
            for (int64_t nb = 0; nb < h.np / kNBlock; ++nb) {
                tileptr[nb] = t;
                for (int64_t kt = 0; kt < h.kp / kTileK; ++kt) {
                    bool any = false;
                    for (int64_t r = nb * kNBlock; r < std::min(n, (nb + 1) * kNBlock) && !any; ++r)
                        for (int64_t c = kt * kTileK; c < std::min(k, (kt + 1) * kTileK) && !any; ++c)
                            any = nonzero(w8, ldw, r, c);
                    if (!any) continue;
                    tilek[t] = int32_t(kt);
                    int8_t* tile = tiles + t * kNBlock * kTileK;
                    for (int64_t j = 0; j < kNBlock; ++j)
                        for (int64_t cc = 0; cc < kTileK; ++cc) {
                            const int64_t r = nb * kNBlock + j, c = kt * kTileK + cc;
                            if (r < n && c < k) tile[(cc / 4) * 64 + j * 4 + cc % 4] = w8[r * ldw + c];
                        }
                    ++t;
                }
            }
            tileptr[h.np / kNBlock] = t;
            break;
        }
        case SparseFormat::kEllI8: {
            fill_colsum(w8, n, k, ldw, h.np, reinterpret_cast<int32_t*>(out + l.colsum));
            auto* stepptr = reinterpret_cast<int64_t*>(out + l.stepptr);
            uint8_t* steps = out + l.steps;
            int64_t t = 0;
            for (int64_t nb = 0; nb < h.np / kNBlock; ++nb) {
                stepptr[nb] = t;
                ell_plan_block(w8, ldw, n, k, h.kp, nb, ell_window(h.kp), 64, 4, h.flags & kSparseEllPaired,
                               [&](int64_t base, const int64_t (*cols)[4], const int* cnt) {
                    uint8_t* st = steps + t * kEllStep;
                    for (int b = 0; b < 64; ++b) st[b] = uint8_t(((uint64_t(base / 64) >> b) & 1) << 7);
                    for (int64_t j = 0; j < kNBlock; ++j)
                        for (int e = 0; e < cnt[j]; ++e) {
                            st[4 * j + e] |= uint8_t(cols[j][e] - base);
                            st[64 + 4 * j + e] = uint8_t(w8[(nb * kNBlock + j) * ldw + cols[j][e]]);
                        }
                    ++t;
                });
            }
            stepptr[h.np / kNBlock] = t;
            break;
        }
        case SparseFormat::kEllF32: {
            auto* stepptr = reinterpret_cast<int64_t*>(out + l.stepptr);
            uint8_t* steps = out + l.steps;
            int64_t t = 0;
            for (int64_t nb = 0; nb < h.np / kNBlock; ++nb) {
                stepptr[nb] = t;
                ell_plan_block(wf, ldw, n, k, h.kp, nb, kEllF32Win, kEllF32Align, 1, h.flags & kSparseEllPaired,
                               [&](int64_t base, const int64_t (*cols)[4], const int* cnt) {
                    uint8_t* st = steps + t * kEllF32Step;
                    auto* vals = reinterpret_cast<float*>(st);
                    for (int b = 0; b < 16; ++b) st[64 + b] = uint8_t(((uint64_t(base / kEllF32Align) >> b) & 1) << 7);
                    for (int64_t j = 0; j < kNBlock; ++j)
                        if (cnt[j]) {
                            st[64 + j] |= uint8_t(0x40 | (cols[j][0] - base));
                            vals[j] = wf[(nb * kNBlock + j) * ldw + cols[j][0]];
                        }
                    ++t;
                });
            }
            stepptr[h.np / kNBlock] = t;
            break;
        }
    }
    return Status::ok();
}

Status sparse_view(const uint8_t* buf, int64_t nbytes, SparseView* v) {
    if (nbytes < int64_t(sizeof(SparseHeader))) return Status::invalid("sparse weight: buffer too small");
    if (reinterpret_cast<uintptr_t>(buf) % 64 != 0)
        return Status::invalid("sparse weight: buffer must be 64-byte aligned");
    SparseHeader h;
    std::memcpy(&h, buf, sizeof(h));
    if (h.magic != kSparseMagic) return Status::invalid("sparse weight: bad magic (not a fastinfer sparse weight)");
    // Version 2 changed the ell and 2:4 layouts: csr and block buffers of version 1 read unchanged.
    if (h.version != kSparseVersion && !(h.version == 1 && (h.format == uint32_t(SparseFormat::kCsrF32) ||
                                                            h.format == uint32_t(SparseFormat::kCsrI8) ||
                                                            h.format == uint32_t(SparseFormat::kBlockI8))))
        return Status::invalid("sparse weight: format version " + std::to_string(h.version) +
                               ", this build reads version " + std::to_string(kSparseVersion));
    if (!valid_format(h.format)) return Status::invalid("sparse weight: unknown format");
    const SparseFormat fmt = SparseFormat(h.format);
    const bool csr = fmt == SparseFormat::kCsrF32 || fmt == SparseFormat::kCsrI8;
    if (h.n < 0 || h.k < 0 || h.n > kMaxSparseDim || h.k > kMaxSparseDim || h.n * h.k > kMaxSparseElems ||
        h.np != round_up(h.n, kNBlock) ||
        h.kp != round_up(h.k, kKAlign) || h.nnz < 0 ||
        (csr && (h.idx_bytes != (h.k <= 65536 ? 2u : 4u) || h.nnz > h.n * h.k)) ||
        (fmt == SparseFormat::kNm24I8 && h.nnz != h.np * h.kp / 2) ||
        (fmt == SparseFormat::kBlockI8 && h.nnz > (h.np / kNBlock) * (h.kp / kTileK)) ||
        ((fmt == SparseFormat::kEllI8 || fmt == SparseFormat::kEllF32) && h.nnz > 2 * h.np * h.kp) ||  // a nonzero per pair
        (fmt == SparseFormat::kEllF32 && h.kp > kEllF32MaxK) ||
        (h.flags != 0 && !((fmt == SparseFormat::kEllI8 || fmt == SparseFormat::kEllF32) && h.flags == kSparseEllPaired)))
        return Status::invalid("sparse weight: inconsistent header");
    const Layout l = layout_of(h);
    if (l.total != nbytes) return Status::invalid("sparse weight: header and buffer size disagree");
    v->fmt = fmt;
    v->n = h.n;
    v->k = h.k;
    v->np = h.np;
    v->kp = h.kp;
    v->nnz = h.nnz;
    v->idx_bytes = int(h.idx_bytes);
    v->ell_paired = (h.flags & kSparseEllPaired) != 0;
    if (csr) {
        v->rowptr = reinterpret_cast<const int64_t*>(buf + l.rowptr);
        v->idx = buf + l.idx;
        v->values = buf + l.values;
        if (v->rowptr[0] != 0 || v->rowptr[h.n] != h.nnz)
            return Status::invalid("sparse weight: corrupt row pointers");
    } else if (fmt == SparseFormat::kEllF32) {
        v->stepptr = reinterpret_cast<const int64_t*>(buf + l.stepptr);
        v->steps = buf + l.steps;
        if (v->stepptr[0] != 0 || v->stepptr[h.np / kNBlock] != h.nnz)
            return Status::invalid("sparse weight: corrupt step pointers");
    } else {
        v->colsum = reinterpret_cast<const int32_t*>(buf + l.colsum);
        if (fmt == SparseFormat::kNm24I8) {
            v->panels = buf + l.panels;
        } else if (fmt == SparseFormat::kEllI8) {
            v->stepptr = reinterpret_cast<const int64_t*>(buf + l.stepptr);
            v->steps = buf + l.steps;
            if (v->stepptr[0] != 0 || v->stepptr[h.np / kNBlock] != h.nnz)
                return Status::invalid("sparse weight: corrupt step pointers");
        } else {
            v->tileptr = reinterpret_cast<const int64_t*>(buf + l.tileptr);
            v->tilek = reinterpret_cast<const int32_t*>(buf + l.tilek);
            v->tiles = reinterpret_cast<const int8_t*>(buf + l.tiles);
            const int64_t nblocks = h.np / kNBlock;
            if (v->tileptr[0] != 0 || v->tileptr[nblocks] != h.nnz)
                return Status::invalid("sparse weight: corrupt tile pointers");
        }
    }
    return Status::ok();
}

namespace {
// Everything the kernels trust beyond the header: monotonic row/tile pointers, indices in range,
// 2:4 masks with 32 bits. O(nnz): sparse_validate runs it once per buffer content (fastinfer.ops
// caches the result per tensor version), the kernels do not.
// Pointers [0, count] of a pointer section never decrease (checked before anything walks them).
Status check_monotonic(const int64_t* ptr, int64_t count, const char* what) {
    for (int64_t i = 0; i < count; ++i)
        if (ptr[i + 1] < ptr[i]) return Status::invalid(std::string("sparse weight: corrupt ") + what);
    return Status::ok();
}

// ell (int8, fp32): monotonic step pointers, and an even step count per block when steps are paired.
Status check_ell_step_pointers(const SparseView& v, int64_t nblocks) {
    Status st = check_monotonic(v.stepptr, nblocks, "step pointers");
    if (st.is_ok() && v.ell_paired)
        for (int64_t nb = 0; nb < nblocks; ++nb)
            if ((v.stepptr[nb + 1] - v.stepptr[nb]) % 2 != 0)
                return Status::invalid("sparse weight: paired ell block with an odd step count");
    return st;
}

// Every stored nonzero of row / channel r must come at a larger column than the one before it, in
// storage order (what sparse_pack writes): otherwise the kernels would add two values for one
// weight where unpack keeps one. last[r] = the previous column (-1 at first).
inline bool in_order(std::vector<int64_t>& last, int64_t r, int64_t col) {
    if (col <= last[size_t(r)]) return false;
    last[size_t(r)] = col;
    return true;
}

// Everything the kernels trust beyond the header: monotonic pointers, indices and windows in range,
// each weight stored once, and (int8 formats read by the u8-shifted VNNI kernels) the stored
// colsum equal to the sum of the stored values, so every ISA path and unpack agree. O(stored bytes).
Status check_indices(const SparseView& v) {
    const int64_t nblocks = v.np / kNBlock;
    std::vector<int64_t> last(size_t(v.np > v.n ? v.np : v.n), -1);
    std::vector<uint32_t> colsum(size_t(v.np), 0);  // recomputed mod 2^32, int8 formats
    Status st = Status::ok();
    if (v.fmt == SparseFormat::kCsrF32 || v.fmt == SparseFormat::kCsrI8) {
        if (!(st = check_monotonic(v.rowptr, v.n, "row pointers")).is_ok()) return st;
        for (int64_t r = 0; r < v.n; ++r)
            for (int64_t j = v.rowptr[r]; j < v.rowptr[r + 1]; ++j) {
                const int64_t c = v.idx_bytes == 2 ? int64_t(static_cast<const uint16_t*>(v.idx)[j])
                                                   : int64_t(static_cast<const int32_t*>(v.idx)[j]);
                if (c < 0 || c >= v.k) return Status::invalid("sparse weight: column index out of range");
                if (!in_order(last, r, c)) return Status::invalid("sparse weight: columns of a row repeat or are out of order");
            }
        return Status::ok();
    }
    if (v.fmt == SparseFormat::kBlockI8) {
        if (!(st = check_monotonic(v.tileptr, nblocks, "tile pointers")).is_ok()) return st;
        for (int64_t nb = 0; nb < nblocks; ++nb)
            for (int64_t t = v.tileptr[nb]; t < v.tileptr[nb + 1]; ++t) {
                if (v.tilek[t] < 0 || v.tilek[t] >= v.kp / kTileK)
                    return Status::invalid("sparse weight: tile index out of range");
                if (!in_order(last, nb, v.tilek[t])) return Status::invalid("sparse weight: tiles of a block repeat or are out of order");
                const int8_t* tile = v.tiles + t * kNBlock * kTileK;
                for (int64_t i = 0; i < kNBlock * kTileK; ++i)  // K4N16: byte i is channel (i / 4) % 16
                    colsum[size_t(nb * kNBlock + (i / 4) % kNBlock)] += uint32_t(int32_t(tile[i]));
            }
    }
    if (v.fmt == SparseFormat::kEllI8) {
        if (!(st = check_ell_step_pointers(v, nblocks)).is_ok()) return st;
        const int64_t win = ell_window(v.kp);
        for (int64_t nb = 0; nb < nblocks; ++nb)
            for (int64_t t = v.stepptr[nb]; t < v.stepptr[nb + 1]; ++t) {
                const uint8_t* st8 = v.steps + t * kEllStep;
                const uint64_t base64 = ell_base64(st8);
                if (base64 > uint64_t(v.kp - win) / 64) return Status::invalid("sparse weight: ell window out of range");
                if (v.ell_paired && (t - v.stepptr[nb]) % 2 == 1 && base64 != ell_base64(st8 - kEllStep))
                    return Status::invalid("sparse weight: paired ell steps with different windows");
                const int64_t base = int64_t(base64) * 64;
                for (int b = 0; b < 64; ++b) {
                    if ((st8[b] & 127) >= win) return Status::invalid("sparse weight: ell index out of range");
                    const int8_t val = int8_t(st8[64 + b]);
                    if (val == 0) continue;  // padding
                    const int64_t r = nb * kNBlock + b / 4, col = base + (st8[b] & 127);
                    if (!in_order(last, r, col)) return Status::invalid("sparse weight: ell columns of a channel repeat or are out of order");
                    colsum[size_t(r)] += uint32_t(int32_t(val));
                }
            }
    }
    if (v.fmt == SparseFormat::kEllF32) {
        if (!(st = check_ell_step_pointers(v, nblocks)).is_ok()) return st;
        for (int64_t nb = 0; nb < nblocks; ++nb)
            for (int64_t t = v.stepptr[nb]; t < v.stepptr[nb + 1]; ++t) {
                const uint8_t* st8 = v.steps + t * kEllF32Step;
                const int64_t base = int64_t(ell_f32_base16(st8)) * kEllF32Align;
                if (base + kEllF32Win > v.kp) return Status::invalid("sparse weight: ell window out of range");
                if (v.ell_paired && (t - v.stepptr[nb]) % 2 == 1 && ell_f32_base16(st8) != ell_f32_base16(st8 - kEllF32Step))
                    return Status::invalid("sparse weight: paired ell steps with different windows");
                for (int j = 0; j < 16; ++j) {
                    if (!(st8[64 + j] & 0x40)) continue;  // padding lane
                    const int64_t r = nb * kNBlock + j, col = base + (st8[64 + j] & 63);
                    if (col >= v.k || r >= v.n) return Status::invalid("sparse weight: ell index out of range");
                    if (!in_order(last, r, col)) return Status::invalid("sparse weight: ell columns of a channel repeat or are out of order");
                }
            }
        return Status::ok();
    }
    if (v.fmt == SparseFormat::kNm24I8) {
        // Every 2-bit position is in range; the two positions of a group must differ (otherwise the
        // kernel would count one input twice where unpack keeps one value).
        for (int64_t t = 0; t < nblocks * (v.kp / kNm24StepK); ++t) {
            const uint8_t* meta = v.panels + t * kNm24Step;
            const auto* vals = reinterpret_cast<const int8_t*>(meta + kNm24Meta);
            for (int b = 0; b < kNm24Meta; ++b)
                if ((meta[b] & 3) == (meta[b] >> 2 & 3) || (meta[b] >> 4 & 3) == (meta[b] >> 6))
                    return Status::invalid("sparse weight: corrupt 2:4 positions");
            const int64_t nb = t / (v.kp / kNm24StepK);
            for (int slot = 0; slot < 64; ++slot) colsum[size_t(nb * kNBlock + slot / 4)] += uint32_t(int32_t(vals[slot]));
        }
    }
    // the int8 formats with a colsum section: 2:4, block, ell
    for (int64_t r = 0; r < v.np; ++r)
        if (uint32_t(v.colsum[r]) != colsum[size_t(r)])
            return Status::invalid("sparse weight: stored column sums do not match the stored values");
    return Status::ok();
}
}  // namespace

Status sparse_validate(const uint8_t* buf, int64_t nbytes) {
    SparseView v;
    Status st = sparse_view(buf, nbytes, &v);
    if (!st.is_ok()) return st;
    return check_indices(v);
}

Status sparse_unpack(const uint8_t* buf, int64_t nbytes, void* w) {
    SparseView v;
    Status st = sparse_view(buf, nbytes, &v);
    if (!st.is_ok() || !(st = check_indices(v)).is_ok()) return st;
    if (v.fmt == SparseFormat::kEllF32) {
        auto* out = static_cast<float*>(w);
        std::memset(out, 0, size_t(v.n * v.k) * 4);
        for (int64_t nb = 0; nb < v.np / kNBlock; ++nb)
            for_each_ell_f32(v, nb, [&](int j, int64_t col, float val) { out[(nb * kNBlock + j) * v.k + col] = val; });
        return Status::ok();
    }
    if (v.fmt == SparseFormat::kCsrF32 || v.fmt == SparseFormat::kCsrI8) {
        const size_t es = v.fmt == SparseFormat::kCsrF32 ? 4 : 1;
        std::memset(w, 0, size_t(v.n * v.k) * es);
        for (int64_t r = 0; r < v.n; ++r)
            for (int64_t j = v.rowptr[r]; j < v.rowptr[r + 1]; ++j) {
                const int64_t c = v.idx_bytes == 2 ? int64_t(static_cast<const uint16_t*>(v.idx)[j])
                                                   : int64_t(static_cast<const int32_t*>(v.idx)[j]);
                if (es == 4)
                    static_cast<float*>(w)[r * v.k + c] = static_cast<const float*>(v.values)[j];
                else
                    static_cast<int8_t*>(w)[r * v.k + c] = static_cast<const int8_t*>(v.values)[j];
            }
        return Status::ok();
    }
    Scratch panel_buf;
    int8_t* p = reinterpret_cast<int8_t*>(panel_buf.get(size_t(kNBlock * v.kp)));
    if (!p) return Status::runtime("out of memory");
    for (int64_t nb = 0; nb < v.np / kNBlock; ++nb) {
        ref::panel(v, nb, p);
        for (int64_t j = 0; j < kNBlock && nb * kNBlock + j < v.n; ++j)
            for (int64_t c = 0; c < v.k; ++c)
                static_cast<int8_t*>(w)[(nb * kNBlock + j) * v.k + c] = p[(c / 4) * 64 + j * 4 + c % 4];
    }
    return Status::ok();
}

// ------------------------------------------------------------------------------------ entry points

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

// 2:4, block and ell int8 on activations a (shifted as kt.shift_u8 says).
Status run_panels(const KernelTable& kt, const Activations& a, const SparseView& w, const Epilogue& ep) {
    const SparseGemmFn kernel = w.fmt == SparseFormat::kBlockI8 ? kt.block_i8
                                : w.fmt == SparseFormat::kNm24I8 ? kt.nm24_i8
                                                                 : kt.ell_i8;
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

Status check_sparse(const char* name, int64_t m, int64_t k, int64_t ldx, const uint8_t* buf, int64_t nbytes,
                    int64_t ldo, SparseView* w, bool want_int8) {
    Status st = check_dims(m, k, ldx, name);
    if (!st.is_ok()) return st;
    if (!(st = sparse_view(buf, nbytes, w)).is_ok()) return st;
    if (is_int8(w->fmt) != want_int8)
        return Status::invalid(std::string(name) + (want_int8 ? ": needs an int8 sparse weight"
                                                              : ": needs an fp32 sparse weight"));
    if (w->k != k) return Status::invalid(std::string(name) + ": K of the input and the weight differ");
    if (m > 0 && ldo < w->n) return Status::invalid(std::string(name) + ": out row stride smaller than N");
    return Status::ok();
}

}  // namespace

Status sparse_linear_f32(const float* x, int64_t m, int64_t k, int64_t ldx, const uint8_t* buf,
                         int64_t nbytes, const float* bias, float* out, int64_t ldo) {
    SparseView w;
    Status st = check_sparse("sparse_linear", m, k, ldx, buf, nbytes, ldo, &w, false);
    if (!st.is_ok() || m == 0 || w.n == 0) return st;
    const KernelTable& kt = active_kernels();
    if (w.fmt == SparseFormat::kEllF32) return run_ell_f32(kt, x, m, ldx, w, bias, out, ldo);
    return run_csr_f32(kt, x, m, ldx, w, bias, out, ldo);
}

Status sparse_int8_matmul(const int8_t* a, int64_t m, int64_t k, int64_t lda, const uint8_t* buf,
                          int64_t nbytes, int32_t* out, int64_t ldo) {
    SparseView w;
    Status st = check_sparse("sparse_int8_matmul", m, k, lda, buf, nbytes, ldo, &w, true);
    if (!st.is_ok() || m == 0 || w.n == 0) return st;
    const KernelTable& kt = active_kernels();
    const bool csr = w.fmt == SparseFormat::kCsrI8;
    int8_t* q;
    float* sa;
    if (!(st = prepare_activations(m, w.kp, &q, &sa)).is_ok()) return st;
    copy_activations(a, m, k, lda, q, w.kp, !csr && kt.shift_u8);  // the CSR kernels take signed activations
    const Epilogue ep{DType::kI32, out, ldo, nullptr, nullptr, nullptr};
    if (csr) return run_csr_i8(kt, q, m, w, ep);
    return run_panels(kt, Activations{q, m, w.kp}, w, ep);
}

Status sparse_int8_linear(const void* x, DType dt, int64_t m, int64_t k, int64_t ldx, const uint8_t* buf,
                          int64_t nbytes, const float* sw, const float* bias, void* out, DType out_dt,
                          int64_t ldo) {
    if (dt != DType::kF32 && dt != DType::kBF16)
        return Status::invalid("sparse_int8_linear: x must be float32 or bfloat16");
    if (out_dt != DType::kF32 && out_dt != DType::kBF16)
        return Status::invalid("sparse_int8_linear: out must be float32 or bfloat16");
    SparseView w;
    Status st = check_sparse("sparse_int8_linear", m, k, ldx, buf, nbytes, ldo, &w, true);
    if (!st.is_ok() || m == 0 || w.n == 0) return st;
    const KernelTable& kt = active_kernels();
    const bool csr = w.fmt == SparseFormat::kCsrI8;
    int8_t* q;
    float* sa;
    if (!(st = prepare_activations(m, w.kp, &q, &sa)).is_ok()) return st;
    quantize_activations(kt, x, dt, m, k, ldx, q, w.kp, sa, !csr && kt.shift_u8);
    const Epilogue ep{out_dt, out, ldo, sa, sw, bias};
    if (csr) return run_csr_i8(kt, q, m, w, ep);
    return run_panels(kt, Activations{q, m, w.kp}, w, ep);
}

}  // namespace fastinfer::cpu
