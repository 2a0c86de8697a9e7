"""int8_matmul / int8_matmul_packed / pack / unpack: bit-exact against an int64 torch reference on
every ISA, across tile edges, odd K, zero sizes, adversarial values, strides and threads."""

from __future__ import annotations

import itertools
import struct
import threading

import pytest
import torch

import fastinfer
from conftest import ISAS, int64_ref, rand_int8
from fastinfer import ops

PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 29, 31, 37, 53, 61, 67, 97, 101, 127, 131)

# Tile edges of the kernels: 16-channel blocks, groups of 4 blocks (64) per task, 4-byte K groups,
# K padded to 64, avx2 MR=2, avx512 MR=6, row chunks of 24 / 96.
EDGE_N = (1, 15, 16, 17, 31, 32, 33, 47, 48, 49, 63, 64, 65, 127, 128, 129)
EDGE_K = (1, 3, 4, 5, 15, 16, 17, 63, 64, 65, 127, 128, 129, 255, 256, 257)
EDGE_M = (*range(1, 18), 23, 24, 25, 95, 96, 97, 191, 192, 193)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _check(a: torch.Tensor, w: torch.Tensor, msg: str = "") -> None:
    ref = int64_ref(a.contiguous(), w.contiguous())
    out = ops.int8_matmul(a, w)
    assert out.dtype == torch.int32
    assert out.shape == (a.shape[0], w.shape[0])
    assert out.device.type == "cpu"
    if not torch.equal(out, ref):
        bad = (out != ref).nonzero()
        i, j = bad[0].tolist()
        raise AssertionError(
            f"{msg} M,N,K={a.shape[0]},{w.shape[0]},{a.shape[1]}: {bad.shape[0]} wrong elements; "
            f"first [{i},{j}] got {out[i, j].item()} expected {ref[i, j].item()}"
        )


def _prime_allocator(shape) -> None:
    """Fills a just-freed block of the output's size with a sentinel, so that an element the kernel
    forgets to write is very likely to hold 0x5A5A5A5A instead of a lucky correct value."""
    t = torch.full(shape, 0x5A5A5A5A, dtype=torch.int32)
    del t


# --------------------------------------------------------------------------------- exhaustive small


def test_exhaustive_small_shapes(isa):
    g = _gen(1)
    for m, n, k in itertools.product(range(1, 6), range(1, 6), range(1, 10)):
        a, w = rand_int8(m, k, gen=g), rand_int8(n, k, gen=g)
        _check(a, w, f"[{isa}]")


def test_prime_shapes(isa):
    g = _gen(2)
    for m, n, k in itertools.product(PRIMES[::3], PRIMES[1::3], PRIMES[2::3]):
        a, w = rand_int8(m, k, gen=g), rand_int8(n, k, gen=g)
        _check(a, w, f"[{isa}]")


_edge_cache: dict = {}


def _edge_problem(n: int, k: int):
    """Weights, packed weights, activations for the largest M and their reference (shared by ISAs)."""
    key = (n, k)
    if key not in _edge_cache:
        g = _gen(1000 * n + k)
        w = rand_int8(n, k, gen=g)
        a = rand_int8(max(EDGE_M), k, gen=g)
        _edge_cache[key] = (w, ops.pack_int8_weight(w), a, int64_ref(a, w))
    return _edge_cache[key]


@pytest.mark.parametrize("n", EDGE_N, ids=lambda n: f"N={n}")
def test_tile_edges(isa, n):
    """Every (M, K) of the edge lists for this N, through the packed and the one-shot entry points."""
    for k in EDGE_K:
        w, packed, a_full, ref_full = _edge_problem(n, k)
        for m in EDGE_M:
            a = a_full[:m]
            _prime_allocator((m, n))
            out = ops.int8_matmul_packed(a, packed, n)
            assert out.shape == (m, n)
            if not torch.equal(out, ref_full[:m]):
                bad = (out != ref_full[:m]).nonzero()[0].tolist()
                raise AssertionError(
                    f"[{isa}] packed M,N,K={m},{n},{k}: first wrong element {bad}: "
                    f"{out[tuple(bad)].item()} != {ref_full[:m][tuple(bad)].item()}"
                )
        for m in (1, 6, 25, 97):
            _prime_allocator((m, n))
            assert torch.equal(ops.int8_matmul(a_full[:m], w), ref_full[:m]), f"[{isa}] M,N,K={m},{n},{k}"


