"""The CUDA kernels' layouts, checked on the host (no GPU): mma.m16n8k32 fragment maps, the kernel's
ldmatrix addressing through its swizzled shared memory, a whole CTA tile multiplied through those
maps, and the RN128 weight packing. See fastinfer/_cuda_layout.py."""

from __future__ import annotations

import pytest
import torch

from fastinfer import _cuda_layout as L


def _i8(*shape, seed):
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(seed))


def test_fragment_maps_are_bijections():
    a = {L.a_coord(l, r, b) for l in range(32) for r in range(4) for b in range(4)}
    b = {L.b_coord(l, r, y) for l in range(32) for r in range(2) for y in range(4)}
    c = {L.c_coord(l, r) for l in range(32) for r in range(4)}
    assert a == {(i, k) for i in range(16) for k in range(32)}
    assert b == {(k, n) for k in range(32) for n in range(8)}
    assert c == {(i, n) for i in range(16) for n in range(8)}


@pytest.mark.parametrize("seed", range(4))
def test_warp_mma_through_the_maps_equals_int64(seed):
    a, w = _i8(16, 32, seed=seed), _i8(8, 32, seed=100 + seed)
    if seed == 3:  # the extremes: every product 16384, the int16-pair-breaking case on the CPU
        a.fill_(-128)
        w.fill_(-128)
    d = L.mma_m16n8k32(L.fragments_a(a), L.fragments_b(w))
    assert torch.equal(d, a.long() @ w.long().T)


def test_swizzle_is_a_permutation_and_ldmatrix_phases_are_conflict_free():
    for r in range(L.BM):
        offs = sorted(L.swz(r, c) for c in range(4))
        assert offs == [r * L.BK + 16 * c for c in range(4)]
    for wm in range(2):
        for i in range(4):
            for ks in range(2):
                addr = L.a_ldmatrix_addr(wm, i, ks)
                for j in range(4):
                    assert len(L.bank_groups_of_phase([addr(8 * j + x) for x in range(8)])) == 8
    for wn in range(4):
        for p in range(2):
            for ks in range(2):
                addr = L.b_ldmatrix_addr(wn, p, ks)
                for j in range(4):
                    assert len(L.bank_groups_of_phase([addr(8 * j + x) for x in range(8)])) == 8


def test_kernel_ldmatrix_addressing_delivers_the_fragments_mma_expects():
    a_tile, b_tile = _i8(L.BM, L.BK, seed=1), _i8(L.BN, L.BK, seed=2)
    sa, sb = L.store_tile(a_tile), L.store_tile(b_tile)
    for wm in range(2):
        for i in range(4):
            for ks in range(2):
                got = L.ldmatrix_x4(sa, L.a_ldmatrix_addr(wm, i, ks))
                r0 = wm * L.WM + i * 16
                assert got == L.fragments_a(a_tile[r0 : r0 + 16, ks * 32 : ks * 32 + 32]), (wm, i, ks)
    for wn in range(4):
        for p in range(2):
            for ks in range(2):
                got = L.ldmatrix_x4(sb, L.b_ldmatrix_addr(wn, p, ks))
                for half in range(2):  # registers 0,1: n8 tile 2p; registers 2,3: n8 tile 2p + 1
                    n0 = wn * L.WN + p * 16 + 8 * half
                    want = L.fragments_b(b_tile[n0 : n0 + 8, ks * 32 : ks * 32 + 32])
                    assert [regs[2 * half : 2 * half + 2] for regs in got] == want, (wn, p, ks, half)


def test_cta_tile_multiplied_like_the_kernel_equals_int64():
    """One 128 x 128 x 64 CTA tile: every warp's ldmatrix loads, 16 mma per k32 step, and the C map
    of the epilogue, emulated; the assembled output equals the int64 matmul of the tile."""
    a_tile, b_tile = _i8(L.BM, L.BK, seed=3), _i8(L.BN, L.BK, seed=4)
    sa, sb = L.store_tile(a_tile), L.store_tile(b_tile)
    out = torch.zeros(L.BM, L.BN, dtype=torch.int64)
    written = torch.zeros(L.BM, L.BN, dtype=torch.int64)
    for warp in range(8):
        wm, wn = warp >> 2, warp & 3
        acc = {}
        for ks in range(L.BK // 32):
            af = [L.ldmatrix_x4(sa, L.a_ldmatrix_addr(wm, i, ks)) for i in range(L.WM // 16)]
            bf = [L.ldmatrix_x4(sb, L.b_ldmatrix_addr(wn, p, ks)) for p in range(L.WN // 16)]
            for i in range(L.WM // 16):
                for jn in range(L.WN // 8):
                    fb = [regs[(jn & 1) * 2 : (jn & 1) * 2 + 2] for regs in bf[jn >> 1]]
                    acc[i, jn] = acc.get((i, jn), 0) + L.mma_m16n8k32(af[i], fb)
        for (i, jn), d in acc.items():
            for lane in range(32):
                for r in range(4):
                    row, col = L.c_coord(lane, r)  # the epilogue's (g + 8 * (r >> 1), 2t + (r & 1))
                    mm, nn = wm * L.WM + i * 16 + row, wn * L.WN + jn * 8 + col
                    out[mm, nn] = d[row, col]
                    written[mm, nn] += 1
    assert (written == 1).all(), "every output element written exactly once"
    assert torch.equal(out, a_tile.long() @ b_tile.long().T)


@pytest.mark.parametrize("n,k", [(1, 1), (10, 70), (128, 64), (129, 65), (300, 4096)])
def test_rn128_pack_round_trip(n, k):
    w = _i8(n, k, seed=n + k)
    p = L.pack_rn128(w)
    layout, hn, hk, np_, kp = L.rn128_header(p)
    assert (layout, hn, hk) == (L.LAYOUT_RN128, n, k)
    assert np_ % L.TILE_N == 0 and kp % L.TILE_K == 0 and np_ >= n and kp >= k
    assert p.numel() == L.HEADER_BYTES + np_ * kp
    body = p[L.HEADER_BYTES :].view(torch.int8).view(np_, kp)
    assert not body[n:].any() and not body[:, k:].any(), "padding must be zero"
    assert torch.equal(L.unpack_rn128(p), w)
    with pytest.raises(ValueError, match="RN128"):
        L.unpack_rn128(p[:-1])
