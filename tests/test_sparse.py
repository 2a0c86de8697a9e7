"""Sparse formats, kernels, layers and sparsify(): round trips, exactness on every ISA, fp32
tolerance, the dense-equivalence of SparseInt8Linear, compile/opcheck, and bad inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.library import opcheck

import fastinfer
from conftest import ISAS, int64_ref, run_python
from fastinfer import _C, ops
from fastinfer import SparseRule, sparsify
from fastinfer.nn import Int8Linear, SparseInt8Linear, SparseLinear
from fastinfer.plan.rules import choose_format


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _i8(*shape, seed=0, low=-128, high=128):
    return torch.randint(low, high, shape, dtype=torch.int8, generator=_gen(seed))


def _mask_unstructured(n, k, density, seed):
    return torch.rand(n, k, generator=_gen(seed)) < density


def _mask_nm(n, k, keep, seed):
    """<= keep nonzeros in every group of 4 (K padded), keep in 0..2."""
    kk = (k + 3) // 4 * 4
    r = torch.rand(n, kk // 4, 4, generator=_gen(seed)).argsort(-1) < keep
    return r.reshape(n, kk)[:, :k]


def _mask_block(n, k, tile_density, seed):
    tn, tk = (n + 15) // 16, (k + 63) // 64
    t = torch.rand(tn, tk, generator=_gen(seed)) < tile_density
    return t.repeat_interleave(16, 0)[:n].repeat_interleave(64, 1)[:, :k]


def _masked(fmt, n, k, seed, density=0.3):
    w = _i8(n, k, seed=seed, low=-127)
    if fmt in ("csr", "ell"):
        return w * _mask_unstructured(n, k, density, seed + 1)
    if fmt == "2:4":
        return w * _mask_nm(n, k, 2, seed + 1)
    return w * _mask_block(n, k, 0.5, seed + 1)


FORMATS_I8 = ("csr", "2:4", "block", "ell")
SHAPES = [(1, 1, 1), (1, 64, 16), (3, 130, 37), (17, 200, 50), (5, 64, 17), (70, 128, 33), (1, 257, 100), (9, 4, 3)]


# ----------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt", FORMATS_I8)
@pytest.mark.parametrize("n,k", [(1, 1), (16, 64), (37, 130), (17, 65), (3, 4)])
def test_int8_round_trip(fmt, n, k):
    w = _masked(fmt, n, k, seed=n * 1000 + k)
    p = ops.pack_sparse(w, fmt)
    assert p.dtype == torch.uint8 and p.dim() == 1 and p.data_ptr() % 64 == 0
    info = ops.sparse_info(p)
    assert (info["format"], info["n"], info["k"]) == (fmt, n, k)
    assert torch.equal(ops.unpack_sparse(p), w)


@pytest.mark.parametrize("fmt", ["csr", "ell"])
def test_fp32_round_trip_keeps_values_and_drops_negative_zero(fmt):
    w = torch.randn(13, 70, generator=_gen(1)) * _mask_unstructured(13, 70, 0.3, 2)
    w[0, :5] = -0.0
    p = ops.pack_sparse(w, fmt)
    info = ops.sparse_info(p)
    assert (info["format"], info["dtype"]) == (fmt, torch.float32)
    if fmt == "csr":
        assert info["nnz"] == int((w != 0).sum())
    back = ops.unpack_sparse(p)
    assert torch.equal(back, w)
    assert not torch.signbit(back[0, :5]).any()  # -0.0 is not stored: it comes back as +0.0


def test_nm24_groups_with_0_to_2_nonzeros_and_refusal_of_3():
    w = torch.zeros(2, 16, dtype=torch.int8)
    w[0, 0:4] = torch.tensor([0, 0, 0, 0])
    w[0, 4:8] = torch.tensor([5, 0, 0, 0])
    w[0, 8:12] = torch.tensor([0, -3, 0, 7])
    w[0, 12:16] = torch.tensor([0, 0, 127, -127])
    w[1] = torch.tensor([1, 1, 0, 0] * 4, dtype=torch.int8)
    assert torch.equal(ops.unpack_sparse(ops.pack_sparse(w, "2:4")), w)
    w[1, 2] = 9
    with pytest.raises(ValueError, match="not 2:4 sparse.*row 1, inputs 0..3 hold 3"):
        ops.pack_sparse(w, "2:4")


@pytest.mark.parametrize("fmt", FORMATS_I8)
def test_all_zero_and_dense_weights(fmt):
    zero = torch.zeros(20, 70, dtype=torch.int8)
    assert torch.equal(ops.unpack_sparse(ops.pack_sparse(zero, fmt)), zero)
    if fmt != "2:4":
        full = _i8(20, 70, seed=3, low=1, high=127)  # no zeros at all: 0% sparsity
        assert torch.equal(ops.unpack_sparse(ops.pack_sparse(full, fmt)), full)
    if fmt == "block":
        assert ops.sparse_info(ops.pack_sparse(zero, fmt))["nnz"] == 0
        w = torch.zeros(32, 128, dtype=torch.int8)
        w[17, 70] = 1  # one nonzero: one tile
        assert ops.sparse_info(ops.pack_sparse(w, fmt))["nnz"] == 1


@pytest.mark.parametrize("fmt", ["csr", "ell"])
def test_fp32_all_zero_and_dense_weights(isa, fmt):
    """0% and 100% sparsity: no steps at all, and every input of every channel stored."""
    x = torch.randn(3, 70, generator=_gen(4))
    for w in (torch.zeros(20, 70), torch.randn(20, 70, generator=_gen(5)).abs() + 0.5):
        p = ops.pack_sparse(w, fmt)
        assert torch.equal(ops.unpack_sparse(p), w)
        torch.testing.assert_close(ops.sparse_linear(x, p, None, 20), x @ w.T, rtol=1e-5, atol=1e-5)


def test_csr_wide_k_uses_32_bit_indices(isa):
    k = 65537 + 100
    w = torch.zeros(3, k, dtype=torch.int8)
    w[0, 65536], w[1, k - 1], w[2, 3] = 7, -5, 1
    a = _i8(2, k, seed=4)
    p = ops.pack_sparse(w, "csr")
    assert torch.equal(ops.unpack_sparse(p), w)
    assert torch.equal(ops.sparse_int8_matmul(a, p, 3), int64_ref(a, w))


# ------------------------------------------------------------------------------ exactness per ISA


@pytest.mark.parametrize("fmt", FORMATS_I8)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_sparse_int8_matmul_exact(isa, fmt, m, k, n):
    w = _masked(fmt, n, k, seed=m + 7 * k + 13 * n)
    a = _i8(m, k, seed=m * k)
    p = ops.pack_sparse(w, fmt)
    assert torch.equal(ops.sparse_int8_matmul(a, p, n), int64_ref(a, w)), (isa, fmt, m, k, n)


@pytest.mark.parametrize("fmt", FORMATS_I8)
def test_sparse_int8_matmul_adversarial_values(isa, fmt):
    n, k = 32, 1024
    mask = _masked(fmt, n, k, seed=5) != 0
    for av, wv in ((-128, -127), (-128, 127), (127, 127)):
        a = torch.full((6, k), av, dtype=torch.int8)
        w = torch.full((n, k), wv, dtype=torch.int8) * mask
        assert torch.equal(ops.sparse_int8_matmul(a, ops.pack_sparse(w, fmt), n), int64_ref(a, w)), (av, wv)


@pytest.mark.parametrize("m", [1, 5, 6, 7, 13, 100])
@pytest.mark.parametrize("n", [64, 128, 80, 200])
def test_block_tiles_shared_by_four_channel_blocks(isa, m, n):
    """64-row blocks give 4 consecutive 16-channel blocks the same tile list: the VNNI kernel then
    runs them as one 4-block register tile (a tail group with fewer blocks runs one by one)."""
    k = 320
    t = torch.rand((n + 63) // 64, k // 64, generator=_gen(n)) < 0.5
    mask = t.repeat_interleave(64, 0)[:n].repeat_interleave(64, 1)
    w = _i8(n, k, seed=m + n, low=-127) * mask
    w[:, 0] = 0  # keep a tile whose first column is zero but which is still nonzero
    a = _i8(m, k, seed=m * 3)
    p = ops.pack_sparse(w, "block")
    assert torch.equal(ops.sparse_int8_matmul(a, p, n), int64_ref(a, w))


def test_ell_rows_with_many_nonzeros_per_segment(isa):
    """A row with all 64 inputs of a segment nonzero (16 steps) beside empty rows, every M chunking."""
    w = torch.zeros(40, 200, dtype=torch.int8)
    w[3, 64:128] = _i8(64, seed=1, low=1)
    w[17, ::3] = -7
    w[39, 199] = 127
    for m in (1, 4, 6, 7, 13):
        a = _i8(m, 200, seed=m)
        assert torch.equal(ops.sparse_int8_matmul(a, ops.pack_sparse(w, "ell"), 40), int64_ref(a, w)), m


@pytest.mark.parametrize("k", [1, 64, 65, 128, 129, 300, 1000])
def test_ell_windows_jump_and_narrow(isa, k):
    """Windows slide with the least advanced channel and jump over empty stretches; kp = 64 has a
    64-input window, kp = 128 a single window; the last window is capped at kp - 128."""
    w = torch.zeros(37, k, dtype=torch.int8)
    w[0, 0] = 5
    w[0, k - 1] = -9
    w[1, :] = _i8(k, seed=2, low=1)  # every input: many steps
    w[2, k // 2 :: 7] = 3
    w[20, ::max(1, k // 5)] = -128
    w[36, k - 1] = 127
    p = ops.pack_sparse(w, "ell")
    assert torch.equal(ops.unpack_sparse(p), w)
    for m in (1, 2, 6, 7, 13):
        a = _i8(m, k, seed=m + k)
        assert torch.equal(ops.sparse_int8_matmul(a, p, 37), int64_ref(a, w)), m


def test_ell_padding_stays_small():
    """The sliding-window plan: at 10% density a 16-channel block stores ~1.24 slots (2 bytes each)
    per nonzero; fixed 64-input segments stored 1.9."""
    w = _i8(256, 4096, seed=3, low=1) * _mask_unstructured(256, 4096, 0.1, 4)
    nnz = int(torch.count_nonzero(w))
    info = ops.sparse_info(ops.pack_sparse(w, "ell"))
    slots = info["nnz"] * 64  # nnz reports steps for ell
    assert nnz <= slots <= 1.3 * nnz, slots / nnz
    assert info["nbytes"] < 2 * 1.3 * nnz + 4 * 256 + 8 * 17 + 256


def _ell_paired(p):
    return int(p[56:64].view(torch.int64)[0]) == 1  # header flags: steps in pairs sharing a window


def test_ell_pairs_steps_where_it_costs_little(isa):
    """Denser layers store steps in pairs with one window (kernels with several rows load each
    window once per pair); sparse ones do not (pairs would pad more). Both are exact at every M."""
    for density, paired in ((0.4, True), (0.05, False)):
        w = _i8(48, 700, seed=9, low=1) * _mask_unstructured(48, 700, density, 10)
        p = ops.pack_sparse(w, "ell")
        assert _ell_paired(p) == paired, density
        assert ops.sparse_info(p)["nnz"] % 2 == 0 or not paired
        assert torch.equal(ops.unpack_sparse(p), w)
        for m in (1, 2, 6, 7, 19):
            a = _i8(m, 700, seed=m)
            assert torch.equal(ops.sparse_int8_matmul(a, p, 48), int64_ref(a, w)), (density, m)


@pytest.mark.parametrize("m", [1, 2, 5, 8])
def test_fp32_ell_pairs(isa, m):
    """fp32 ell pairs its steps too (here at 25% density, not at 5%); both layouts give the dense
    result to fp32 rounding, and a paired block with an odd step count is refused."""
    for density, paired in ((0.25, True), (0.05, False)):
        w = torch.randn(40, 1000, generator=_gen(13)) * _mask_unstructured(40, 1000, density, 14)
        p = ops.pack_sparse(w, "ell")
        assert _ell_paired(p) == paired, density
        assert torch.equal(ops.unpack_sparse(p), w)
        x = torch.randn(m, 1000, generator=_gen(m))
        ref = (x.double() @ w.double().T).float()
        bound = 1e-5 * (x.abs().double() @ w.abs().double().T).float() + 1e-6
        assert ((ops.sparse_linear(x, p, None, 40) - ref).abs() <= bound).all(), (density, m)
    p = ops.pack_sparse(torch.randn(32, 1000, generator=_gen(15)) * _mask_unstructured(32, 1000, 0.25, 16), "ell")
    assert _ell_paired(p)
    p[64:88].view(torch.int64)[1] -= 1  # the boundary between the two blocks: both get odd counts
    with pytest.raises(ValueError, match="odd step count"):
        ops.sparse_validate(p)


def test_ell_corrupt_pairs_are_rejected():
    w = _i8(16, 1024, seed=11, low=1) * _mask_unstructured(16, 1024, 0.4, 12)
    good = ops.pack_sparse(w, "ell")
    assert _ell_paired(good)
    steps = 64 + 64 + 64  # header, colsum, stepptr
    bad = good.clone()
    bad[steps + 128 : steps + 192] ^= 0x80  # step 1: another window than its pair's step 0
    with pytest.raises(ValueError, match="different windows|window out of range"):
        ops.sparse_validate(bad)
    bad = good.clone()
    bad[56] = 0  # flags: unpaired, which the layout also satisfies
    ops.sparse_validate(bad)
    bad[56] = 3  # an unknown flag
    with pytest.raises(ValueError, match="inconsistent header"):
        ops.sparse_validate(bad)


def test_ell_corrupt_window_or_index_is_rejected():
    w = torch.zeros(16, 64, dtype=torch.int8)
    w[::2, ::3] = 7
    good = ops.pack_sparse(w, "ell")
    steps = 64 + 64 + 64  # header, colsum int32 [16], stepptr int64 [2] (each 64-byte aligned)
    bad = good.clone()
    bad[steps : steps + 64] |= 0x80  # window start 2^64 - 1 blocks of 64
    with pytest.raises(ValueError, match="window out of range"):
        ops.sparse_int8_matmul(torch.ones(1, 64, dtype=torch.int8), bad, 16)
    bad = good.clone()
    bad[steps] = 64  # kp = 64: the window is 64 inputs
    with pytest.raises(ValueError, match="index out of range"):
        ops.sparse_validate(bad)


def test_nm24_corrupt_positions_are_rejected():
    """The two positions of a group must differ (the kernel would count one input twice)."""
    w = _i8(16, 64, seed=8) * _mask_nm(16, 64, 2, 9)
    good = ops.pack_sparse(w, "2:4")
    steps = 64 + 64  # header, colsum int32 [16]
    assert torch.equal(ops.unpack_sparse(good), w)
    for byte, val in ((0, 0b11100000), (5, 0b01010100), (7 * 80 + 3, 0xFF)):
        bad = good.clone()
        bad[steps + byte] = val
        with pytest.raises(ValueError, match="corrupt 2:4 positions"):
            ops.sparse_validate(bad)


@pytest.mark.parametrize("k", [1, 63, 64, 65, 130, 1000])
def test_fp32_ell_windows_and_shapes(isa, k):
    """Windows of 64 inputs starting at multiples of 16, the last one capped at kp - 64; a channel
    with every input nonzero beside empty ones; N not a multiple of 16; strided rows."""
    n = 37
    w = torch.zeros(n, k)
    w[0, 0], w[0, k - 1] = 1.5, -2.0
    w[1] = torch.randn(k, generator=_gen(k))
    w[2, k // 2 :: 5] = 0.25
    w[36, k - 1] = 3.0
    p = ops.pack_sparse(w, "ell")
    assert torch.equal(ops.unpack_sparse(p), w)
    b = torch.randn(n, generator=_gen(k + 1))
    for m in (1, 2, 5, 7, 25):
        big = torch.randn(m, k + 3, generator=_gen(m))
        x = big[:, 2 : k + 2]  # row stride k + 3
        out = ops.sparse_linear(x, p, b, n)
        ref = (x.double() @ w.double().T + b.double()).float()
        bound = 1e-5 * (x.abs().double() @ w.abs().double().T).float() + 1e-6
        assert ((out - ref).abs() <= bound).all(), (m, (out - ref).abs().max())


def test_fp32_ell_padding_never_meets_inf():
    """A padding lane is skipped, not multiplied by 0: an Inf input reaches only the channels that
    really use it (as with csr), whatever the window."""
    w = torch.zeros(16, 128)
    w[0, 3] = 1.0
    w[1, 100] = 2.0  # channel 1's window covers input 70 but it has no weight there
    x = torch.ones(1, 128)
    x[0, 70] = float("inf")
    for fmt in ("csr", "ell"):
        y = ops.sparse_linear(x, ops.pack_sparse(w, fmt), None, 16)
        assert y[0, 0] == 1.0 and y[0, 1] == 2.0 and torch.isfinite(y).all(), fmt
    x[0, 3] = float("inf")
    y = ops.sparse_linear(x, ops.pack_sparse(w, "ell"), None, 16)
    assert y[0, 0] == float("inf") and y[0, 1] == 2.0


def test_fp32_ell_corrupt_buffers_are_rejected():
    w = torch.zeros(16, 64)
    w[::3, ::7] = 0.5
    good = ops.pack_sparse(w, "ell")
    steps = 64 + 64  # header, stepptr int64 [2]
    bad = good.clone()
    bad[steps + 64 : steps + 80] |= 0x80  # window start 65535 * 16
    with pytest.raises(ValueError, match="window out of range"):
        ops.sparse_validate(bad)
    bad = good.clone()
    bad[steps + 64 + 15] = 0x40 | 63  # channel 15's first value moved to input 63, before its input 7
    with pytest.raises(ValueError, match="repeat or are out of order"):
        ops.sparse_validate(bad)
    w65 = torch.zeros(3, 65)
    w65[0, 0] = 1.0
    good = ops.pack_sparse(w65, "ell")  # kp = 128: windows start at 0 or 64
    bad = good.clone()
    bad[steps + 64 + 5] = 0x40  # channel 5 >= N = 3 holds a value
    with pytest.raises(ValueError, match="index out of range"):
        ops.sparse_validate(bad)
    bad = good.clone()
    bad[steps + 64 + 2] |= 0x80  # window start 4 * 16 = 64 ...
    bad[steps + 64 + 0] = 0x40 | 63 | (int(bad[steps + 64]) & 0x80)  # ... channel 0 at input 127 >= K
    with pytest.raises(ValueError, match="index out of range"):
        ops.sparse_validate(bad)
    with pytest.raises(ValueError, match="K up to 1048576"):
        ops.pack_sparse(torch.zeros(1, (1 << 20) + 1), "ell")


def test_each_weight_stored_once_and_colsum_consistent():
    """Buffers that pass validation give the same answer on every path and from unpack: a weight
    stored twice (the kernels would add both, unpack keeps one) and a column sum that disagrees with
    the stored values (the u8-shifted VNNI kernels subtract 128 * colsum) are refused."""
    w = torch.zeros(16, 64, dtype=torch.int8)
    w[0, 5] = 3
    p = ops.pack_sparse(w, "ell")
    st = 64 + 64 + 64  # header, colsum, stepptr
    bad = p.clone()
    bad[st + 1] = (int(bad[st + 1]) & 128) | 5  # channel 0, slot 1: input 5 again ...
    bad[st + 64 + 1] = 3
    bad[64:128].view(torch.int32)[0] = 6  # ... with a column sum that counts it
    with pytest.raises(ValueError, match="repeat or are out of order"):
        ops.sparse_validate(bad)
    for fmt in ("ell", "2:4", "block"):
        good = ops.pack_sparse(w, fmt)
        bad = good.clone()
        bad[64:128].view(torch.int32)[0] = 0
        with pytest.raises(ValueError, match="column sums do not match"):
            ops.sparse_validate(bad)
    wf = torch.zeros(16, 128)
    wf[0, 5], wf[1, 0], wf[1, 1] = 2.0, 1.0, 1.0
    pf = ops.pack_sparse(wf, "ell")
    s1 = 128 + 80  # fp32 ell: header, stepptr; step 1 (channel 0 has no second value there)
    pf[s1 + 64] = (int(pf[s1 + 64]) & 128) | 0x40 | 5
    pf[s1 : s1 + 4].view(torch.float32)[0] = 2.0
    with pytest.raises(ValueError, match="repeat or are out of order"):
        ops.sparse_validate(pf)
    wc = torch.zeros(4, 64, dtype=torch.int8)
    wc[1, 3], wc[1, 9] = 1, 2
    pc = ops.pack_sparse(wc, "csr")
    idx = 64 + (8 * 5 + 63) // 64 * 64  # csr: header, rowptr int64 [n + 1], then uint16 indices
    pc[idx + 2 : idx + 4] = pc[idx : idx + 2]  # row 1: columns 3, 3
    with pytest.raises(ValueError, match="repeat or are out of order"):
        ops.sparse_validate(pc)


def test_corrupt_step_pointers_are_caught_before_any_walk():
    """A block's end pointer far past the buffer, followed by a smaller one: every pointer is checked
    before the steps are read (the validation itself must not run off the buffer)."""
    code = """
        import ctypes, mmap, torch
        from fastinfer import ops
        torch.manual_seed(0)
        for fmt, dtype in (("ell", torch.float32), ("ell", torch.int8)):
            w = torch.randn(64, 256) * (torch.rand(64, 256) < 0.1)
            p = ops.pack_sparse(w if dtype == torch.float32 else (w * 50).to(torch.int8), fmt)
            nb, pg = p.numel(), mmap.PAGESIZE
            size = (nb + pg - 1) // pg * pg
            m = mmap.mmap(-1, size + pg)
            buf = (ctypes.c_char * (size + pg)).from_buffer(m)
            off = (size - nb) // 64 * 64  # the buffer ends < 64 bytes before a guard page
            t = torch.frombuffer(m, dtype=torch.uint8, count=size)[off : off + nb]
            assert t.data_ptr() % 64 == 0
            t.copy_(p)
            ctypes.CDLL(None).mprotect(ctypes.c_void_p(ctypes.addressof(buf) + size), pg, 0)
            ptr_off = 64 if dtype == torch.float32 else 64 + 4 * 64  # int8: colsum int32 [64] first
            t[ptr_off : ptr_off + 8 * 5].view(torch.int64)[1] = 1 << 40
            try:
                ops.sparse_validate(t)
            except ValueError as e:
                assert "step pointers" in str(e), e
            else:
                raise AssertionError("accepted")
        print("ok")
    """
    res = run_python(code)
    assert res.returncode == 0 and "ok" in res.stdout, (res.returncode, res.stderr[-2000:])


def test_version_1_buffers():
    """Version 2 changed the ell and 2:4 layouts: csr and block buffers written by version 1 still
    load, version 1 ell and 2:4 buffers are refused (their layout would be misread)."""
    w = _i8(16, 100, seed=5) * _mask_nm(16, 100, 2, 6)
    a = _i8(3, 100, seed=7)
    for fmt in ("csr", "block", "ell", "2:4"):
        p = ops.pack_sparse(w, fmt)
        p[4:8] = torch.tensor([1, 0, 0, 0], dtype=torch.uint8)
        if fmt in ("ell", "2:4"):
            with pytest.raises(ValueError, match="version 1"):
                ops.sparse_int8_matmul(a, p, 16)
        else:
            assert torch.equal(ops.sparse_int8_matmul(a, p, 16), int64_ref(a, w))


def test_nm24_and_ell_panel_path_without_vbmi():
    """CPUs with VNNI but no VBMI (Cascade Lake) run 2:4 and ell on decompressed panels: force that."""
    if "avx512_vnni" not in ISAS:
        pytest.skip("needs avx512_vnni")
    fastinfer.set_isa("avx512_vnni")
    before = _C.set_sparse_vbmi(False)
    try:
        assert not _C.sparse_vbmi_active()
        for m, k, n in SHAPES:
            for fmt in ("2:4", "ell"):
                w = _masked(fmt, n, k, seed=m + k + n)
                a = _i8(m, k, seed=m)
                assert torch.equal(ops.sparse_int8_matmul(a, ops.pack_sparse(w, fmt), n), int64_ref(a, w)), fmt
    finally:
        _C.set_sparse_vbmi(before)


@pytest.mark.parametrize("fmt", ["csr", "ell"])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 16, 17, 64, 65, 130])
def test_sparse_linear_fp32_close_to_dense(isa, m, fmt):
    n, k = 48, 300
    w = torch.randn(n, k, generator=_gen(m)) * _mask_unstructured(n, k, 0.2, m + 1)
    bias = torch.randn(n, generator=_gen(m + 2))
    x = torch.randn(m, k, generator=_gen(m + 3))
    out = ops.sparse_linear(x, ops.pack_sparse(w, fmt), bias, n)
    ref = (x.double() @ w.double().T + bias.double()).float()
    # fp32 accumulation in another order than the float64 reference: |err| <= 1e-5 * sum|x||w| + ulp
    bound = 1e-5 * (x.abs().double() @ w.abs().double().T).float() + 1e-6
    assert ((out - ref).abs() <= bound).all(), (out - ref).abs().max()


# ------------------------------------------------------------------------------------- layers


def _pruned_linear(k, n, fmt, seed=0, bias=True):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        w = lin.weight
        if fmt == "2:4":
            m = _mask_nm(n, k, 2, seed)
        elif fmt == "block":
            m = _mask_block(n, k, 0.4, seed)
        else:
            m = _mask_unstructured(n, k, 0.1, seed)
        w.mul_(m)
    return lin


@pytest.mark.parametrize("fmt", FORMATS_I8)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_int8_linear_equals_dense_int8linear(isa, fmt, dtype, bias):
    lin = _pruned_linear(192, 80, fmt, seed=3, bias=bias)
    dense = Int8Linear.from_linear(lin)
    sparse = SparseInt8Linear.from_int8linear(dense, fmt)
    assert sparse.format == fmt
    for shape in [(1, 192), (7, 192), (2, 5, 192), (0, 192)]:
        x = torch.randn(*shape, generator=_gen(len(shape))).to(dtype)
        y = sparse(x)
        assert y.dtype == dtype and y.shape == (*shape[:-1], 80)
        assert torch.equal(y, dense(x)), (fmt, shape)


def test_sparse_linear_formats():
    lin = _pruned_linear(130, 40, "csr", seed=11)
    x = torch.randn(3, 130, generator=_gen(12))
    ys = {}
    for fmt in ("csr", "ell"):
        s = SparseLinear.from_linear(lin, fmt)
        assert s.format == fmt and f"format={fmt} fp32" in repr(s)
        ys[fmt] = s(x)
        torch.testing.assert_close(ys[fmt], lin(x).detach(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="'csr' or 'ell'"):
        SparseLinear.from_linear(lin, "2:4")


def test_sparse_linear_layer_bf16_and_nd():
    lin = _pruned_linear(96, 40, "csr", seed=4)
    s = SparseLinear.from_linear(lin)
    x = torch.randn(2, 3, 96, generator=_gen(5))
    torch.testing.assert_close(s(x), lin(x).detach(), rtol=1e-5, atol=1e-5)
    xb = x.bfloat16()
    y = s(xb)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), lin(xb.float()).detach(), rtol=1e-2, atol=1e-2)
    assert "format=csr fp32" in repr(s) and "sparsity=9" in repr(s)


def test_repr_and_stats():
    s = SparseInt8Linear.from_linear(_pruned_linear(128, 32, "2:4"), "2:4")
    nnz, numel = s.sparsity_stats()
    assert numel == 128 * 32 and nnz <= numel // 2
    r = repr(s)
    assert "format=2:4 int8" in r and "in_features=128" in r and "kernel=" in r


@pytest.mark.parametrize("fmt", FORMATS_I8)
def test_state_dict_round_trip_across_different_sparsity(fmt):
    a = SparseInt8Linear.from_linear(_pruned_linear(128, 48, fmt, seed=1), fmt)
    b = SparseInt8Linear(128, 48, format=fmt)  # empty: a different buffer size
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 128, generator=_gen(6))
    assert torch.equal(a(x), b(x))
    c = SparseInt8Linear(64, 48)
    with pytest.raises(RuntimeError, match=r"holds a torch.int8 \[48, 128\] weight"):
        c.load_state_dict(a.state_dict())


def test_dtype_cast_keeps_fp32_buffers():
    s = SparseInt8Linear.from_linear(_pruned_linear(64, 16, "csr"))
    x = torch.randn(3, 64, generator=_gen(7)).bfloat16()
    ref = s(x)
    s = s.bfloat16()
    assert s.weight_scale.dtype == torch.float32 and torch.equal(s(x), ref)


# ------------------------------------------------------------------------------------- sparsify


@pytest.fixture
def avx512():
    """avx512_vnni active for the test (restored after it by conftest), whatever FASTINFER_ISA capped
    the session to: sparsify's measured rule picks int8 sparse formats (and fp32 ell) only there."""
    if "avx512_vnni" not in ISAS:
        pytest.skip("sparsify's sparse int8 choices need avx512_vnni")
    fastinfer.set_isa("avx512_vnni")


