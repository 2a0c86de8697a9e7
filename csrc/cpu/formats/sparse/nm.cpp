// kNm24I8 (2:4): plan, layout, pack, view, validate, panel (nm.h).
#include "cpu/formats/sparse/nm.h"

#include <algorithm>
#include <string>

#include "cpu/formats/sparse/common.h"
#include "cpu/formats/sparse/traits.h"

namespace fastinfer::cpu {

using namespace sparse_detail;

namespace {

Status plan(const void* w, int64_t ldw, SparseHeader* h) {
    const auto* w8 = static_cast<const int8_t*>(w);
    const int64_t n = h->n, k = h->k;
    for (int64_t r = 0; r < n; ++r)
        for (int64_t g = 0; g < k; g += 4) {
            int cnt = 0;
            for (int64_t t = g; t < std::min(k, g + 4); ++t) cnt += nonzero(w8, ldw, r, t);
            if (cnt > 2)
                return Status::invalid("sparse_pack: not 2:4 sparse (row " + std::to_string(r) + ", inputs " +
                                       std::to_string(g) + ".." + std::to_string(std::min(k, g + 4) - 1) +
                                       " hold " + std::to_string(cnt) + " nonzeros)");
        }
    h->nnz = h->np * h->kp / 2;
    return Status::ok();
}

void layout(const SparseHeader& h, int64_t off, SparseLayout* l) {
    l->colsum = off;
    off += a64(4 * h.np);
    l->panels = off;
    off += (h.np / kNBlock) * nm24_block_bytes(h.kp);
    l->total = off;
}

bool header_ok(const SparseHeader& h) { return h.nnz == h.np * h.kp / 2 && h.flags == 0; }

void pack(const void* w, int64_t ldw, const SparseHeader& h, const SparseLayout& l, uint8_t* out) {
    const auto* w8 = static_cast<const int8_t*>(w);
    const int64_t n = h.n, k = h.k;
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
}

Status view(const uint8_t* buf, const SparseLayout& l, SparseView* v) {
    v->colsum = reinterpret_cast<const int32_t*>(buf + l.colsum);
    v->panels = buf + l.panels;
    return Status::ok();
}

// Every 2-bit position is in range; the two positions of a group must differ (otherwise the kernel
// would count one input twice where unpack keeps one value).
Status validate(const SparseView& v) {
    const int64_t nblocks = v.np / kNBlock;
    std::vector<uint32_t> colsum(size_t(v.np), 0);
    for (int64_t t = 0; t < nblocks * (v.kp / kNm24StepK); ++t) {
        const uint8_t* meta = v.panels + t * kNm24Step;
        const auto* vals = reinterpret_cast<const int8_t*>(meta + kNm24Meta);
        for (int b = 0; b < kNm24Meta; ++b)
            if ((meta[b] & 3) == (meta[b] >> 2 & 3) || (meta[b] >> 4 & 3) == (meta[b] >> 6))
                return Status::invalid("sparse weight: corrupt 2:4 positions");
        const int64_t nb = t / (v.kp / kNm24StepK), s = t % (v.kp / kNm24StepK);
        for (int slot = 0; slot < 64; ++slot) {
            if (vals[slot] == 0) continue;
            const int64_t r = nb * kNBlock + slot / 4;
            const int64_t c = s * kNm24StepK + 4 * (slot % 4 / 2) + (meta[slot / 4] >> (2 * (slot % 4)) & 3);
            if (r >= v.n || c >= v.k) return Status::invalid("sparse weight: a value in the padding (channel >= N or k >= K)");
            colsum[size_t(r)] += uint32_t(int32_t(vals[slot]));
        }
    }
    return check_colsum(v, colsum);
}

int64_t count_nonzero(const SparseView& v) {
    int64_t c = 0;
    for (int64_t t = 0; t < (v.np / kNBlock) * (v.kp / kNm24StepK); ++t) {
        const auto* vals = reinterpret_cast<const int8_t*>(v.panels + t * kNm24Step + kNm24Meta);
        for (int slot = 0; slot < 64; ++slot) c += vals[slot] != 0;
    }
    return c;
}

void panel(const SparseView& v, int64_t nb, int8_t* out) {
    const uint8_t* blk = v.panels + nb * nm24_block_bytes(v.kp);
    for (int64_t s = 0; s < v.kp / kNm24StepK; ++s) {
        const uint8_t* meta = blk + s * kNm24Step;
        const auto* vals = reinterpret_cast<const int8_t*>(meta + kNm24Meta);
        for (int slot = 0; slot < 64; ++slot) {
            const int j = slot / 4, g = slot % 4 / 2, pos = meta[slot / 4] >> (2 * (slot % 4)) & 3;
            const int64_t c = s * kNm24StepK + 4 * g + pos;
            out[(c / 4) * 64 + j * 4 + c % 4] = vals[slot];
        }
    }
}

}  // namespace

const FormatTraits kNm24Traits = {
    SparseFormat::kNm24I8, /*int8=*/true, /*reads_version1=*/false, SparseRun::kPanels, &KernelTable::nm24_i8,
    plan, layout, header_ok, pack, view, validate, /*unpack=*/nullptr, panel, count_nonzero,
};

}  // namespace fastinfer::cpu
