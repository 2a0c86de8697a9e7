// Packed int8 weights ("K4N16"): W[N,K] stored as blocks of 16 output channels; inside a block,
// for each group of 4 consecutive k, the 4 bytes of channel 0, then channel 1, ... (64 bytes a group).
// This is the operand order of vpdpbusd (one zmm = 16 channels x 4 k) and of an AMX B tile.
// N is padded to a multiple of 16, K to a multiple of 64, padding is zero.
// Buffer: [header 64 B][colsum int32 x Np][blocks int8 x Np*Kp].
#pragma once

#include "cpu/common.h"

namespace fastinfer::cpu {

constexpr uint32_t kPackMagic = 0x57384946u;  // "FI8W"
constexpr uint32_t kPackVersion = 1;
constexpr uint32_t kLayoutK4N16 = 1;

struct PackHeader {
    uint32_t magic;
    uint32_t version;
    uint32_t layout;
    uint32_t reserved;
    int64_t n, k, np, kp;
    uint8_t pad[64 - 48];
};
static_assert(sizeof(PackHeader) == 64, "header is 64 bytes");

// Bytes of the packed buffer of an [n, k] weight. Sizes from an untrusted header go through
// checked_packed_nbytes: n and k may each be up to kMaxDim, so np * kp can pass 2^63.
constexpr int64_t packed_nbytes(int64_t n, int64_t k) {
    return int64_t(sizeof(PackHeader)) + 4 * round_up(n, kNBlock) + round_up(n, kNBlock) * round_up(k, kKAlign);
}
// False when n or k is out of [0, kMaxDim] or the size overflows int64; else *nbytes as above.
bool checked_packed_nbytes(int64_t n, int64_t k, int64_t* nbytes);

// A read-only view of a packed buffer after its header was checked.
struct PackedW {
    int64_t n, k, np, kp;
    const int32_t* colsum;  // [np]: sum over k of W[n, k] (zero for padding channels)
    const int8_t* data;     // [np/16][kp/4][16][4]
};

// Packs W int8 [n, k] (row stride ldw) into out, which holds packed_nbytes(n, k) bytes.
Status pack_weight(const int8_t* w, int64_t n, int64_t k, int64_t ldw, uint8_t* out,
                   int64_t out_nbytes);
// Checks a packed buffer's header and returns a view of it (O(1): what every call checks).
Status view_packed(const uint8_t* buf, int64_t nbytes, PackedW* view);
// Everything the kernels trust beyond the header, O(bytes): the header's unused bytes are zero,
// every padding byte (channels n..np, k..kp) is zero and each column sum equals the sum of its
// stored weights (mod 2^32). The VNNI kernels read both (they subtract 128 * colsum and multiply the
// padding by the shifted zero 128); ref and avx2 read neither, so a buffer that passes gives the same
// result on every ISA. The Python ops run it once per tensor version (fastinfer/ops/_common.py).
Status validate_packed(const uint8_t* buf, int64_t nbytes);
// Unpacks back to W int8 [n, k] (contiguous).
Status unpack_weight(const uint8_t* buf, int64_t nbytes, int8_t* w);

}  // namespace fastinfer::cpu