def test_choose_format_keeps_int8_dense_without_sparse_kernels():
    w = _i8(64, 256, seed=8, low=1, high=127) * _mask_block(64, 256, 0.3, 1)
    if "avx512_vnni" in ISAS:
        fastinfer.set_isa("avx512_vnni")
        assert choose_format(w) == "block"
    fastinfer.set_isa("avx2" if "avx2" in ISAS else "ref")
    assert choose_format(w) is None  # panels on avx2/ref are not faster than the dense kernel


def test_choose_format_follows_the_zeros(avx512):
    if not _C.sparse_vbmi_active():
        pytest.skip("the default rule's int8 choices are for avx512_vnni with vbmi")
    rule = SparseRule()
    n, k = 64, 256
    base = _i8(n, k, seed=8, low=1, high=127)
    assert choose_format(base * _mask_block(n, k, 0.3, 1), rule) == "block"
    assert choose_format(base * _mask_nm(n, k, 2, 2), rule) == "2:4"
    very_sparse = base * _mask_unstructured(n, k, 0.03, 3)
    assert choose_format(very_sparse, rule) == "ell"
    assert choose_format(very_sparse, SparseRule(int8_ell_max_density=0.0)) == "2:4"  # fits 2:4 too
    assert choose_format(very_sparse, SparseRule(int8_ell_max_density=0.0, int8_csr_max_density=0.05)) == "csr"
    assert choose_format(very_sparse, SparseRule(int8_ell_max_density=0.0, int8_nm24=False)) is None
    assert choose_format(base * _mask_unstructured(n, k, 0.2, 6), rule) == "ell"
    assert choose_format(base * _mask_unstructured(n, k, 0.5, 4), rule) is None
    assert choose_format(base, rule) is None
    f = torch.randn(n, k, generator=_gen(9))
    assert choose_format(f * _mask_unstructured(n, k, 0.1, 5), rule) == "ell"
    assert choose_format(f * _mask_unstructured(n, k, 0.1, 5), SparseRule(fp32_ell_max_density=0.0)) == "csr"
    assert choose_format(f * _mask_unstructured(n, k, 0.4, 7), rule) == "ell"  # up to 50% nonzeros
    assert choose_format(f * _mask_unstructured(n, k, 0.6, 8), rule) is None
    assert choose_format(f, rule) is None
    fastinfer.set_isa("avx2")  # no fp32 ell kernel below AVX-512: csr
    assert choose_format(f * _mask_unstructured(n, k, 0.1, 5), rule) == "csr"
    with pytest.raises(ValueError, match="int8_csr_max_density"):
        SparseRule(int8_csr_max_density=1.5)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).eval()


