// kBlockI8: plan, layout, pack, view, validate, panel (block.h).
#include "cpu/formats/sparse/block.h"

#include <algorithm>
#include <cstring>

#include "cpu/formats/sparse/common.h"
#include "cpu/formats/sparse/traits.h"

namespace fastinfer::cpu {

using namespace sparse_detail;

namespace {

// Whether tile (nb, kt) of w holds a nonzero.
bool tile_nonzero(const int8_t* w, int64_t ldw, int64_t n, int64_t k, int64_t nb, int64_t kt) {
    for (int64_t r = nb * kNBlock; r < std::min(n, (nb + 1) * kNBlock); ++r)
        for (int64_t c = kt * kTileK; c < std::min(k, (kt + 1) * kTileK); ++c)
            if (nonzero(w, ldw, r, c)) return true;
    return false;
}

Status plan(const void* w, int64_t ldw, SparseHeader* h) {
    int64_t tiles = 0;
    for (int64_t nb = 0; nb < h->np / kNBlock; ++nb)
        for (int64_t kt = 0; kt < h->kp / kTileK; ++kt)
            tiles += tile_nonzero(static_cast<const int8_t*>(w), ldw, h->n, h->k, nb, kt);
    h->nnz = tiles;
    return Status::ok();
}

void layout(const SparseHeader& h, int64_t off, SparseLayout* l) {
    l->colsum = off;
    off += a64(4 * h.np);
    l->tileptr = off;
    off += a64(8 * (h.np / kNBlock + 1));
    l->tilek = off;
    off += a64(4 * h.nnz);
    l->tiles = off;
    off += h.nnz * kNBlock * kTileK;
    l->total = off;
}

bool header_ok(const SparseHeader& h) { return h.nnz <= (h.np / kNBlock) * (h.kp / kTileK) && h.flags == 0; }

void pack(const void* w, int64_t ldw, const SparseHeader& h, const SparseLayout& l, uint8_t* out) {
    const auto* w8 = static_cast<const int8_t*>(w);
    const int64_t n = h.n, k = h.k;
    fill_colsum(w8, n, k, ldw, h.np, reinterpret_cast<int32_t*>(out + l.colsum));
    auto* tileptr = reinterpret_cast<int64_t*>(out + l.tileptr);
    auto* tilek = reinterpret_cast<int32_t*>(out + l.tilek);
    auto* tiles = reinterpret_cast<int8_t*>(out + l.tiles);
    int64_t t = 0;
    for (int64_t nb = 0; nb < h.np / kNBlock; ++nb) {
        tileptr[nb] = t;
        for (int64_t kt = 0; kt < h.kp / kTileK; ++kt) {
            if (!tile_nonzero(w8, ldw, n, k, nb, kt)) continue;
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
}

Status view(const uint8_t* buf, const SparseLayout& l, SparseView* v) {
    v->colsum = reinterpret_cast<const int32_t*>(buf + l.colsum);
    v->tileptr = reinterpret_cast<const int64_t*>(buf + l.tileptr);
    v->tilek = reinterpret_cast<const int32_t*>(buf + l.tilek);
    v->tiles = reinterpret_cast<const int8_t*>(buf + l.tiles);
    if (v->tileptr[0] != 0 || v->tileptr[v->np / kNBlock] != v->nnz)
        return Status::invalid("sparse weight: corrupt tile pointers");
    return Status::ok();
}

Status validate(const SparseView& v) {
    const int64_t nblocks = v.np / kNBlock;
    Status st = check_monotonic(v.tileptr, nblocks, "tile pointers");
    if (!st.is_ok()) return st;
    ColumnOrder order(nblocks);
    std::vector<uint32_t> colsum(size_t(v.np), 0);
    for (int64_t nb = 0; nb < nblocks; ++nb)
        for (int64_t t = v.tileptr[nb]; t < v.tileptr[nb + 1]; ++t) {
            if (v.tilek[t] < 0 || v.tilek[t] >= v.kp / kTileK) return Status::invalid("sparse weight: tile index out of range");
            if (!order.next(nb, v.tilek[t])) return Status::invalid("sparse weight: tiles of a block repeat or are out of order");
            const int8_t* tile = v.tiles + t * kNBlock * kTileK;
            for (int64_t i = 0; i < kNBlock * kTileK; ++i) {  // K4N16: byte i is channel (i / 4) % 16, k i / 64 * 4 + i % 4
                if (tile[i] == 0) continue;
                const int64_t r = nb * kNBlock + (i / 4) % kNBlock, c = v.tilek[t] * kTileK + i / 64 * 4 + i % 4;
                if (r >= v.n || c >= v.k) return Status::invalid("sparse weight: a value in the padding (channel >= N or k >= K)");
                colsum[size_t(r)] += uint32_t(int32_t(tile[i]));
            }
        }
    return check_colsum(v, colsum);
}

int64_t count_nonzero(const SparseView& v) {
    int64_t c = 0;
    for (int64_t i = 0; i < v.tileptr[v.np / kNBlock] * kNBlock * kTileK; ++i) c += v.tiles[i] != 0;
    return c;
}

void panel(const SparseView& v, int64_t nb, int8_t* out) {
    for (int64_t t = v.tileptr[nb]; t < v.tileptr[nb + 1]; ++t)
        std::memcpy(out + v.tilek[t] * kTileK * kNBlock, v.tiles + t * kNBlock * kTileK, size_t(kNBlock * kTileK));
}

}  // namespace

const FormatTraits kBlockTraits = {
    SparseFormat::kBlockI8, /*int8=*/true, /*reads_version1=*/true, SparseRun::kPanels, &KernelTable::block_i8,
    plan, layout, header_ok, pack, view, validate, /*unpack=*/nullptr, panel, count_nonzero,
};

}  // namespace fastinfer::cpu