@pytest.mark.slow
def test_tile_edges_full_sweep(isa):
    """All M in 1..200 against every N and K edge (the default run covers a subset of M)."""
    for n, k in itertools.product(EDGE_N, EDGE_K):
        g = _gen(7 * n + k)
        w = rand_int8(n, k, gen=g)
        packed = ops.pack_int8_weight(w)
        a_full = rand_int8(200, k, gen=g)
        ref_full = int64_ref(a_full, w)
        for m in range(1, 201):
            out = ops.int8_matmul_packed(a_full[:m], packed, n)
            assert torch.equal(out, ref_full[:m]), f"[{isa}] M,N,K={m},{n},{k}"


@pytest.mark.slow
def test_random_shapes_sweep(isa):
    g = _gen(3)
    for _ in range(400):
        m, n, k = (int(v) for v in torch.randint(1, 300, (3,), generator=g))
        _check(rand_int8(m, k, gen=g), rand_int8(n, k, gen=g), f"[{isa}]")


def test_k_not_multiple_of_vector_widths(isa):
    g = _gen(4)
    for k in (2, 6, 10, 14, 18, 30, 34, 62, 66, 70, 126, 130, 190, 250, 1000, 1001, 1023, 4095, 4097):
        assert k % 64 != 0
        _check(rand_int8(13, k, gen=g), rand_int8(37, k, gen=g), f"[{isa}]")


def test_multi_chunk_rows_and_channel_groups(isa):
    """M spans several 96-row chunks and N several 64-channel task groups (the thread split)."""
    g = _gen(5)
    _check(rand_int8(300, 200, gen=g), rand_int8(260, 200, gen=g), f"[{isa}]")


# --------------------------------------------------------------------------------------- zero sizes


@pytest.mark.parametrize("m,n,k", [(0, 5, 7), (3, 0, 7), (3, 5, 0), (0, 0, 0), (0, 5, 0), (3, 0, 0), (0, 0, 7)])
def test_zero_sizes(isa, m, n, k):
    a = torch.ones((m, k), dtype=torch.int8)
    w = torch.ones((n, k), dtype=torch.int8)
    out = ops.int8_matmul(a, w)
    assert out.shape == (m, n) and out.dtype == torch.int32
    assert torch.equal(out, torch.zeros((m, n), dtype=torch.int32))
    packed = ops.pack_int8_weight(w)
    assert packed.numel() == ops.packed_nbytes(n, k)
    out2 = ops.int8_matmul_packed(a, packed, n)
    assert out2.shape == (m, n)
    assert torch.equal(out2, torch.zeros((m, n), dtype=torch.int32))
    assert torch.equal(ops.unpack_int8_weight(packed), w)


# -------------------------------------------------------------------------------- adversarial values


def _const(shape, v):
    return torch.full(shape, v, dtype=torch.int8)


@pytest.mark.parametrize(
    "av,wv",
    [(-128, -128), (-128, 127), (127, -128), (127, 127), (-128, 0), (0, -128), (-1, -1), (1, -128)],
)
@pytest.mark.parametrize("k", [1, 2, 4, 63, 4096, 4099, 8192])
def test_constant_extremes(isa, av, wv, k):
    """All-extreme operands: int16 pair sums (u8*s8 or s8*s8) would saturate here."""
    a, w = _const((7, k), av), _const((19, k), wv)
    out = ops.int8_matmul(a, w)
    assert torch.equal(out, torch.full((7, 19), av * wv * k, dtype=torch.int32)), f"[{isa}] {av}*{wv}*{k}"