def _prune_(model, layers_masks):
    with torch.no_grad():
        for idx, mask_fn in layers_masks.items():
            w = model[idx].weight
            w.mul_(mask_fn(*w.shape))


def test_sparsify_converts_only_what_pays_and_keeps_the_original(avx512):
    m = _net()
    _prune_(m, {0: lambda n, k: _mask_unstructured(n, k, 0.1, 1), 2: lambda n, k: _mask_block(n, k, 0.3, 2)})
    before = [p.clone() for p in m.parameters()]
    s = sparsify(m)
    assert [type(x).__name__ for x in s] == ["SparseLinear", "ReLU", "SparseLinear", "ReLU", "Linear"]
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    x = torch.randn(5, 128, generator=_gen(10))
    torch.testing.assert_close(s(x), m(x), rtol=1e-5, atol=1e-5)
    q = sparsify(fastinfer.quantize(m))
    if _C.sparse_vbmi_active():  # unstructured int8 has a faster-than-dense kernel only with VBMI
        # (quantize fused each ReLU into the layer before it: nn.Sequential order)
        assert [type(x).__name__ for x in q] == ["SparseInt8Linear", "Fused", "SparseInt8Linear", "Fused", "Int8Linear"]
        assert q[0].format == "ell"
    else:
        assert [type(x).__name__ for x in q][1:] == ["Fused", "SparseInt8Linear", "Fused", "Int8Linear"]
    assert q[0].activation == "relu" and q[2].activation == "relu"
    assert q[2].format == "block"
    s2 = sparsify(m, skip=("2",))
    assert type(s2[2]) is nn.Linear


