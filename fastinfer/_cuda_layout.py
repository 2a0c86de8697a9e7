"""Host reference of every data layout the CUDA kernels rely on (csrc/cuda/kernels.cu).

Nothing here needs a GPU: tests/test_cuda_layout.py checks these maps in CI (bijections, round
trips) and emulates one warp-level tile multiply through them, so a wrong index in the kernel's
addressing shows up without a device. The functions mirror the kernel's formulas one for one; a
change to either must be made to both.

mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 (PTX ISA, "matrix fragments for mma.m16n8k32"),
with groupID g = lane >> 2 and t = lane % 4:
  A (16 x 32 int8, row-major), 4 registers of 4 bytes: register r, byte b holds
      row = g + 8 * (r & 1), k = 4 * t + b + 16 * (r >> 1)
  B (32 x 8 int8, "col": W[n, k] rows), 2 registers: register r, byte b holds
      k = 4 * t + b + 16 * r, n = g
  C/D (16 x 8 int32), 4 registers: register r holds row = g + 8 * (r >> 1), col = 2 * t + (r & 1)
ldmatrix.sync.aligned.m8n8.x4.b16: lane l gives the address of row l % 8 of matrix l // 8; register
j of lane l then holds the 4 bytes at row l // 4, bytes 4 * (l % 4) .. + 3 of matrix j.
"""

from __future__ import annotations

import torch

# kernel constants (csrc/cuda/kernels.cu)
BM, BN, BK = 128, 128, 64
WM, WN = 64, 32
TILE_N, TILE_K = 128, 64  # RN128 weight padding (engine_cuda.h)
HEADER_BYTES = 64
LAYOUT_RN128 = 2  # PackHeader.layout of a GPU weight (the CPU layout K4N16 is 1)


# ------------------------------------------------------------------------------ fragment maps


def a_coord(lane: int, reg: int, byte: int) -> tuple[int, int]:
    g, t = lane >> 2, lane & 3
    return g + 8 * (reg & 1), 4 * t + byte + 16 * (reg >> 1)


def b_coord(lane: int, reg: int, byte: int) -> tuple[int, int]:
    """(k, n) of B's register `reg` (0 or 1), byte `byte`."""
    g, t = lane >> 2, lane & 3
    return 4 * t + byte + 16 * reg, g


def c_coord(lane: int, reg: int) -> tuple[int, int]:
    g, t = lane >> 2, lane & 3
    return g + 8 * (reg >> 1), 2 * t + (reg & 1)


def fragments_a(a: torch.Tensor) -> list[list[list[int]]]:
    """A [16, 32] int8 -> per lane, per register, 4 bytes (what mma expects in registers)."""
    return [[[int(a[a_coord(l, r, b)]) for b in range(4)] for r in range(4)] for l in range(32)]


def fragments_b(w: torch.Tensor) -> list[list[list[int]]]:
    """W [8, 32] int8 (n rows, k columns: B = W^T) -> per lane, per register, 4 bytes."""
    out = []
    for l in range(32):
        regs = []
        for r in range(2):
            regs.append([int(w[b_coord(l, r, b)[1], b_coord(l, r, b)[0]]) for b in range(4)])
        out.append(regs)
    return out


def mma_m16n8k32(fa, fb) -> torch.Tensor:
    """Emulates the instruction from register contents only: each lane's products are summed where
    the maps say they belong. Returns D [16, 8] int64 assembled through the C map."""
    a = torch.zeros(16, 32, dtype=torch.int64)
    b = torch.zeros(32, 8, dtype=torch.int64)
    seen_a, seen_b = set(), set()
    for l in range(32):
        for r in range(4):
            for y in range(4):
                rc = a_coord(l, r, y)
                assert rc not in seen_a, f"A element {rc} held twice"
                seen_a.add(rc)
                a[rc] = fa[l][r][y]
        for r in range(2):
            for y in range(4):
                kn = b_coord(l, r, y)
                assert kn not in seen_b, f"B element {kn} held twice"
                seen_b.add(kn)
                b[kn] = fb[l][r][y]
    assert len(seen_a) == 16 * 32 and len(seen_b) == 32 * 8
    d_full = a @ b
    d_regs = [[int(d_full[c_coord(l, r)]) for r in range(4)] for l in range(32)]
    d = torch.full((16, 8), -(2**62), dtype=torch.int64)
    for l in range(32):
        for r in range(4):
            d[c_coord(l, r)] = d_regs[l][r]
    return d


