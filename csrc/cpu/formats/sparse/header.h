// Sparse weight formats of the CPU engine: what a buffer holds, and a checked view of it.
//
// One buffer per layer: [SparseHeader 64 B][sections, each 64-byte aligned]. Formats:
//  kCsrF32 / kCsrI8  unstructured, row-compressed: rowptr int64 [n+1], column indices (uint16 when
//                    K <= 65536, else int32) [nnz], values (fp32 or int8) [nnz].
//  kNm24I8           2:4 along K: per 16-channel block and "step" of 8 inputs (two groups of 4), 80
//                    bytes: 16 bytes of 2-bit positions, then 64 kept values, 4 per channel (slot
//                    4j + 2g + i: channel j, group g, i-th kept input; its position within the group is
//                    bits 2*(slot%4) of byte slot/4). 40 bytes per 64 weights. The VBMI kernel turns
//                    the positions into activation indices (vpermw, vpmultishiftqb, vpternlogd) and
//                    gathers the activations with vpermb, so each vpdpbusd covers 8 inputs of 16
//                    channels: half the multiplies of the dense kernel. Groups with fewer than 2
//                    nonzeros keep explicit zeros; the two positions of a group always differ.
//  kBlockI8          tiles of 16 channels x 64 k (the VNNI kernel's panel granularity): per 16-channel
//                    block a range of its nonzero tiles (tileptr int64 [nb+1], tile k-index int32
//                    [tiles]); tile data in K4N16 order, 1 KiB each. All-zero tiles are skipped.
//  kEllI8            unstructured int8 at any M: per 16-channel block a sequence of "steps" of 128
//                    bytes, 64 index bytes then 64 values, 4 per channel (channel j owns bytes
//                    4j..4j+3; a channel with nothing left in the step pads with value 0). The low 7
//                    bits of index byte b give the input base + (idx & 127); bit 7 of byte b is bit b
//                    of base / 64, the step's window start (vpermi2b ignores bit 7, and one vpmovb2m
//                    reads the base back). The window is min(128, kp) inputs, so one vpermi2b gathers
//                    the 64 activation bytes of a step from two registers and one vpdpbusd multiplies them. The window slides
//                    with the block's least advanced channel (steps are planned greedily: each channel
//                    takes its next <= 4 nonzeros inside the window), which pads far less than fixed
//                    segments (10% density: 1.24 stored slots per nonzero instead of 1.93 for fixed
//                    64-input segments). stepptr int64 [np/16 + 1] gives each block its steps.
//  kEllF32           unstructured fp32, the ell idea for 16 fp32 lanes: per 16-channel block, steps of
//                    80 bytes, 16 fp32 values (lane j = channel j, one nonzero each) then 16 index
//                    bytes: bits 0-5 the input within a 64-input window (base + idx), bit 6 set when
//                    the lane holds a value (padding lanes are skipped by a masked FMA, so a zero
//                    weight never meets an Inf activation), bit 7 of byte b = bit b of base / 16.
//                    Two vpermi2ps and a blend gather the 16 activations from four registers: no
//                    memory gathers. K <= 2^20. stepptr int64 [np/16 + 1]. Steps may come in pairs
//                    sharing a window (header flag kSparseEllPaired), like int8 ell.
// The int8 formats also store colsum int32 [np] (sum of each row's weights) for the u8 shift.
#pragma once

#include "cpu/common.h"

namespace fastinfer::cpu {

enum class SparseFormat : uint32_t { kCsrF32 = 1, kCsrI8 = 2, kNm24I8 = 3, kBlockI8 = 4, kEllI8 = 5, kEllF32 = 6 };

constexpr uint32_t kSparseMagic = 0x53384946u;  // "FI8S"
constexpr uint32_t kSparseVersion = 2;  // 2: ell with sliding windows, 2:4 with positions (v1 buffers of these are rejected)
constexpr int64_t kTileK = 64;  // block format: tiles of kNBlock channels x kTileK inputs

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
    const int32_t* colsum = nullptr;  // 2:4, block [np]
    const uint8_t* panels = nullptr;  // 2:4: np/16 blocks of kp/8 steps of 80 bytes
    const int64_t* tileptr = nullptr; // block [np/16 + 1]
    const int32_t* tilek = nullptr;   // block [tiles]: k-tile index of each tile
    const int8_t* tiles = nullptr;    // block [tiles][kTileK / 4][16][4]
    const int64_t* stepptr = nullptr; // ell (int8 and fp32) [np/16 + 1]
    const uint8_t* steps = nullptr;   // ell [nnz][128]; fp32 ell [nnz][80]
};

constexpr int64_t kEllWin = 128;    // inputs per window (two zmm of activations; min(128, kp))
constexpr int64_t kEllStep = 128;   // bytes per step: 64 indices + 64 values
constexpr int64_t kEllF32Win = 64;     // fp32 ell: inputs per window (four zmm of activations)
constexpr int64_t kEllF32Align = 16;   // fp32 ell: window starts are multiples of 16 inputs
constexpr int64_t kEllF32Step = 80;    // fp32 ell: 16 values + 16 index bytes
constexpr int64_t kEllF32MaxK = int64_t(1) << 20;  // the window start (in units of 16) fits 16 bits
static_assert((kEllF32MaxK - kEllF32Win) / kEllF32Align <= 65535, "fp32 ell base fits 16 bits");
constexpr int64_t kNm24StepK = 8;    // 2:4: inputs per step
constexpr int kNm24Meta = 16;         // 2:4: position bytes per step
constexpr int64_t kNm24Step = 80;     // 2:4: bytes per step (positions + 64 values)

// In an unnamed namespace, like the helpers of common.h: ISA files include this header too, and the
// linker must never hand baseline code a copy compiled with their flags.
namespace {
constexpr int64_t ell_window(int64_t kp) { return kp < kEllWin ? kp : kEllWin; }
constexpr int64_t nm24_block_bytes(int64_t kp) { return kp / kNm24StepK * kNm24Step; }
// Window start of an fp32 ell step in units of 16 inputs, from bit 7 of its 16 index bytes.
inline uint32_t ell_f32_base16(const uint8_t* step) {
    uint32_t b16 = 0;
    for (int b = 0; b < 16; ++b) b16 |= uint32_t(step[64 + b] >> 7) << b;
    return b16;
}
// Window start of an ell step in units of 64 inputs, from bit 7 of its 64 index bytes.
inline uint64_t ell_base64(const uint8_t* step) {
    uint64_t b64 = 0;
    for (int b = 0; b < 64; ++b) b64 |= uint64_t(step[b] >> 7) << b;
    return b64;
}

// Every stored value of fp32 ell block nb, in step order: f(channel in block, column, value).
template <class F>
void for_each_ell_f32(const SparseView& v, int64_t nb, F&& f) {
    for (int64_t t = v.stepptr[nb]; t < v.stepptr[nb + 1]; ++t) {
        const uint8_t* st = v.steps + t * kEllF32Step;
        const int64_t base = int64_t(ell_f32_base16(st)) * kEllF32Align;
        for (int j = 0; j < 16; ++j)
            if (st[64 + j] & 0x40) {
                float val;
                __builtin_memcpy(&val, st + 4 * j, 4);
                f(j, base + (st[64 + j] & 63), val);
            }
    }
}
}  // namespace

}  // namespace fastinfer::cpu
