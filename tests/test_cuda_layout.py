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


# ------------------------------------------------------------------------ 2:4 sparse (mma.sp)


def _sparse24(n, k, seed, density=0.5):
    """A random int8 [n, k] weight with at most 2 nonzeros per group of 4 (some groups 0 or 1)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    keep = torch.rand(n, k // 4, 4, generator=g).argsort(-1)[..., :2]
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, keep, True).reshape(n, k)
    drop = torch.rand(n, k, generator=g) > density * 2  # thin some kept slots out too
    return torch.where(mask & ~drop, w, torch.zeros_like(w))


def test_sparse_fragment_maps_are_bijections():
    b = {L.sp_b_coord(l, r, y) for l in range(32) for r in range(4) for y in range(4)}
    assert b == {(k, n) for k in range(64) for n in range(8)}
    e = {L.sp_e_coord(l) for l in range(32)}
    assert e == {(row, q) for row in range(16) for q in range(2)}
    assert all(L.sp_e_lane(*L.sp_e_coord(l)) == l for l in range(32))


def test_compress_24_codes_and_round_trip():
    w = _sparse24(40, 256, seed=1)
    w[0, :4] = torch.tensor([0, 0, 0, 0], dtype=torch.int8)  # empty group: positions (0, 1)
    w[0, 4:8] = torch.tensor([0, 0, 0, 9], dtype=torch.int8)  # one nonzero at 3: (0, 3)
    w[0, 8:12] = torch.tensor([5, 0, 0, 0], dtype=torch.int8)  # one nonzero at 0: (0, 1)
    w[0, 12:16] = torch.tensor([0, 0, -1, 7], dtype=torch.int8)  # (2, 3)
    vals, codes = L.compress_24(w)
    assert codes[0, :4].tolist() == [L.SP24_PAD_CODE, 0 | 3 << 2, 0 | 1 << 2, 2 | 3 << 2]
    assert vals[0, :8].tolist() == [0, 0, 0, 9, 5, 0, -1, 7]
    i0, i1 = codes & 3, codes >> 2
    assert (i0 < i1).all(), "ordered metadata: the first position below the second, never equal"
    assert torch.equal(L.expand_24(vals, codes), w)
    with pytest.raises(ValueError, match="more than 2 nonzeros"):
        L.compress_24(torch.ones(2, 8, dtype=torch.int8))
    with pytest.raises(ValueError, match="ascending"):
        L.expand_24(vals, torch.full_like(codes, 0b0101))


@pytest.mark.parametrize("seed", range(4))
def test_warp_mma_sp_through_the_maps_equals_int64(seed):
    """One mma.sp m16n8k64 from registers alone: kept values by the A map, metadata words by the E
    map (each value placed where its code says), B by the k64 map; equals the dense int64 product."""
    w, x = _sparse24(16, 64, seed=seed), _i8(8, 64, seed=50 + seed)
    if seed == 3:  # the extremes on every kept slot
        w = torch.where(w != 0, torch.full_like(w, -128), w)
        x.fill_(-128)
    vals, codes = L.compress_24(w)
    words = L.meta_fragment_order(codes)[0, 0].tolist()
    d = L.mma_sp_m16n8k64(L.fragments_a(vals), L.fragments_b64(x), words)
    assert torch.equal(d, w.long() @ x.long().T)


def test_metadata_placement_is_not_symmetric():
    """A wrong E map must fail the emulation: the same words handed to the wrong lanes give another
    product (or an invalid code), so the emulation above does check the map."""
    w, x = _sparse24(16, 64, seed=7), _i8(8, 64, seed=8)
    vals, codes = L.compress_24(w)
    words = L.meta_fragment_order(codes)[0, 0].tolist()
    swapped = [words[l ^ 1] for l in range(32)]  # rows g and g + 8 exchanged
    d = L.mma_sp_m16n8k64(L.fragments_a(vals), L.fragments_b64(x), swapped)
    assert not torch.equal(d, w.long() @ x.long().T)


@pytest.mark.parametrize("n,k", [(1, 4), (10, 70), (128, 128), (129, 200), (300, 1024)])
def test_sp24_pack_round_trip(n, k):
    kk = (k + 3) // 4 * 4
    w = _sparse24(n, kk, seed=n + k)[:, :k].contiguous()
    p = L.pack_sp24(w)
    np_, kp = L.sp24_sizes(n, k)
    assert p.numel() == L.sp24_nbytes(n, k) == L.HEADER_BYTES + np_ * kp // 2 + np_ * kp // 8
    hn, hk, hnp, hkp, vals, meta = L.sp24_parts(p)
    assert (hn, hk, hnp, hkp) == (n, k, np_, kp)
    assert not vals[n:].any(), "padded rows keep zeros"
    codes = L.codes_from_fragment_order(meta)
    assert codes.shape == (np_, kp // 4) and (codes[n:] == L.SP24_PAD_CODE).all()
    assert torch.equal(L.unpack_sp24(p), w)
    with pytest.raises(ValueError, match="SP24"):
        L.sp24_parts(p[:-1])


def test_sp24_cta_tile_multiplied_like_the_kernel_equals_int64():
    """One 128 (weight rows) x 128 (tokens) x 128 (logical K) CTA stage, as the sparse kernel runs
    it: kept values through the swizzled shared tile and the dense kernel's A ldmatrix addressing,
    x through two swizzled 64-column halves and one ldmatrix.x4 per n8 token tile, metadata words
    read in fragment order; the assembled out^T equals the int64 product."""
    w, x = _sparse24(L.SP_BM, L.SP_BK, seed=11), _i8(L.SP_BN, L.SP_BK, seed=12)
    p = L.pack_sp24(w)
    _, _, _, kp, vals, meta = L.sp24_parts(p)
    s_a = L.store_tile(vals)  # [128, 64] kept values: rows of 64 bytes, swizzled
    s_b = [L.store_tile(x[:, 64 * h : 64 * h + 64]) for h in range(2)]
    out = torch.zeros(L.SP_BN, L.SP_BM, dtype=torch.int64)  # [token, weight row]
    written = torch.zeros_like(out)
    for warp in range(8):
        wm, wn = warp >> 2, warp & 3
        acc = {}
        for s in range(L.SP_BK // 64):
            af = [L.ldmatrix_x4(s_a, L.a_ldmatrix_addr(wm, i, s)) for i in range(L.SP_WM // 16)]
            bf = [L.ldmatrix_x4(s_b[s], L.sp_b_ldmatrix_addr(wn, jn)) for jn in range(L.SP_WN // 8)]
            for i in range(L.SP_WM // 16):
                e = meta[wm * 4 + i, s].tolist()
                for jn in range(L.SP_WN // 8):
                    acc[i, jn] = acc.get((i, jn), 0) + L.mma_sp_m16n8k64(af[i], bf[jn], e)
        for (i, jn), d in acc.items():
            for lane in range(32):
                for r in range(4):
                    row, col = L.c_coord(lane, r)  # row: weight row, col: token
                    nn, mm = wm * L.SP_WM + i * 16 + row, wn * L.SP_WN + jn * 8 + col
                    out[mm, nn] = d[row, col]
                    written[mm, nn] += 1
    assert (written == 1).all(), "every output element written exactly once"
    assert torch.equal(out, x.long() @ w.long().T)
    for wn in range(4):  # the B loads are bank-conflict free too
        for jn in range(4):
            addr = L.sp_b_ldmatrix_addr(wn, jn)
            for j in range(4):
                assert len(L.bank_groups_of_phase([addr(8 * j + r) for r in range(8)])) == 8


def test_gemv_widening_equals_the_dense_group():
    """The small-M kernel's byte_perm selector, for every valid code and both halves of a kept word:
    the dense 4-byte group it builds equals expand_24 of the same values."""
    vals = torch.tensor([[-7, 19, 127, -128]], dtype=torch.int8)
    word = int(vals.view(torch.int32)[0, 0]) & 0xFFFFFFFF
    for code in (c for c in range(16) if (c & 3) < (c >> 2)):
        for j in (0, 1):  # kept bytes 0, 1 and 2, 3 of the word
            dense = L.expand_24(vals[:, 2 * j : 2 * j + 2], torch.tensor([[code]], dtype=torch.uint8))
            got = L.gemv_widen(word, code, j)
            assert got.to_bytes(4, "little") == dense.numpy().tobytes(), (code, j)


def test_sp24_buffer_checks_run_without_a_gpu():
    """The GPU 2:4 buffer checks (fastinfer.ops.cuda.sp24_check / sp24_validate) are torch code that
    runs wherever the buffer is: here on a CPU copy of one. A bad metadata code, header, size or
    shape is an error before any kernel could see it."""
    from fastinfer.ops import cuda as C

    w = _sparse24(64, 256, seed=21)
    p = L.pack_sp24(w)
    assert C.sp24_check("t", p, 64, 256) == L.sp24_sizes(64, 256)
    assert C.sp24_validate("t", p) == (64, 256)
    bad = p.clone()
    bad[-4:] = 0  # codes 0b0000 (equal positions): undefined for mma.sp
    with pytest.raises(ValueError, match="metadata code"):
        C.sp24_check("t", bad, 64, 256)
    bad = p.clone()
    bad[8] = 2  # layout RN128
    with pytest.raises(ValueError, match="header or size"):
        C.sp24_validate("t", bad)
    with pytest.raises(ValueError, match="bytes"):
        C.sp24_check("t", p, 64, 128)
    same_size = L.pack_sp24(_sparse24(256, 128, seed=22))  # [256, 128] and [64, 256]: equal bytes
    assert same_size.numel() == p.numel()
    with pytest.raises(ValueError, match=r"the weight is \[256, 128\], expected \[64, 256\]"):
        C.sp24_check("t", same_size, 64, 256)
    with pytest.raises(TypeError, match="1-D uint8"):
        C.sp24_check("t", p.view(torch.int8), 64, 256)
    p[100] = 1  # an in-place write: the next call checks again (and the values may be anything)
    assert C.sp24_check("t", p, 64, 256) == L.sp24_sizes(64, 256)