def test_quantize_after_sparsify_equals_sparsify_after_quantize(avx512):
    m = _net()
    _prune_(m, {
        0: lambda n, k: _mask_nm(n, k, 2, 3),
        2: lambda n, k: _mask_unstructured(n, k, 0.04, 4),
        4: lambda n, k: _mask_block(n, k, 0.5, 5),
    })  # fmt: skip
    a = fastinfer.quantize(sparsify(m))
    b = sparsify(fastinfer.quantize(m))
    x = torch.randn(9, 128, generator=_gen(11))
    assert torch.equal(a(x), b(x))
    assert torch.equal(a(x), fastinfer.quantize(m)(x))  # and the same as the dense int8 model
    assert any(isinstance(l, SparseInt8Linear) for l in a.modules())


def test_sparsify_shared_layer_and_root_layer():
    shared = _pruned_linear(64, 64, "csr")
    model = nn.Module()
    model.a = shared
    model.b = shared
    s = sparsify(model)
    assert isinstance(s.a, SparseLinear) and s.a is s.b
    assert isinstance(sparsify(_pruned_linear(64, 64, "csr")), SparseLinear)
    with pytest.raises(TypeError, match="nn.Module"):
        sparsify("nope")


def test_prune_then_sparsify_reports_sparsity():
    m = _net()
    p = fastinfer.prune(m, 0.95, skip=("4",))
    s = sparsify(p)
    rows = {r.name: r for r in fastinfer.sparsity_report(s)}
    assert isinstance(s[0], SparseLinear)
    assert abs(rows["0"].sparsity - 0.95) < 1e-3 and rows["0"].kind == "SparseLinear"


