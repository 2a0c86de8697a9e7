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
