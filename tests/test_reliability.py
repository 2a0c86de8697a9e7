"""Defects found by fuzzing, sanitizers and thread races (issue 12), each kept closed by a test:

1. a concurrent set_isa() mixing two ISAs in one call (test_kernel_table.py, and the sparse model
   here with several Python threads);
2. dense packed weights trusted beyond their header (column sums, padding bytes);
3. integer overflow in the packed size of an untrusted header;
4. a tiny sparse buffer declaring a huge dense shape (unpack, stats and repr expanding it);
5. flush-to-zero results depending on the thread count (workers kept their own MXCSR).
"""

from __future__ import annotations

import struct
import sys
import threading
import time

import pytest
import torch

import fastinfer
from conftest import ISAS, int64_ref, kernel_variants, run_python, sparse_int8, use_variant
from fastinfer import _C, ops
from fastinfer import nn as fnn

HEADER = 64  # bytes of the K4N16 header; then colsum int32 [np], then the 16-channel blocks


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def _restore_vbmi():
    before = _C.set_sparse_vbmi(True)
    yield
    _C.set_sparse_vbmi(before)


# ------------------------------------------------------------------ 2. dense packed weights in full


def _packed(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=_gen(seed))
    return w, ops.pack_int8_weight(w)


def _block_offset(p: torch.Tensor, channel: int, col: int) -> int:
    """Byte offset of W[channel, col] in a K4N16 buffer (also for the padding channels and columns)."""
    n, k = ops.unpack_int8_weight(p).shape
    np_, kp = (n + 15) // 16 * 16, (k + 63) // 64 * 64
    return HEADER + 4 * np_ + (channel // 16) * 16 * kp + (col // 4) * 64 + (channel % 16) * 4 + col % 4


def _tamper_colsum(p: torch.Tensor) -> None:
    p[HEADER] ^= 1  # the low byte of colsum[0] (little endian)


def _tamper_k_padding(p: torch.Tensor) -> None:  # W is [20, 60]: columns 60..63 are padding
    p[_block_offset(p, 3, 61)] = 5


def _tamper_n_padding(p: torch.Tensor) -> None:  # channels 20..31 are padding
    p[_block_offset(p, 25, 7)] = 1


def _tamper_reserved(p: torch.Tensor) -> None:
    p[12] = 1  # PackHeader.reserved


TAMPERS = {
    "colsum": (_tamper_colsum, "column sum"),
    "k-padding": (_tamper_k_padding, "padding byte"),
    "n-padding": (_tamper_n_padding, "padding byte"),
    "reserved": (_tamper_reserved, "reserved header bytes"),
}


@pytest.mark.parametrize("tamper", list(TAMPERS))
def test_tampered_packed_weight_raises_in_every_op(tamper):
    """Before: view_packed read only the header; the VNNI kernel used the stored column sums and the
    padding (multiplied by the shifted zero 128), ref and avx2 neither, so a tampered buffer gave
    another result on avx512_vnni than on ref and than unpack_int8_weight, silently."""
    fn, message = TAMPERS[tamper]
    w, p = _packed(20, 60)
    x = torch.randn(5, 60, generator=_gen(1))
    a = torch.randint(-128, 128, (5, 60), dtype=torch.int8, generator=_gen(2))
    s = torch.rand(20, generator=_gen(3))
    ops.int8_linear(x, p, s)  # valid, and now cached as valid for this version
    fn(p)  # an in-place write through torch: a new version, validated again on the next call
    for call in (
        lambda: ops.int8_linear(x, p, s),
        lambda: ops.int8_matmul_packed(a, p, 20),
        lambda: ops.unpack_int8_weight(p),
        lambda: ops.validate_int8_weight(p),
    ):
        with pytest.raises(ValueError, match=message):
            call()


@pytest.mark.parametrize("tamper", list(TAMPERS))
def test_load_state_dict_rejects_a_tampered_packed_weight(tamper):
    fn, message = TAMPERS[tamper]
    # state format 1 (older files) held the packed layout itself: it is validated in full on load
    layer = fnn.Int8Linear.from_linear(torch.nn.Linear(60, 20))
    sd = {"packed_weight": layer.packed_weight.clone(), "weight_scale": layer.weight_scale.clone(),
          "bias": layer.bias.clone()}  # fmt: skip
    fn(sd["packed_weight"])
    fresh = fnn.Int8Linear(60, 20)
    before = fresh.packed_weight.clone()
    with pytest.raises(RuntimeError, match=f"packed_weight: not a valid fastinfer packed int8 weight.*{message}"):
        fresh.load_state_dict(sd)
    assert torch.equal(fresh.packed_weight, before), "a rejected buffer must not be copied in"


def test_load_state_dict_names_a_wrong_shape():
    src = fnn.Int8Linear(61, 20)
    with pytest.raises(RuntimeError, match=r"weight_int8: holds torch.int8 \[20, 61\], this layer needs int8 \[20, 60\]"):
        fnn.Int8Linear(60, 20).load_state_dict(src.state_dict())
    legacy = {"packed_weight": src.packed_weight, "weight_scale": src.weight_scale, "bias": src.bias}
    with pytest.raises(RuntimeError, match=r"packed_weight: holds an int8 \[20, 61\] weight, this layer is \[20, 60\]"):
        fnn.Int8Linear(60, 20).load_state_dict(legacy)


def test_valid_state_dict_still_loads_and_matches():
    src = fnn.Int8Linear.from_linear(torch.nn.Linear(60, 20))
    dst = fnn.Int8Linear(60, 20)
    dst.load_state_dict(src.state_dict())
    x = torch.randn(3, 60, generator=_gen(4))
    assert torch.equal(dst(x), src(x))


def test_validation_runs_once_per_tensor_version(monkeypatch):
    """The O(bytes) check costs as much as reading the weight: once per version, not per call."""
    calls = []
    real = _C.validate_packed

    class Counting:  # _C with validate_packed counted
        def __getattr__(self, name):
            return getattr(_C, name)

        @staticmethod
        def validate_packed(ptr, nbytes):
            calls.append(nbytes)
            return real(ptr, nbytes)

    monkeypatch.setattr(ops.linear, "_C", Counting())
    _, p = _packed(20, 60)
    x = torch.randn(2, 60)
    s = torch.ones(20)
    for _ in range(5):
        ops.int8_linear(x, p, s)
    assert calls == [], "pack_int8_weight's own output is known valid"
    q = p.clone()  # a new tensor: checked on first use, then cached
    for _ in range(5):
        ops.int8_linear(x, q, s)
    assert len(calls) == 1
    q.add_(0)  # an in-place op bumps the version: checked again
    ops.int8_linear(x, q, s)
    ops.int8_linear(x, q, s)
    assert len(calls) == 2
    ops.validate_int8_weight(q)  # explicit: always runs
    assert len(calls) == 3


def test_a_write_during_validation_leaves_the_buffer_untrusted():
    """The cache keeps the state taken before the check: a write that lands while the check runs
    (another thread; the check releases the GIL) makes the entry stale, never trusted."""
    cache = ops.linear._VALID
    _, p = _packed(20, 60)
    q = p.clone()

    def validate_then_write(ptr, nbytes):
        _C.validate_packed(ptr, nbytes)
        q[HEADER] ^= 1  # after the bytes were checked, before the result is recorded

    cache.checked(q, validate_then_write)
    assert not cache.known(q)
    with pytest.raises(ValueError, match="column sum"):
        ops.int8_linear(torch.randn(1, 60), q, torch.ones(20))


def test_write_behind_torchs_back_is_found_by_validate_int8_weight():
    """Writes through .numpy() do not bump the version: the documented remedy is the explicit check."""
    _, p = _packed(20, 60)
    p.numpy()[HEADER] ^= 1
    with pytest.raises(ValueError, match="column sum"):
        ops.validate_int8_weight(p)


def test_pack_under_inference_mode_returns_a_version_tracked_tensor():
    w = torch.randint(-127, 128, (20, 60), dtype=torch.int8)
    with torch.inference_mode():
        p = ops.pack_int8_weight(w)
    assert not p.is_inference()  # else validated on every call (no version counter)
    assert p._version >= 0


def test_unaligned_packed_weight_is_validated_on_its_copy():
    _, p = _packed(20, 60)
    slab = torch.zeros(p.numel() + 1, dtype=torch.uint8)
    odd = slab[1:]
    odd.copy_(p)
    assert odd.data_ptr() % 64 != 0
    x = torch.randn(2, 60)
    s = torch.rand(20)
    assert torch.equal(ops.int8_linear(x, odd, s), ops.int8_linear(x, p, s))
    _tamper_colsum(odd)
    with pytest.raises(ValueError, match="column sum"):
        ops.int8_linear(x, odd, s)


def test_accepted_mutations_agree_on_every_isa():
    """A mutated buffer either raises or gives the one exact result on every ISA: 300 mutations, half
    random bit flips anywhere past the header (sums, weights, padding), half weight edits that keep
    the column sum consistent (accepted, and the kernels must then use the new weights)."""
    w, p = _packed(20, 60, seed=7)
    a = torch.randint(-128, 128, (3, 60), dtype=torch.int8, generator=_gen(8))
    g = _gen(9)

    def draw(hi: int) -> int:
        return int(torch.randint(0, hi, (1,), generator=g))

    accepted = raised = 0
    for trial in range(300):
        q = p.clone()
        if trial % 2 == 0:
            for _ in range(1 + draw(3)):
                q[HEADER + draw(q.numel() - HEADER)] ^= 1 << draw(8)
        else:
            ch, col, val = draw(20), draw(60), draw(256) - 128
            off = _block_offset(q, ch, col)
            old = int(q[off].view(torch.int8))
            q[off] = val & 0xFF
            sums = q[HEADER : HEADER + 4 * 32].clone().view(torch.int32)
            sums[ch] += val - old
            q[HEADER : HEADER + 4 * 32] = sums.view(torch.uint8)
        try:
            wq = ops.unpack_int8_weight(q)
        except ValueError:
            raised += 1
            continue
        accepted += 1
        want = int64_ref(a, wq)
        for isa in ISAS:
            fastinfer.set_isa(isa)
            assert torch.equal(ops.int8_matmul_packed(a, q, 20), want), isa
        fastinfer.set_isa(None)
    assert accepted >= 140 and raised >= 140, (accepted, raised)  # both sides exercised


# -------------------------------------------------------------------- 3. overflow in packed sizes


def _dense_header(n: int, k: int, nbytes: int) -> torch.Tensor:
    h = bytearray(nbytes)
    struct.pack_into("<IIIIqqqq", h, 0, 0x57384946, 1, 1, 0, n, k, (n + 15) // 16 * 16, (k + 63) // 64 * 64)
    return torch.frombuffer(h, dtype=torch.uint8).clone()


def test_packed_header_whose_size_wraps_is_rejected():
    """64 + 4n + np * kp for n = 207135091984, k = 623396096 wraps int64 to 1,152: the header passed
    the size check and packed_shape returned those sizes (UBSan: signed overflow)."""
    b = _dense_header(207135091984, 623396096, 1152)
    with pytest.raises(ValueError, match="header and buffer size disagree"):
        ops.unpack_int8_weight(b)
    with pytest.raises(ValueError, match="header and buffer size disagree"):
        ops.int8_matmul_packed(torch.zeros(1, 623396096 % 64 + 1, dtype=torch.int8), b, 207135091984)
    with pytest.raises(ValueError, match="size too large"):
        _C.packed_nbytes(2**40, 2**40)


@pytest.mark.parametrize("n,k", [(2**40 + 1, 1), (1, 2**40 + 1), (-1, 64), (2**39, 2**39), (2**62, 2**62)])
def test_packed_header_sizes_out_of_range(n, k):
    with pytest.raises(ValueError, match="header and buffer size disagree"):
        ops.unpack_int8_weight(_dense_header(n, k, 4096))


def test_row_span_overflow_is_an_error_not_a_read():
    """m * ld past any address space: an error before anything is read (in a child: if this ever
    regressed it would read wild memory)."""
    r = run_python(
        "import fastinfer\n"
        "from fastinfer import _C\n"
        "try:\n"
        "    _C.quantize_per_token(0, 0, 2**39, 64, 2**39, 0, 64, 0)\n"
        "except ValueError as e:\n"
        "    print('raised', e)\n"
    )
    assert r.returncode == 0, r.stderr
    assert "raised quantize_per_token: rows times row stride too large" in r.stdout


# --------------------------------------------------- 4. a sparse buffer cannot make us expand it


def _tiny_csr_declaring(n: int, k: int) -> torch.Tensor:
    """A valid csr fp32 buffer of one nonzero in a [1, 4096] weight, its header edited to [n, k]."""
    w = torch.zeros(1, 4096)
    w[0, 5] = 1.0
    p = ops.pack_sparse(w, "csr").clone()
    hdr = bytearray(p[:64].numpy().tobytes())
    struct.pack_into("<qqqq", hdr, 16, n, k, (n + 15) // 16 * 16, (k + 63) // 64 * 64)
    hdr[12:16] = struct.pack("<I", 4 if k > 65536 else 2)
    p[:64] = torch.frombuffer(hdr, dtype=torch.uint8)
    return p


def test_tiny_sparse_buffer_cannot_make_us_allocate_a_huge_weight(monkeypatch):
    """Before: a 256-byte csr buffer declaring [1, 2^28] made unpack_sparse, sparsity_stats and the
    layer's repr allocate and zero 1 GiB (k = 2^31: 8 GiB). It is a valid buffer (one nonzero), so
    it validates; what it can no longer do is expand: counting reads the stored values only, a layer
    refuses a shape other than its own, and unpack_sparse refuses past max(2^26, 4096 x its bytes)."""
    p = _tiny_csr_declaring(1, 2**28)
    assert p.numel() <= 256
    ops.sparse_validate(p)
    assert ops.sparse_info(p)["k"] == 2**28
    assert ops.sparse_nonzeros(p) == 1
    with pytest.raises(ValueError, match=r"declares \[1, 268435456\].*at most max\(2\^26, 4096 x its bytes\)"):
        ops.unpack_sparse(p)
    layer = fnn.SparseLinear(4096, 1)
    with pytest.raises(RuntimeError, match=r"sparse_weight: holds a torch.float32 \[1, 268435456\] weight"):
        layer.load_state_dict({"sparse_weight": p, "bias": torch.zeros(1)})
    layer._buffers["sparse_weight"] = p  # set behind load_state_dict's back: the repr still does not expand it
    monkeypatch.setattr(ops, "unpack_sparse", lambda *a, **k: pytest.fail("repr must not densify"))
    assert "100.0%" in repr(layer)


def test_unpack_bound_leaves_small_weights_of_any_sparsity_alone():
    """Up to 2^26 weights any buffer unpacks: a [1, 2^20] csr of one nonzero is 256 bytes."""
    w = torch.zeros(1, 2**20)
    w[0, 12345] = -2.0
    p = ops.pack_sparse(w, "csr")
    assert p.numel() <= 256
    assert ops.sparse_nonzeros(p) == 1
    assert torch.equal(ops.unpack_sparse(p), w)


def test_large_sparse_layers_of_any_sparsity_still_build():
    """The bound is on unpacking a buffer one is handed, not on buffers: an all-zero placeholder of a
    wide layer (~4.5 bytes a channel) packs, loads and unpacks through its layer."""
    layer = fnn.SparseInt8Linear(32768, 4096, format="block")  # 2^27 weights in ~20 KB
    assert layer.sparse_weight.numel() < 64 * 1024
    assert layer.sparsity_stats() == (0, 2**27)
    with pytest.raises(ValueError, match="pass bounded=False"):
        ops.unpack_sparse(layer.sparse_weight)
    assert layer.weight_int8.shape == (4096, 32768)  # the layer vouches for its own shape
    fresh = fnn.SparseInt8Linear(32768, 4096, format="block")
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(2, 32768)
    assert torch.equal(fresh(x), layer(x))


@pytest.mark.parametrize("fmt,dtype", [("csr", torch.float32), ("ell", torch.float32), ("csr", torch.int8),
                                       ("2:4", torch.int8), ("block", torch.int8), ("ell", torch.int8)])  # fmt: skip
def test_sparse_nonzeros_counts_without_densifying(fmt, dtype, monkeypatch):
    n, k = 40, 200
    if dtype == torch.int8:
        w = sparse_int8(fmt, n, k, 0.2, seed=3)
    else:
        w = torch.randn(n, k, generator=_gen(3)) * (torch.rand(n, k, generator=_gen(4)) < 0.2)
    p = ops.pack_sparse(w, fmt)
    assert ops.sparse_nonzeros(p) == int(torch.count_nonzero(w))
    layer = fnn.SparseLinear(k, n) if dtype == torch.float32 else fnn.SparseInt8Linear(k, n, format=fmt)
    layer._buffers["sparse_weight"] = p

    def no_unpack(*args, **kwargs):
        raise AssertionError("repr / sparsity_stats must not densify the weight")

    monkeypatch.setattr(ops, "unpack_sparse", no_unpack)
    assert layer.sparsity_stats() == (int(torch.count_nonzero(w)), n * k)
    assert "%" in repr(layer)


def _edit_header(p: torch.Tensor, n: int | None = None, k: int | None = None) -> torch.Tensor:
    """p with the header's n or k replaced (np and kp kept: the layout, and so the size, unchanged)."""
    q = p.clone()
    hdr = bytearray(q[:64].numpy().tobytes())
    if n is not None:
        struct.pack_into("<q", hdr, 16, n)
    if k is not None:
        struct.pack_into("<q", hdr, 24, k)
    q[:64] = torch.frombuffer(hdr, dtype=torch.uint8)
    return q


@pytest.mark.parametrize("fmt", ["2:4", "block", "ell"])
@pytest.mark.parametrize("edit", ["n", "k"])
def test_sparse_values_in_the_padding_are_rejected(fmt, edit):
    """Found by the fuzzer (tests/fuzz_buffers.py): a 2:4, block or ell int8 buffer whose header says
    a smaller N or K with the same padded sizes kept its values past N or K. unpack dropped them,
    the kernels used them (multiplied by the u8-shifted activation padding on VNNI), so the result
    differed from the int64 product of the unpacked weight."""
    n, k = 20, 60 if fmt != "2:4" else 64
    w = sparse_int8(fmt, n, k, 0.5, seed=21)
    w[-1, :] = w[-1, :].clamp(min=1) if fmt != "2:4" else w[-1, :]
    w[:, -1] = 3 if fmt != "2:4" else w[:, -1]
    if fmt == "2:4":  # a kept value in the last column and the last channel
        w[:, -4:] = torch.tensor([0, 0, 5, 7], dtype=torch.int8)
    p = ops.pack_sparse(w, fmt)
    ops.sparse_validate(p)
    q = _edit_header(p, n=n - 1) if edit == "n" else _edit_header(p, k=k - 1)
    with pytest.raises(ValueError, match=r"a value in the padding \(channel >= N or k >= K\)"):
        ops.sparse_validate(q)


@pytest.mark.parametrize("fmt", ["csr", "ell"])
def test_stored_fp32_nan_or_inf_is_rejected(fmt):
    """pack_sparse refuses NaN and Inf; a buffer holding one was edited after packing."""
    w = torch.zeros(16, 64)
    w[3, 10] = 1.5
    p = ops.pack_sparse(w, fmt)
    raw = p.numpy().tobytes()
    at = raw.find(struct.pack("<f", 1.5))
    assert at > 0
    for bad in (float("nan"), float("inf"), float("-inf")):
        q = p.clone()
        q[at : at + 4] = torch.frombuffer(bytearray(struct.pack("<f", bad)), dtype=torch.uint8)
        with pytest.raises(ValueError, match="NaN or Inf"):
            ops.sparse_validate(q)


# ------------------------------------------------------------- 5. the caller's FP mode in workers


def _subnormal_rows(m: int = 4096, k: int = 64, seed: int = 0) -> torch.Tensor:
    """Rows of subnormals whose max is a tiny normal (< 3e-36): what DAZ changes."""
    g = _gen(seed)
    x = (torch.rand(m, k, generator=g) - 0.5) * 1e-38
    x[:, 0] = torch.rand(m, generator=g) * 3e-36
    return x


@pytest.fixture
def flush_denormal():
    """A function that turns flush-to-zero on (after the test built its subnormal inputs: under
    FTZ torch would flush them on creation); off again at the end."""
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-denormal mode")
    torch.set_flush_denormal(False)
    yield lambda: torch.set_flush_denormal(True)
    torch.set_flush_denormal(False)


def test_flush_denormal_results_do_not_depend_on_the_thread_count(flush_denormal):
    """Before: worker threads kept their own MXCSR, so quantize_per_token of rows whose max is below
    ~3e-36 differed between 1 and 2 threads (398-670 of 4,096 rows)."""
    x = _subnormal_rows()
    x_big = x * 1e30  # the same rows scaled: int8_linear on normal values (still rounds the same)
    w, p = _packed(32, 64)
    s = torch.rand(32, generator=_gen(5))
    flush_denormal()
    out = {}
    for t in (1, 2, 3):
        fastinfer.set_num_threads(t)
        out[t] = (ops.quantize_per_token(x), ops.int8_linear(x_big, p, s))
    for t in (2, 3):
        assert torch.equal(out[t][0][0], out[1][0][0]), f"q differs between 1 and {t} threads"
        assert torch.equal(out[t][0][1], out[1][0][1]), f"scale differs between 1 and {t} threads"
        assert torch.equal(out[t][1], out[1][1])
    # and the mode was applied (not merely ignored everywhere): DAZ changes what is quantized
    torch.set_flush_denormal(False)
    fastinfer.set_num_threads(2)
    q_plain, _ = ops.quantize_per_token(x)
    assert not torch.equal(q_plain, out[1][0][0])


def test_workers_get_their_own_fp_mode_back(flush_denormal):
    """The workers are torch's: after our loop they must not keep the caller's flush-to-zero, or a
    later torch op on those threads would flush where the user turned it off."""
    torch.set_num_threads(2)
    fastinfer.set_num_threads(None)
    x = _subnormal_rows()
    tiny = torch.full((1 << 20,), 1e-39)  # subnormal; a parallel torch op spreads it over the workers
    flush_denormal()
    ops.quantize_per_token(x)  # runs on the workers with FTZ/DAZ on
    torch.set_flush_denormal(False)
    y = tiny * 0.5
    assert bool((y > 0).all()), f"{int((y == 0).sum())} of {y.numel()} values flushed on a worker"


# --------------------------------------------- 1. concurrent set_isa with several Python threads


def test_sparse_model_on_several_threads_while_the_isa_flips():
    """Before the kernel table: 8 threads on a sparse model, 16-28 wrong outputs of 2,400 while a
    thread toggled set_isa. Every layer here is exact int8 with the same fp32 epilogue on every ISA,
    so each input has exactly one right output."""
    if len(kernel_variants()) < 2:
        pytest.skip("needs at least two ISAs")
    torch.manual_seed(0)
    k = 1024
    layers = []
    for i, fmt in enumerate(("block", "2:4", "ell", "csr")):
        dense = fnn.Int8Linear(k, k)
        dense.set_weight(sparse_int8(fmt, k, k, 0.3, seed=11 + i), torch.rand(k, generator=_gen(i)) / 500)
        dense.bias.normal_()
        layers.append(fnn.SparseInt8Linear.from_int8linear(dense, fmt))
    model = torch.nn.Sequential(*[m for lyr in layers for m in (lyr, torch.nn.LayerNorm(k))], fnn.Int8Linear(k, 64))
    model[-1].set_weight(torch.randint(-127, 128, (64, k), dtype=torch.int8), torch.rand(64) / 50)
    inputs = [torch.randn(8, k, generator=_gen(100 + i)) for i in range(4)]
    with torch.no_grad():
        want = []
        for x in inputs:
            ys = []
            for v in kernel_variants():
                use_variant(*v)
                ys.append(model(x))
            assert all(torch.equal(y, ys[0]) for y in ys), "the layers must agree on every ISA alone"
            want.append(ys[0])
    use_variant(ISAS[-1], True)

    stop = threading.Event()
    flips = [0]
    wrong, done = [], []

    def toggler():
        j, variants = 0, kernel_variants()
        while not stop.is_set():
            use_variant(*variants[j % len(variants)])
            j += 1
        flips[0] = j

    def worker(i):
        deadline = time.monotonic() + 3.0
        n = 0
        with torch.no_grad():
            while n < 60 and (n < 8 or time.monotonic() < deadline):
                x = inputs[(i + n) % len(inputs)]
                if not torch.equal(model(x), want[(i + n) % len(inputs)]):
                    wrong.append(i)
                n += 1
        done.append(n)

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    t = threading.Thread(target=toggler, daemon=True)
    t.start()
    try:
        workers = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(120)
        assert not any(w.is_alive() for w in workers), "a worker hung"
    finally:
        stop.set()
        t.join(30)
        sys.setswitchinterval(switch)
    assert flips[0] > 50, f"only {flips[0]} flips: nothing was exercised"
    assert sum(done) >= 32
    assert not wrong, f"{len(wrong)} wrong outputs of {sum(done)}"