# ------------------------------------------------------------------------- compile / opcheck


def _opcheck_samples():
    w8 = {f: _masked(f, 19, 130, seed=20) for f in FORMATS_I8}
    lin = _pruned_linear(130, 19, "csr", seed=21)
    dense = Int8Linear.from_linear(lin)
    wf = torch.randn(19, 130, generator=_gen(22)) * _mask_unstructured(19, 130, 0.2, 23)
    out = []
    for f, w in w8.items():
        out.append(("sparse_int8_matmul", (_i8(5, 130, seed=24), ops.pack_sparse(w, f), 19)))
        sp = SparseInt8Linear.from_int8linear(dense, f if f != "2:4" else "csr")
        out.append(("sparse_int8_linear", (torch.randn(3, 130, generator=_gen(25)), sp.sparse_weight,
                                           sp.weight_scale, sp.bias)))  # fmt: skip
    out.append(("sparse_linear", (torch.randn(4, 130, generator=_gen(26)), ops.pack_sparse(wf), None, 19)))
    out.append(("sparse_linear", (torch.randn(3, 130, generator=_gen(28)), ops.pack_sparse(wf, "ell"), None, 19)))
    out.append(("sparse_linear", (torch.randn(2, 2, 130, generator=_gen(27)), ops.pack_sparse(wf), lin.bias.detach(), 19)))
    return out


