// kEllI8 / kEllF32: plan, layout, pack, view, validate, unpack / panel (ell.h). Both formats plan
// their steps with one greedy walk (ell_plan_block) and share the header and step-pointer checks.
#include "cpu/formats/sparse/ell.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "cpu/formats/sparse/common.h"
#include "cpu/formats/sparse/traits.h"

namespace fastinfer::cpu {

using namespace sparse_detail;

namespace {

bool is_f32(const SparseHeader& h) { return SparseFormat(h.format) == SparseFormat::kEllF32; }

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

// The plan of block nb in the layout of h's format (int8 or fp32).
template <class F>
void plan_block(const void* w, int64_t ldw, const SparseHeader& h, int64_t nb, bool paired, F&& step) {
    if (is_f32(h))
        ell_plan_block(static_cast<const float*>(w), ldw, h.n, h.k, h.kp, nb, kEllF32Win, kEllF32Align, 1, paired, step);
    else
        ell_plan_block(static_cast<const int8_t*>(w), ldw, h.n, h.k, h.kp, nb, ell_window(h.kp), 64, 4, paired, step);
}

Status plan(const void* w, int64_t ldw, SparseHeader* h) {
    if (is_f32(*h) && h->kp > kEllF32MaxK)
        return Status::invalid("sparse_pack: the float32 ell format supports K up to " + std::to_string(kEllF32MaxK));
    int64_t steps[2] = {0, 0};  // single, paired
    for (int paired = 0; paired < 2; ++paired)
        for (int64_t nb = 0; nb < h->np / kNBlock; ++nb)
            plan_block(w, ldw, *h, nb, paired != 0, [&](int64_t, const int64_t(*)[4], const int*) { ++steps[paired]; });
    const bool paired = steps[1] * 100 <= steps[0] * 103;
    h->flags = paired ? kSparseEllPaired : 0;
    h->nnz = steps[paired ? 1 : 0];
    return Status::ok();
}

void layout(const SparseHeader& h, int64_t off, SparseLayout* l) {
    if (!is_f32(h)) {
        l->colsum = off;
        off += a64(4 * h.np);
    }
    l->stepptr = off;
    off += a64(8 * (h.np / kNBlock + 1));
    l->steps = off;
    off += h.nnz * (is_f32(h) ? kEllF32Step : kEllStep);
    l->total = off;
}

bool header_ok(const SparseHeader& h) {
    return h.nnz <= 2 * h.np * h.kp &&  // a nonzero per pair
           (!is_f32(h) || h.kp <= kEllF32MaxK) && (h.flags == 0 || h.flags == kSparseEllPaired);
}

// The steps of every block, in plan order, and their pointers: write(step, nb, base, cols, cnt) fills
// each step's step_bytes bytes (zeroed).
template <class F>
void pack_steps(const void* w, int64_t ldw, const SparseHeader& h, const SparseLayout& l, uint8_t* out,
                int64_t step_bytes, F&& write) {
    auto* stepptr = reinterpret_cast<int64_t*>(out + l.stepptr);
    int64_t t = 0;
    for (int64_t nb = 0; nb < h.np / kNBlock; ++nb) {
        stepptr[nb] = t;
        plan_block(w, ldw, h, nb, h.flags & kSparseEllPaired, [&](int64_t base, const int64_t(*cols)[4], const int* cnt) {
            write(out + l.steps + t * step_bytes, nb, base, cols, cnt);
            ++t;
        });
    }
    stepptr[h.np / kNBlock] = t;
}

void pack_i8(const void* w, int64_t ldw, const SparseHeader& h, const SparseLayout& l, uint8_t* out) {
    const auto* w8 = static_cast<const int8_t*>(w);
    fill_colsum(w8, h.n, h.k, ldw, h.np, reinterpret_cast<int32_t*>(out + l.colsum));
    pack_steps(w, ldw, h, l, out, kEllStep,
               [&](uint8_t* st, int64_t nb, int64_t base, const int64_t(*cols)[4], const int* cnt) {
        for (int b = 0; b < 64; ++b) st[b] = uint8_t(((uint64_t(base / 64) >> b) & 1) << 7);
        for (int64_t j = 0; j < kNBlock; ++j)
            for (int e = 0; e < cnt[j]; ++e) {
                st[4 * j + e] |= uint8_t(cols[j][e] - base);
                st[64 + 4 * j + e] = uint8_t(w8[(nb * kNBlock + j) * ldw + cols[j][e]]);
            }
    });
}

void pack_f32(const void* w, int64_t ldw, const SparseHeader& h, const SparseLayout& l, uint8_t* out) {
    const auto* wf = static_cast<const float*>(w);
    pack_steps(w, ldw, h, l, out, kEllF32Step,
               [&](uint8_t* st, int64_t nb, int64_t base, const int64_t(*cols)[4], const int* cnt) {
        auto* vals = reinterpret_cast<float*>(st);
        for (int b = 0; b < 16; ++b) st[64 + b] = uint8_t(((uint64_t(base / kEllF32Align) >> b) & 1) << 7);
        for (int64_t j = 0; j < kNBlock; ++j)
            if (cnt[j]) {
                st[64 + j] |= uint8_t(0x40 | (cols[j][0] - base));
                vals[j] = wf[(nb * kNBlock + j) * ldw + cols[j][0]];
            }
    });
}

Status view(const uint8_t* buf, const SparseLayout& l, SparseView* v) {
    if (v->fmt == SparseFormat::kEllI8) v->colsum = reinterpret_cast<const int32_t*>(buf + l.colsum);
    v->stepptr = reinterpret_cast<const int64_t*>(buf + l.stepptr);
    v->steps = buf + l.steps;
    if (v->stepptr[0] != 0 || v->stepptr[v->np / kNBlock] != v->nnz)
        return Status::invalid("sparse weight: corrupt step pointers");
    return Status::ok();
}

// Monotonic step pointers, and an even step count per block when steps are paired.
Status check_step_pointers(const SparseView& v, int64_t nblocks) {
    Status st = check_monotonic(v.stepptr, nblocks, "step pointers");
    if (st.is_ok() && v.ell_paired)
        for (int64_t nb = 0; nb < nblocks; ++nb)
            if ((v.stepptr[nb + 1] - v.stepptr[nb]) % 2 != 0)
                return Status::invalid("sparse weight: paired ell block with an odd step count");
    return st;
}

Status validate_i8(const SparseView& v) {
    const int64_t nblocks = v.np / kNBlock;
    Status st = check_step_pointers(v, nblocks);
    if (!st.is_ok()) return st;
    ColumnOrder order(v.np);
    std::vector<uint32_t> colsum(size_t(v.np), 0);
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
                if (r >= v.n || col >= v.k) return Status::invalid("sparse weight: a value in the padding (channel >= N or k >= K)");
                if (!order.next(r, col)) return Status::invalid("sparse weight: ell columns of a channel repeat or are out of order");
                colsum[size_t(r)] += uint32_t(int32_t(val));
            }
        }
    return check_colsum(v, colsum);
}