def test_alternating_patterns(isa):
    k = 4100
    alt = torch.tensor([-128, 127], dtype=torch.int8).repeat(k // 2)
    alt2 = torch.tensor([-128, -128, 127, 127], dtype=torch.int8).repeat(k // 4)
    rows = [
        alt, -alt.clamp(min=-127), alt2, alt.roll(1), _const((k,), -128), _const((k,), 127), _const((k,), 0),
        torch.tensor([-128, 127, 127, -128], dtype=torch.int8).repeat(k // 4),
    ]  # fmt: skip
    a = torch.stack(rows)
    w = torch.stack([*rows, alt2.roll(3), alt.roll(5)])
    _check(a, w, f"[{isa}]")
    _check(w, a, f"[{isa}] swapped")


def test_full_range_random_with_extreme_rows(isa):
    g = _gen(6)
    a = rand_int8(50, 777, gen=g)
    w = rand_int8(70, 777, gen=g)
    a[3], a[17] = -128, 127
    w[0], w[33], w[69] = -128, 127, -128
    _check(a, w, f"[{isa}]")


def test_large_k_exact_near_int32_limits(isa):
    """K = 2**17: -128 * 127 * K = -2130706432 still fits int32; -128 * -128 * K = 2**31 wraps to
    -2**31 (the documented wrapping behaviour); 127 * 127 * K fits."""
    k = 2**17
    a = torch.stack([_const((k,), -128), _const((k,), 127), _const((k,), -128)])
    w = torch.stack([_const((k,), 127), _const((k,), -128), _const((k,), 127)] * 6)
    w[1] = -128
    w[4, : k // 2] = -128
    w[4, k // 2 :] = 127
    out = ops.int8_matmul(a, w)
    ref = int64_ref(a, w)
    assert torch.equal(out, ref)
    assert out[0, 0].item() == -128 * 127 * k == -2130706432
    assert out[0, 1].item() == -(2**31)  # (-128) * (-128) * 2**17 = 2**31 wraps
    assert out[1, 1].item() == 127 * -128 * k


def test_large_k_random(isa):
    g = _gen(8)
    k = 2**17 + 3
    _check(rand_int8(3, k, gen=g), rand_int8(21, k, gen=g), f"[{isa}]")


# --------------------------------------------------------------------------------- strides & layout


def _layouts(m: int, k: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    big = rand_int8(3 * m + 2, 3 * k + 8, gen=g)
    flat = rand_int8(m * k + 1, gen=g)
    return {
        "transposed": rand_int8(k, m, gen=g).T,
        "row_stride_gt_k": big[:m, 5 : 5 + k],
        "col_step_2": big[:m, : 2 * k : 2],
        "row_step_3": big[: 3 * m : 3, :k],
        "both_steps": big[1 : 1 + 2 * m : 2, 1 : 1 + 3 * k : 3],
        "expanded": rand_int8(1, k, gen=g).expand(m, k),
        "odd_offset": flat[1:].view(m, k),
    }


@pytest.mark.parametrize("m,n,k", [(5, 17, 33), (24, 48, 64), (1, 3, 130)])
def test_noncontiguous_inputs(isa, m, n, k):
    g = _gen(9)
    a_layouts = _layouts(m, k, g)
    w_layouts = _layouts(n, k, g)
    for (an, a), (wn, w) in itertools.product(a_layouts.items(), w_layouts.items()):
        out = ops.int8_matmul(a, w)
        assert torch.equal(out, int64_ref(a.contiguous(), w.contiguous())), f"[{isa}] a={an} w={wn}"
    w = rand_int8(n, k, gen=g)
    packed = ops.pack_int8_weight(w)
    for an, a in a_layouts.items():
        assert torch.equal(ops.int8_matmul_packed(a, packed, n), int64_ref(a.contiguous(), w)), an


def test_single_row_with_row_stride_smaller_than_k(isa):
    """A 1-row operand may have any row stride (torch calls it contiguous): e.g. a column's .T,
    shape (1, K) with strides (1, 1). The result must not depend on that stride."""
    g = _gen(17)
    for k in (1, 2, 64, 130):
        a = rand_int8(k, 1, gen=g).T
        assert a.shape == (1, k) and a.is_contiguous()
        w = rand_int8(9, k, gen=g)
        _check(a, w, f"[{isa}] a strides {a.stride()}")
        assert torch.equal(ops.int8_matmul_packed(a, ops.pack_int8_weight(w), 9), int64_ref(a.contiguous(), w))


def test_inputs_not_modified_and_output_fresh(isa):
    g = _gen(10)
    a, w = rand_int8(9, 70, gen=g), rand_int8(20, 70, gen=g)
    a0, w0 = a.clone(), w.clone()
    out1 = ops.int8_matmul(a, w)
    out2 = ops.int8_matmul(a, w)
    assert torch.equal(a, a0) and torch.equal(w, w0)
    assert out1.data_ptr() != out2.data_ptr()
    assert out1.is_contiguous()
    assert torch.equal(out1, out2)


def test_packed_buffer_at_unaligned_address(isa):
    """A packed buffer that lost its 64-byte alignment (e.g. a slice of a bigger tensor) still works."""
    g = _gen(11)
    a, w = rand_int8(6, 100, gen=g), rand_int8(40, 100, gen=g)
    packed = ops.pack_int8_weight(w)
    holder = torch.zeros(packed.numel() + 1, dtype=torch.uint8)
    holder[1:] = packed
    shifted = holder[1:]
    assert shifted.data_ptr() % 64 != 0
    assert torch.equal(ops.int8_matmul_packed(a, shifted, 40), int64_ref(a, w))
    assert torch.equal(ops.unpack_int8_weight(shifted), w)


def test_pack_from_noncontiguous_weights_is_identical():
    g = _gen(12)
    w = rand_int8(70, 33, gen=g)
    ref = ops.pack_int8_weight(w)
    for name, view in _layouts(70, 33, g).items():
        assert torch.equal(ops.pack_int8_weight(view), ops.pack_int8_weight(view.contiguous())), name
    t = rand_int8(33, 70, gen=g).T
    assert torch.equal(ops.unpack_int8_weight(ops.pack_int8_weight(t)), t)
    assert torch.equal(ops.pack_int8_weight(w), ref)  # deterministic, padding included


# ----------------------------------------------------------------------------------------- threads


def _thread_problems():
    g = _gen(13)
    probs = []
    for m, n, k in [(1, 64, 256), (7, 33, 100), (200, 130, 300), (96, 64, 64), (3, 1000, 64), (50, 17, 2049)]:
        w = rand_int8(n, k, gen=g)
        probs.append((rand_int8(m, k, gen=g), w, ops.pack_int8_weight(w)))
    return probs


def _run_threads(targets, timeout=120):
    threads = [threading.Thread(target=t, daemon=True) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a thread did not finish (deadlock?)"


def test_two_python_threads_concurrently(isa):
    probs = _thread_problems()
    expected = [int64_ref(a, w) for a, w, _ in probs]
    sequential = [ops.int8_matmul_packed(a, p, w.shape[0]) for a, w, p in probs]
    assert all(torch.equal(s, e) for s, e in zip(sequential, expected))
    barrier = threading.Barrier(2)
    errors: list[str] = []

    def worker(tid: int):
        barrier.wait()
        for it in range(25):
            order = range(len(probs)) if tid == 0 else reversed(range(len(probs)))
            for i in order:
                a, w, p = probs[i]
                out = ops.int8_matmul_packed(a, p, w.shape[0]) if it % 2 else ops.int8_matmul(a, w)
                if not torch.equal(out, expected[i]):
                    errors.append(f"thread {tid} iter {it} problem {i}")

    _run_threads([lambda: worker(0), lambda: worker(1)])
    assert not errors, errors[:5]


def test_threads_while_isa_and_thread_count_change():
    """Every ISA is exact, so switching the ISA cap or the pool size from a third thread while two
    threads multiply must not change any result (and must not deadlock)."""
    probs = _thread_problems()
    expected = [int64_ref(a, w) for a, w, _ in probs]
    stop = threading.Event()
    errors: list[str] = []

    def worker(tid: int):
        for it in range(20):
            for i, (a, w, p) in enumerate(probs):
                if not torch.equal(ops.int8_matmul_packed(a, p, w.shape[0]), expected[i]):
                    errors.append(f"thread {tid} iter {it} problem {i}")

    def toggler():
        j = 0
        while not stop.is_set():
            fastinfer.set_isa(ISAS[j % len(ISAS)])
            fastinfer.set_num_threads(1 + j % 3)
            j += 1

    t = threading.Thread(target=toggler, daemon=True)
    t.start()
    try:
        _run_threads([lambda: worker(0), lambda: worker(1)])
    finally:
        stop.set()
        t.join(30)
    assert not t.is_alive()
    assert not errors, errors[:5]


def test_result_independent_of_thread_count(isa):
    g = _gen(14)
    a, w = rand_int8(150, 300, gen=g), rand_int8(200, 300, gen=g)
    ref = int64_ref(a, w)
    for n in (1, 2, 3, 4, 7):
        fastinfer.set_num_threads(n)
        assert torch.equal(ops.int8_matmul(a, w), ref), f"[{isa}] threads={n}"


# ------------------------------------------------------------------------------------- pack/unpack


@pytest.mark.parametrize("n,k", [(1, 1), (16, 64), (17, 65), (33, 130), (5, 3), (100, 7), (0, 5), (5, 0), (0, 0)])
def test_pack_unpack_round_trip(n, k):
    g = _gen(15)
    w = rand_int8(n, k, gen=g)
    packed = ops.pack_int8_weight(w)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == ops.packed_nbytes(n, k) == fastinfer._C.packed_nbytes(n, k)
    assert packed.data_ptr() % 64 == 0
    back = ops.unpack_int8_weight(packed)
    assert back.dtype == torch.int8 and back.shape == (n, k)
    assert torch.equal(back, w)
    assert torch.equal(torch.ops.fastinfer.unpack_int8_weight(packed, n, k), w)


def test_packed_nbytes_formula():
    for n, k in itertools.product(range(0, 40), (0, 1, 63, 64, 65, 200)):
        np_, kp = -(-n // 16) * 16, -(-k // 64) * 64
        assert ops.packed_nbytes(n, k) == 64 + 4 * np_ + np_ * kp == fastinfer._C.packed_nbytes(n, k)


def test_packed_header_identifies_format():
    packed = ops.pack_int8_weight(torch.ones((3, 5), dtype=torch.int8))
    assert bytes(packed[:4].tolist()) == b"FI8W"
    version, _layout = struct.unpack("<II", bytes(packed[4:12].tolist()))
    assert version >= 1
    n, k = struct.unpack("<qq", bytes(packed[16:32].tolist()))
    assert (n, k) == (3, 5)


def _packed_sample():
    g = _gen(16)
    w = rand_int8(20, 40, gen=g)
    return rand_int8(4, 40, gen=g), w, ops.pack_int8_weight(w)


def _consumers(a, packed, n):
    """Everything that reads a packed buffer."""
    return {
        "unpack_int8_weight": lambda: ops.unpack_int8_weight(packed),
        "int8_matmul_packed": lambda: ops.int8_matmul_packed(a, packed, n),
        "int8_linear": lambda: ops.int8_linear(a.float(), packed, torch.ones(n), None),
        "op.unpack_int8_weight": lambda: torch.ops.fastinfer.unpack_int8_weight(packed, n, a.shape[1]),
        "op.int8_matmul_packed": lambda: torch.ops.fastinfer.int8_matmul_packed(a, packed, n),
    }


@pytest.mark.parametrize(
    "corrupt,match",
    [
        (lambda p: p.__setitem__(0, p[0] ^ 0xFF), "magic"),
        (lambda p: p.__setitem__(3, 0), "magic"),
        (lambda p: p.__setitem__(4, p[4] + 1), "version"),
        (lambda p: p.__setitem__(7, 0x7F), "version"),
        (lambda p: p.__setitem__(8, 99), "layout"),
        (lambda p: p.__setitem__(16, 40), "size"),  # header n no longer matches the buffer size
        (lambda p: p.__setitem__(23, 0x80), "size"),  # negative n
        (lambda p: p.__setitem__(31, 0x10), "size"),  # absurd k
    ],
    ids=["magic0", "magic3", "version+1", "version_big", "layout", "n_mismatch", "n_negative", "k_huge"],
)
def test_corrupted_header_raises_value_error(corrupt, match):
    a, w, packed = _packed_sample()
    bad = packed.clone()
    corrupt(bad)
    for name, call in _consumers(a, bad, w.shape[0]).items():
        with pytest.raises(ValueError, match=match):
            call()
            pytest.fail(f"{name} accepted a corrupted header")


@pytest.mark.parametrize("cut", [1, 63, 64, "header_only", "half_header", "empty"])
def test_truncated_or_padded_buffer_raises_value_error(cut):
    a, w, packed = _packed_sample()
    if cut == "header_only":
        bad = packed[:64].clone()
    elif cut == "half_header":
        bad = packed[:32].clone()
    elif cut == "empty":
        bad = packed[:0].clone()
    else:
        bad = packed[: packed.numel() - cut].clone()
    extended = torch.cat([packed, torch.zeros(64, dtype=torch.uint8)])
    for buf in (bad, extended):
        for name, call in _consumers(a, buf, w.shape[0]).items():
            with pytest.raises(ValueError, match="packed weight|packed holds|N=|too small"):
                call()
                pytest.fail(f"{name} accepted a buffer of {buf.numel()} bytes")


def test_packed_wrong_n_or_k_raises():
    a, w, packed = _packed_sample()
    with pytest.raises(ValueError, match="N=20"):
        ops.int8_matmul_packed(a, packed, 21)
    with pytest.raises(ValueError, match="K="):
        ops.int8_matmul_packed(a[:, :39], packed, 20)
    with pytest.raises(ValueError, match="asked for"):
        torch.ops.fastinfer.unpack_int8_weight(packed, 20, 41)
    with pytest.raises(ValueError, match="asked for"):
        torch.ops.fastinfer.unpack_int8_weight(packed, 19, 40)