@pytest.mark.parametrize("i", range(len(_opcheck_samples())))
def test_opcheck_sparse(i):
    name, args = _opcheck_samples()[i]
    result = opcheck(getattr(torch.ops.fastinfer, name), args)
    assert set(result.values()) == {"SUCCESS"}, result


def test_torch_compile_fullgraph_on_sparsified_model():
    torch._dynamo.reset()
    m = _net()
    _prune_(m, {0: lambda n, k: _mask_unstructured(n, k, 0.05, 1), 2: lambda n, k: _mask_block(n, k, 0.3, 2)})
    for model in (sparsify(m), sparsify(fastinfer.quantize(m))):
        compiled = torch.compile(model, fullgraph=True)
        with torch.no_grad():
            for shape in [(4, 128), (7, 128), (2, 3, 128)]:
                x = torch.randn(*shape, generator=_gen(shape[0]))
                assert torch.equal(compiled(x), model(x)), shape


# -------------------------------------------------------------------------------------- bad input


def test_bad_inputs_raise():
    s = SparseInt8Linear.from_linear(_pruned_linear(64, 16, "csr"))
    f = SparseLinear.from_linear(_pruned_linear(64, 16, "csr"))
    for layer in (s, f):
        with pytest.raises(ValueError, match="last dim must be 64"):
            layer(torch.randn(3, 63))
        with pytest.raises(TypeError, match="float32 and bfloat16"):
            layer(torch.randn(3, 64).double())
        with pytest.raises(TypeError, match="expects a tensor"):
            layer([1.0] * 64)
    with pytest.raises(ValueError, match="unknown format 'coo'"):
        ops.pack_sparse(torch.zeros(2, 2, dtype=torch.int8), "coo")
    with pytest.raises(TypeError, match="needs int8"):
        ops.pack_sparse(torch.zeros(2, 2), "2:4")
    with pytest.raises(ValueError, match="NaN or Inf"):
        ops.pack_sparse(torch.tensor([[float("nan")]]), "csr")
    with pytest.raises(TypeError, match="holds float32 weights"):
        ops.sparse_int8_matmul(_i8(2, 64), f.sparse_weight, 16)
    with pytest.raises(TypeError, match="holds int8 weights"):
        ops.sparse_linear(torch.randn(2, 64), s.sparse_weight, None, 16)
    with pytest.raises(ValueError, match="K=63"):
        ops.sparse_int8_matmul(_i8(2, 63), s.sparse_weight, 16)
    y = ops.sparse_linear(torch.empty(2, 64, device="meta"), f.sparse_weight, None, 16)  # shape inference
    assert y.device.type == "meta" and y.shape == (2, 16)