# ------------------------------------------------------------------- shared memory and ldmatrix


def swz(row: int, chunk: int) -> int:
    """Byte offset of 16-byte chunk `chunk` (0..3) of tile row `row` (rows of BK = 64 bytes)."""
    return row * BK + ((chunk ^ ((row >> 1) & 3)) << 4)


def store_tile(tile: torch.Tensor) -> bytearray:
    """A [rows, 64] int8 tile as the cp.async loop leaves it in shared memory (swizzled)."""
    rows = tile.shape[0]
    smem = bytearray(rows * BK)
    raw = tile.to(torch.int8).numpy().view("uint8")
    for r in range(rows):
        for c in range(4):
            off = swz(r, c)
            smem[off : off + 16] = bytes(raw[r, 16 * c : 16 * c + 16])
    return smem


def ldmatrix_x4(smem: bytearray, addr_of_lane) -> list[list[list[int]]]:
    """Emulates ldmatrix .x4 .b16: addr_of_lane(l) is the byte offset lane l passes (row l % 8 of
    matrix l // 8). Returns per lane, per register j, 4 signed bytes."""
    addrs = [addr_of_lane(l) for l in range(32)]
    out = []
    for l in range(32):
        regs = []
        for j in range(4):
            base = addrs[8 * j + (l >> 2)]
            regs.append([int.from_bytes(smem[base + 4 * (l & 3) + y : base + 4 * (l & 3) + y + 1], "little", signed=True)
                         for y in range(4)])  # fmt: skip
        out.append(regs)
    return out


def a_ldmatrix_addr(wm: int, i: int, ks: int):
    """The kernel's A address formula for warp row wm, m16 tile i, k32 step ks."""

    def addr(lane: int) -> int:
        j = lane >> 3
        row = wm * WM + i * 16 + (lane & 7) + (j & 1) * 8
        return swz(row, ks * 2 + (j >> 1))

    return addr


def b_ldmatrix_addr(wn: int, p: int, ks: int):
    """The kernel's B address formula for warp column wn, n16 pair p, k32 step ks."""

    def addr(lane: int) -> int:
        j = lane >> 3
        row = wn * WN + p * 16 + (lane & 7) + (j >> 1) * 8
        return swz(row, ks * 2 + (j & 1))

    return addr


