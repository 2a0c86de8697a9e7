// Sparse weight buffers of the CPU engine: the header every format shares and the checked view the
// kernels read. One buffer per layer: [SparseHeader 64 B][sections, each 64-byte aligned]. The
// formats, one pair of files each (measure/plan, pack, view, validate, unpack, traits.h):
//   csr.h    kCsrF32 / kCsrI8  unstructured, row-compressed
//   nm.h     kNm24I8           2:4 along K, kept values + 2-bit positions
//   block.h  kBlockI8          16 x 64 tiles, all-zero tiles skipped
//   ell.h    kEllI8 / kEllF32  16-channel steps in sliding input windows
// The int8 formats other than csr also store colsum int32 [np] (sum of each row's weights) for the
// u8 shift of the VNNI kernels.
#pragma once

#include "cpu/common.h"

namespace fastinfer::cpu {

enum class SparseFormat : uint32_t { kCsrF32 = 1, kCsrI8 = 2, kNm24I8 = 3, kBlockI8 = 4, kEllI8 = 5, kEllF32 = 6 };

constexpr uint32_t kSparseMagic = 0x53384946u;  // "FI8S"
constexpr uint32_t kSparseVersion = 2;  // 2: ell with sliding windows, 2:4 with positions (v1 buffers of these are rejected)
constexpr int64_t kMaxSparseDim = int64_t(1) << 31;
constexpr int64_t kMaxSparseElems = int64_t(1) << 40;  // n * k: every section size stays far from overflow
// A valid buffer may declare a dense shape far larger than itself (an all-zero [n, k] csr layer is
// ~8n bytes). Nothing here allocates by the declared shape: sparse_count_nonzero reads the stored
// values only, and the dense [n, k] of sparse_unpack is allocated (and bounded) by the caller
// (fastinfer.ops.unpack_sparse: at most max(2^26, 4096 x the buffer's bytes) padded weights unless
// the caller vouches for the shape, as a layer does for its own).

struct SparseHeader {
    uint32_t magic;
    uint32_t version;
    uint32_t format;
    uint32_t idx_bytes;  // CSR: 2 or 4; others 0
    int64_t n, k, np, kp;
    int64_t nnz;  // CSR: stored nonzeros; 2:4: kept slots (np * kp / 2); block: nonzero tiles; ell: steps
    int64_t flags;  // kSparseEllPaired for ell (int8 or fp32); 0 otherwise
};
// ell: the steps of every block come in pairs with the same window (an even count per block),
// so kernels with several rows load each row's window once per pair. Chosen by sparse_pack when it
// costs at most 3% more steps (denser layers; at 10% density pairs would add ~6%).
constexpr int64_t kSparseEllPaired = 1;
static_assert(sizeof(SparseHeader) == 64, "sparse header is 64 bytes");

// A checked, read-only view of a sparse buffer.
struct SparseView {
    SparseFormat fmt;
    int64_t n, k, np, kp, nnz;
    bool ell_paired = false;
    int idx_bytes;
    const int64_t* rowptr = nullptr;  // CSR [n+1]
    const void* idx = nullptr;        // CSR [nnz] uint16 or int32
    const void* values = nullptr;     // CSR [nnz] float or int8
    const int32_t* colsum = nullptr;  // 2:4, block, ell int8 [np]
    const uint8_t* panels = nullptr;  // 2:4: np/16 blocks of kp/8 steps of 80 bytes
    const int64_t* tileptr = nullptr; // block [np/16 + 1]
    const int32_t* tilek = nullptr;   // block [tiles]: k-tile index of each tile
    const int8_t* tiles = nullptr;    // block [tiles][kTileK / 4][16][4]
    const int64_t* stepptr = nullptr; // ell (int8 and fp32) [np/16 + 1]
    const uint8_t* steps = nullptr;   // ell [nnz][128]; fp32 ell [nnz][80]
};

// Section offsets from the start of a buffer (those of its format; the others stay 0).
struct SparseLayout {
    int64_t rowptr = 0, idx = 0, values = 0, colsum = 0, panels = 0, tileptr = 0, tilek = 0, tiles = 0,
            stepptr = 0, steps = 0, total = 0;
};

}  // namespace fastinfer::cpu