Status validate_f32(const SparseView& v) {
    const int64_t nblocks = v.np / kNBlock;
    Status st = check_step_pointers(v, nblocks);
    if (!st.is_ok()) return st;
    ColumnOrder order(v.n);
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
                if (!order.next(r, col)) return Status::invalid("sparse weight: ell columns of a channel repeat or are out of order");
                float val;
                std::memcpy(&val, st8 + 4 * j, 4);
                if (!finite_f32(val)) return Status::invalid("sparse weight: a stored value is NaN or Inf");
            }
        }
    return Status::ok();
}

void unpack_f32(const SparseView& v, void* w) {
    auto* out = static_cast<float*>(w);
    if (v.n * v.k == 0) return;  // out may be null then (an empty tensor's data), and memset(nullptr) is UB
    std::memset(out, 0, size_t(v.n * v.k) * 4);
    for (int64_t nb = 0; nb < v.np / kNBlock; ++nb)
        for_each_ell_f32(v, nb, [&](int j, int64_t col, float val) { out[(nb * kNBlock + j) * v.k + col] = val; });
}

int64_t count_nonzero_f32(const SparseView& v) {
    int64_t c = 0;
    for (int64_t nb = 0; nb < v.np / kNBlock; ++nb)
        for_each_ell_f32(v, nb, [&](int, int64_t, float val) { c += val != 0.f; });
    return c;
}

int64_t count_nonzero_i8(const SparseView& v) {
    int64_t c = 0;
    for (int64_t t = 0; t < v.stepptr[v.np / kNBlock]; ++t)
        for (int b = 0; b < 64; ++b) c += v.steps[t * kEllStep + 64 + b] != 0;
    return c;
}

void panel_i8(const SparseView& v, int64_t nb, int8_t* out) {
    for (int64_t t = v.stepptr[nb]; t < v.stepptr[nb + 1]; ++t) {
        const uint8_t* st = v.steps + t * kEllStep;
        const int64_t base = int64_t(ell_base64(st)) * 64;
        for (int b = 0; b < 64; ++b) {
            const int8_t val = int8_t(st[64 + b]);
            if (val == 0) continue;
            const int64_t col = base + (st[b] & 127), j = b / 4;
            out[(col / 4) * 64 + j * 4 + col % 4] = val;
        }
    }
}

}  // namespace

const FormatTraits kEllI8Traits = {
    SparseFormat::kEllI8, /*int8=*/true, /*reads_version1=*/false, SparseRun::kPanels, &KernelTable::ell_i8,
    plan, layout, header_ok, pack_i8, view, validate_i8, /*unpack=*/nullptr, panel_i8, count_nonzero_i8,
};
const FormatTraits kEllF32Traits = {
    SparseFormat::kEllF32, /*int8=*/false, /*reads_version1=*/false, SparseRun::kEllF32, /*kernel=*/nullptr,
    plan, layout, header_ok, pack_f32, view, validate_f32, unpack_f32, /*panel=*/nullptr, count_nonzero_f32,
};

}  // namespace fastinfer::cpu