def test_corrupt_buffers_raise_instead_of_crashing():
    """Every corruption is run in a subprocess: a segfault would fail the test, not the session."""
    code = """
        import torch
        from fastinfer import ops
        w = torch.zeros(16, 128, dtype=torch.int8); w[::3, ::5] = 7
        a = torch.ones(2, 128, dtype=torch.int8)
        caught = 0
        for fmt in ("csr", "2:4", "block", "ell"):
            good = ops.pack_sparse(w, fmt if fmt != "2:4" else "csr") if fmt != "2:4" else ops.pack_sparse(w[:, ::2].repeat_interleave(2, 1) * torch.tensor([1, 0] * 64, dtype=torch.int8), "2:4")
            n = good.numel()
            for off, val in [(0, 1), (8, 99), (16, 255), (70, 255), (64 + 8, 200), (n - 1, 255), (n // 2, 255), (200, 255)]:
                bad = good.clone()
                bad[min(off, n - 1)] = val
                try:
                    ops.sparse_int8_matmul(a, bad, 16)
                except (ValueError, TypeError):
                    caught += 1
            try:
                ops.sparse_int8_matmul(a, good[:-64].clone(), 16)
            except ValueError:
                caught += 1
        # in-place corruption after a successful call is noticed (tensor version changed)
        p = ops.pack_sparse(w, "csr")
        ops.sparse_int8_matmul(a, p, 16)
        info = ops.sparse_info(p)
        idx_off = 64 + ((8 * 17 + 63) // 64) * 64
        p[idx_off:idx_off + 2] = 255  # first column index -> 65535 >= K
        try:
            ops.sparse_int8_matmul(a, p, 16)
        except ValueError as e:
            assert "out of range" in str(e), e
            caught += 1
        print("caught", caught)
    """
    res = run_python(code, timeout=120)
    assert res.returncode == 0, f"exit {res.returncode}\\n{res.stderr[-2000:]}"
    caught = int(res.stdout.split()[-1])
    assert caught >= 4, res.stdout