def bank_groups_of_phase(addrs: list[int]) -> set[int]:
    """The 16-byte bank groups (of 8 per 128-byte line) that 8 row addresses of one ldmatrix phase hit."""
    return {(a // 16) % 8 for a in addrs}


# ------------------------------------------------------------------------- RN128 weight packing


def rn128_sizes(n: int, k: int) -> tuple[int, int]:
    return (n + TILE_N - 1) // TILE_N * TILE_N, (k + TILE_K - 1) // TILE_K * TILE_K


def pack_rn128(w: torch.Tensor) -> torch.Tensor:
    """int8 W [N, K] -> uint8 [64-byte header | np x kp rows], zero padded (on w's device)."""
    if w.dtype != torch.int8 or w.dim() != 2:
        raise ValueError(f"pack_rn128: w must be a 2-D int8 tensor, got {w.dtype} {tuple(w.shape)}")
    n, k = w.shape
    np_, kp = rn128_sizes(n, k)
    header = torch.zeros(16, dtype=torch.int32)
    header[0] = 0x57384946 - 2**32 if 0x57384946 >= 2**31 else 0x57384946  # "FI8W"
    header[1], header[2] = 1, LAYOUT_RN128
    meta = torch.tensor([n, k, np_, kp], dtype=torch.int64)
    head = torch.cat([header[:4].view(torch.uint8), meta.view(torch.uint8), torch.zeros(16, dtype=torch.uint8)])
    body = torch.zeros((np_, kp), dtype=torch.int8, device=w.device)
    body[:n, :k] = w
    return torch.cat([head.to(w.device), body.view(torch.uint8).flatten()])


def rn128_header(packed: torch.Tensor) -> tuple[int, int, int, int, int]:
    """(layout, n, k, np, kp) from a packed buffer's header (reads 64 bytes to the host)."""
    h = packed[:HEADER_BYTES].cpu()
    words = h[:16].view(torch.int32)
    n, k, np_, kp = (int(v) for v in h[16:48].view(torch.int64))
    return int(words[2]), n, k, np_, kp


def unpack_rn128(packed: torch.Tensor) -> torch.Tensor:
    layout, n, k, np_, kp = rn128_header(packed)
    if layout != LAYOUT_RN128 or packed.numel() != HEADER_BYTES + np_ * kp:
        raise ValueError("unpack_rn128: not a GPU (RN128) packed weight")
    return packed[HEADER_BYTES:].view(torch.int8).view(np_, kp)[:n, :k].clone()


# ------------------------------------------------------------------ 2:4 sparse weights (mma.sp)
#
# mma.sp::ordered_metadata.sync.aligned.m16n8k64.row.col.s32.s8.s8.s32 with sparsity selector 0.
# The sparse operand is A, so the kernel computes out^T = W x^T: the weight's rows are mma's M,
# the tokens its N. A row of A (64 logical K = 16 groups of 4) is stored as 32 kept values: values
# 2j and 2j + 1 are the two kept entries of group j, and a 4-bit code per group gives their
# positions (bits 1:0 the first, bits 3:2 the second; first < second, as ::ordered_metadata
# requires, so the invalid codes 0b0000/0b0101/0b1010/0b1111 never occur). A group with fewer than
# two nonzeros keeps zeros at the lowest free positions.
#   A (16 x 32 kept values): the dense m16n8k32 A map in kept-value columns (a_coord).
#   B (64 x 8, W[n, k] rows of x): 4 registers, register r byte b holds k = 4t + b + 16r, n = g.
#   E: one 32-bit word per lane. Lane (g, t) holds row g + 8 * (t & 1), logical columns
#      32 * (t >> 1) .. + 31: nibble j of the word is group j of those 32 columns.
# These are the maps TileLang's mma_sp code generator uses for int8 (its metadata load for 32-bit
# metadata and 8-bit A: row = lane // 4 + 8 * (lane % 2), column = (lane % 4) // 2), which its CUDA
# tests run; this repository has not yet executed them on a GPU (issue 13).
#
# The GPU layout ("SP24"): a 64-byte header, then the kept values [np][kp / 2] int8 (row-major),
# then the metadata in fragment order [np / 16][kp / 64][32] uint32: word w of (m16 tile T, k64
# step s) is what lane w passes to the mma for rows 16T..16T+15, columns 64s..64s+63. np = N rounded
# up to 128, kp = K rounded up to 128 (one pipeline stage); padded groups hold code 0b0100.
SP_BM, SP_BN, SP_BK = 128, 128, 128  # weight rows, tokens, logical K per stage
SP_WM, SP_WN = 64, 32  # warp tile (weight rows, tokens); warps 2 x 4
SP_TILE_N, SP_TILE_K = 128, 128
LAYOUT_SP24 = 3
SP24_PAD_CODE = 0b0100  # kept positions (0, 1), both values zero


def sp_b_coord(lane: int, reg: int, byte: int) -> tuple[int, int]:
    """(k, n) of the dense B operand of m16n8k64: register `reg` (0..3), byte `byte`."""
    g, t = lane >> 2, lane & 3
    return 4 * t + byte + 16 * reg, g


def sp_e_coord(lane: int) -> tuple[int, int]:
    """(row, 32-column quarter of the k64 step) whose 8 group codes lane `lane`'s metadata word holds."""
    g, t = lane >> 2, lane & 3
    return g + 8 * (t & 1), t >> 1


def sp_e_lane(row: int, quarter: int) -> int:
    """The inverse of sp_e_coord: which lane holds the codes of (row, quarter)."""
    return 4 * (row & 7) + (row >> 3) + 2 * quarter


def compress_24(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 W [N, K] with K % 4 == 0 and at most 2 nonzeros per group of 4 -> (kept values
    [N, K / 2] int8, codes [N, K / 4] uint8 in 0..15). Raises ValueError on a denser group."""
    n, k = w.shape
    if k % 4:
        raise ValueError(f"compress_24: K must be a multiple of 4, got {k}")
    groups = w.reshape(n, k // 4, 4)
    nz = groups != 0
    if (nz.sum(-1) > 2).any():
        raise ValueError("compress_24: a group of 4 inputs holds more than 2 nonzeros (not 2:4 sparse)")
    # positions kept: the nonzeros, then the lowest zero positions, two per group, ascending
    order = torch.argsort((~nz).to(torch.int8) * 8 + torch.arange(4, dtype=torch.int8), dim=-1, stable=True)
    keep = order[..., :2].sort(dim=-1).values
    vals = torch.gather(groups, -1, keep)
    codes = (keep[..., 0] | (keep[..., 1] << 2)).to(torch.uint8)
    return vals.reshape(n, k // 2).contiguous(), codes.contiguous()


def expand_24(vals: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The inverse of compress_24 (codes are decoded, not trusted: equal positions raise)."""
    n, groups = codes.shape
    i0, i1 = (codes & 3).long(), ((codes >> 2) & 3).long()
    if (i0 >= i1).any():
        raise ValueError("expand_24: a metadata code does not hold two ascending positions")
    out = torch.zeros(n, groups, 4, dtype=torch.int8)
    v = vals.reshape(n, groups, 2)
    out.scatter_(-1, torch.stack([i0, i1], -1), v)
    return out.reshape(n, groups * 4)


def sp24_sizes(n: int, k: int) -> tuple[int, int]:
    return (n + SP_TILE_N - 1) // SP_TILE_N * SP_TILE_N, (k + SP_TILE_K - 1) // SP_TILE_K * SP_TILE_K


def meta_fragment_order(codes: torch.Tensor) -> torch.Tensor:
    """codes [np, kp / 4] (np % 16 == 0, kp % 64 == 0) -> uint32 words [np / 16, kp / 64, 32] as
    int64 (word w of (tile, step) is lane w's metadata operand)."""
    np_, groups = codes.shape
    words = torch.zeros(np_ // 16, groups // 16, 32, dtype=torch.int64)
    c = codes.long().reshape(np_ // 16, 16, groups // 16, 2, 8)  # tile, row, step, quarter, group
    shifts = torch.arange(8, dtype=torch.int64) * 4
    per_rq = (c << shifts).sum(-1)  # [tile, row, step, quarter]
    for lane in range(32):
        row, quarter = sp_e_coord(lane)
        words[:, :, lane] = per_rq[:, row, :, quarter]
    return words


def pack_sp24(w: torch.Tensor) -> torch.Tensor:
    """int8 2:4-sparse W [N, K] -> uint8 [64-byte header | values np x kp/2 | metadata], on w's device."""
    if w.dtype != torch.int8 or w.dim() != 2:
        raise ValueError(f"pack_sp24: w must be a 2-D int8 tensor, got {w.dtype} {tuple(w.shape)}")
    n, k = w.shape
    np_, kp = sp24_sizes(n, k)
    full = torch.zeros((np_, kp), dtype=torch.int8)
    full[:n, :k] = w.cpu()
    vals, codes = compress_24(full)
    words = meta_fragment_order(codes)
    meta32 = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # the same 32 bits
    header = torch.zeros(16, dtype=torch.int32)
    header[0] = 0x57384946  # "FI8W"
    header[1], header[2] = 1, LAYOUT_SP24
    dims = torch.tensor([n, k, np_, kp], dtype=torch.int64)
    head = torch.cat([header[:4].view(torch.uint8), dims.view(torch.uint8), torch.zeros(16, dtype=torch.uint8)])
    body = torch.cat([head, vals.view(torch.uint8).flatten(), meta32.view(torch.uint8).flatten()])
    return body.to(w.device)


def sp24_nbytes(n: int, k: int) -> int:
    np_, kp = sp24_sizes(n, k)
    return HEADER_BYTES + np_ * kp // 2 + np_ * kp // 8  # 4 bits of metadata per 4 inputs


def sp24_parts(packed: torch.Tensor) -> tuple[int, int, int, int, torch.Tensor, torch.Tensor]:
    """(n, k, np, kp, values [np, kp/2] int8, metadata words [np/16, kp/64, 32] int64) of a packed
    buffer (copied to the host)."""
    h = packed[:HEADER_BYTES].cpu()
    layout = int(h[:16].view(torch.int32)[2])
    n, k, np_, kp = (int(v) for v in h[16:48].view(torch.int64))
    if layout != LAYOUT_SP24 or (np_, kp) != sp24_sizes(n, k) or packed.numel() != sp24_nbytes(n, k):
        raise ValueError("not a GPU 2:4 (SP24) packed weight")
    body = packed[HEADER_BYTES:].cpu()
    vals = body[: np_ * kp // 2].view(torch.int8).view(np_, kp // 2)
    meta = body[np_ * kp // 2 :].view(torch.int32).long() & 0xFFFFFFFF
    return n, k, np_, kp, vals, meta.view(np_ // 16, kp // 64, 32)


def codes_from_fragment_order(words: torch.Tensor) -> torch.Tensor:
    """The inverse of meta_fragment_order: [np / 16, kp / 64, 32] words -> codes [np, kp / 4]."""
    tiles, steps, _ = words.shape
    codes = torch.zeros(tiles, 16, steps, 2, 8, dtype=torch.int64)
    for lane in range(32):
        row, quarter = sp_e_coord(lane)
        for j in range(8):
            codes[:, row, :, quarter, j] = (words[:, :, lane] >> (4 * j)) & 0xF
    return codes.reshape(tiles * 16, steps * 16).to(torch.uint8)


def unpack_sp24(packed: torch.Tensor) -> torch.Tensor:
    n, k, _, _, vals, meta = sp24_parts(packed)
    return expand_24(vals, codes_from_fragment_order(meta))[:n, :k].clone()


def fragments_b64(x: torch.Tensor) -> list[list[list[int]]]:
    """x [8, 64] int8 (token rows, k columns: B = x^T) -> per lane, per register (4), 4 bytes."""
    return [[[int(x[sp_b_coord(l, r, y)[1], sp_b_coord(l, r, y)[0]]) for y in range(4)] for r in range(4)]
            for l in range(32)]  # fmt: skip


def mma_sp_m16n8k64(fa, fb, fe: list[int]) -> torch.Tensor:
    """Emulates mma.sp m16n8k64 (selector 0) from register contents: fa per lane 4 registers of
    4 kept values (the a_coord map over 16 x 32 kept values), fb per lane 4 registers of 4 bytes,
    fe per lane one 32-bit metadata word. Each kept value is placed at the logical column its code
    names; returns D [16, 8] int64 (through the C map)."""
    a = torch.zeros(16, 64, dtype=torch.int64)
    placed = torch.zeros(16, 64, dtype=torch.bool)
    for l in range(32):
        for r in range(4):
            for y in range(4):
                row, kept = a_coord(l, r, y)
                group = kept // 2  # 0..15 over the k64 step
                word = fe[sp_e_lane(row, group // 8)]
                code = (word >> (4 * (group % 8))) & 0xF
                i0, i1 = code & 3, (code >> 2) & 3
                assert i0 < i1, f"invalid metadata code {code:#06b} (row {row}, group {group})"
                col = 4 * group + (i0 if kept % 2 == 0 else i1)
                assert not placed[row, col], f"A element ({row}, {col}) placed twice"
                placed[row, col] = True
                a[row, col] = fa[l][r][y]
    b = torch.zeros(64, 8, dtype=torch.int64)
    seen = set()
    for l in range(32):
        for r in range(4):
            for y in range(4):
                kn = sp_b_coord(l, r, y)
                assert kn not in seen, f"B element {kn} held twice"
                seen.add(kn)
                b[kn] = fb[l][r][y]
    assert len(seen) == 64 * 8
    d_full = a @ b
    d = torch.full((16, 8), -(2**62), dtype=torch.int64)
    for l in range(32):
        for r in range(4):
            d[c_coord(l, r)] = d_full[c_coord(l, r)]
    return d


def sp_b_ldmatrix_addr(wn: int, jn: int):
    """The kernel's B address formula (one n8 token tile, all four 16-byte chunks of a k64 half)."""

    def addr(lane: int) -> int:
        return swz(wn * SP_WN + jn * 8 + (lane & 7), lane >> 3)

    return addr


def byte_perm(x: int, y: int, sel: int) -> int:
    """__byte_perm(x, y, s) (default mode): result byte i is byte (s >> 4i) & 7 of the 8 bytes y:x."""
    src = (x & 0xFFFFFFFF) | ((y & 0xFFFFFFFF) << 32)
    return sum(((src >> (8 * ((sel >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4))


def gemv_widen(kept_word: int, code: int, j: int) -> int:
    """gemv_sp24_kernel's widening of group j (0..7 of a lane's 32 columns): the group's 2 kept
    bytes, in the lane's kept word j >> 1, moved to positions i0 < i1 of a dense 4-byte word."""
    i0, i1, lo = code & 3, code >> 2, (2 * j) & 3
    sel = 0x4444 ^ ((4 ^ lo) << (4 * i0)) ^ ((4 ^ (lo + 1)) << (4 * i1))
    return byte_perm(kept_word, 0, sel)