def test_validation_cache_cannot_be_fooled():
    """Every way a corrupt buffer could reach the kernels without its full validation (review
    findings): an unaligned source modified in place, a new tensor at a freed tensor's address,
    and a module loading a corrupt checkpoint. Subprocess: a miss would segfault."""
    code = """
        import torch
        from fastinfer import ops
        w = torch.zeros(32, 256, dtype=torch.int8); w[::3, ::70] = 5
        a = torch.ones(2, 256, dtype=torch.int8)
        good = ops.pack_sparse(w, "block")
        bad = good.clone()
        info = ops.sparse_info(good)
        # corrupt every tile k-index (the int32 array after colsum and tile pointers)
        np_, nb = 32, 2
        off = 64 + ((4 * np_ + 63) // 64) * 64 + ((8 * (nb + 1) + 63) // 64) * 64
        bad[off:off + 4 * info["nnz"]] = 255
        caught = 0
        # 1) unaligned source, validated, then overwritten in place
        blob = torch.empty(good.numel() + 8, dtype=torch.uint8)
        src = blob[8:]
        src.copy_(good)
        ops.sparse_int8_matmul(a, src, 32)
        src.copy_(bad)
        try:
            ops.sparse_int8_matmul(a, src, 32)
        except ValueError:
            caught += 1
        # 2) a new tensor at a freed tensor's address, written without a version bump
        for _ in range(5):
            p = ops.pack_sparse(w, "block")
            ops.sparse_int8_matmul(a, p, 32)
            addr = p.data_ptr()
            del p
            q = torch.empty(good.numel(), dtype=torch.uint8)
            q.numpy()[:] = bad.numpy()
            try:
                ops.sparse_int8_matmul(a, q, 32)
            except ValueError:
                caught += 1
        # 3) a module loading a corrupt checkpoint
        from fastinfer.nn import SparseInt8Linear
        layer = SparseInt8Linear(256, 32, format="block")
        sd = layer.state_dict()
        sd["sparse_weight"] = bad
        try:
            layer.load_state_dict(sd)
        except RuntimeError as e:
            assert "not a valid fastinfer sparse weight" in str(e), e
            caught += 1
        print("caught", caught)
    """
    res = run_python(code, timeout=120)
    assert res.returncode == 0, f"exit {res.returncode}\\n{res.stderr[-2000:]}"
    assert res.stdout.split()[-1] == "7", res.stdout


def test_sparse_layers_in_torch_transformer_encoder(avx512):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 256, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    pruned = fastinfer.prune(enc, 0.75, pattern="block", skip=("*.self_attn.*",))
    x = torch.randn(3, 10, 64)
    with torch.no_grad():
        ref = pruned(x)
        for model in (sparsify(pruned), sparsify(fastinfer.quantize(pruned)), fastinfer.quantize(sparsify(pruned))):
            assert any(isinstance(m, (SparseLinear, SparseInt8Linear)) for m in model.modules())
            out = model(x)
            assert out.shape == ref.shape and torch.isfinite(out).all()


def test_inference_mode_build_load_and_run():
    lin = _pruned_linear(128, 32, "block", seed=9)
    x = torch.randn(3, 128, generator=_gen(12))
    with torch.inference_mode():
        s = SparseInt8Linear.from_linear(lin, "block")
        f = SparseLinear.from_linear(lin)
        y = s(x)
        s2 = SparseInt8Linear(128, 32, format="block")
        s2.load_state_dict(s.state_dict())
        assert torch.equal(s2(x), y)
        f(x)
    assert torch.equal(s(x), y)


@pytest.mark.parametrize("fmt", FORMATS_I8)
def test_zero_input_features(fmt):
    s = SparseInt8Linear(0, 8, format=fmt)
    with torch.no_grad():
        s.bias.copy_(torch.arange(8.0))
    assert "in_features=0" in repr(s)
    assert torch.equal(s(torch.randn(3, 0)), s.bias.expand(3, 8))
    assert ops.unpack_sparse(s.sparse_weight).shape == (8, 0)


def test_load_rejects_a_buffer_of_the_other_dtype():
    f = SparseLinear(64, 16)
    s = SparseInt8Linear.from_linear(_pruned_linear(64, 16, "csr"))
    with pytest.raises(RuntimeError, match=r"holds a torch.int8 \[16, 64\] weight, this layer is torch.float32"):
        f.load_state_dict({"sparse_weight": s.sparse_weight, "bias": s.bias})
