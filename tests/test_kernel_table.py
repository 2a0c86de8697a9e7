"""The kernel table (DESIGN.md, "Kernel table, per ISA"): one ISA per call, and every ISA agreeing.

Each entry point reads the active table once and passes it down, so an ISA change from another
thread (fastinfer.set_isa, the VBMI switch) can only pick which table a whole call uses. A call that
mixed two tables (activations quantized for one, multiplied by another's kernels) gives wrong
results; these tests compare exactly (torch.equal) against single-ISA results, with ref the oracle.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter

import pytest
import torch

import fastinfer
from conftest import ISAS, assert_same, int64_ref, kernel_variants, sparse_int8, use_variant
from fastinfer import _C, ops

FORMATS_I8 = ("csr", "2:4", "block", "ell")
FORMATS_F32 = ("csr", "ell")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def _restore_vbmi():
    """The VBMI switch as it was (the ISA cap is restored by conftest's fixture)."""
    before = _C.set_sparse_vbmi(True)  # returns the old value
    yield
    _C.set_sparse_vbmi(before)


# M = 1 (one row chunk), 7 (an MR tail), 70 (several row chunks and the transposed CSR path); K around
# the 64-input tiles and 128-input ell windows; N with a partial 16-channel block.
SHAPES = [(1, 64, 16), (7, 130, 37), (70, 257, 50), (3, 1000, 100)]


# ---------------------------------------------------------------------- every ISA gives one result


def _int8_results(fmt: str, m: int, k: int, n: int, density: float, seed: int) -> tuple[dict, tuple]:
    """Each (ISA, VBMI) table's (matmul, linear fp32, linear bf16) results, and the dense ref oracle's."""
    w = sparse_int8(fmt, n, k, density, seed)
    g = _gen(seed + 1)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    x = torch.randn(m, k, generator=g) * 3
    if m > 1:
        x[0, k // 2] = float("nan")  # a NaN row: NaN outputs on every path
    w_scale = torch.rand(n, generator=g) / 100
    bias = torch.randn(n, generator=g)
    p = ops.pack_sparse(w, fmt)
    out = {}
    for isa, vbmi in kernel_variants():
        use_variant(isa, vbmi)
        out[(isa, vbmi)] = (
            ops.sparse_int8_matmul(a, p, n),
            ops.sparse_int8_linear(x, p, w_scale, bias),
            ops.sparse_int8_linear(x.bfloat16(), p, w_scale, None),
        )
    use_variant("ref", True)
    dense = ops.pack_int8_weight(w)
    oracle = (int64_ref(a, w), ops.int8_linear(x, dense, w_scale, bias), ops.int8_linear(x.bfloat16(), dense, w_scale))
    return out, oracle


@pytest.mark.parametrize("fmt", FORMATS_I8)
@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("density", [0.1, 0.5])
def test_every_int8_format_identical_under_every_isa(fmt, m, k, n, density):
    """Exact equality across every ISA table (and VBMI on/off), and with the dense ref oracle:
    int64 matmul for sparse_int8_matmul, the dense int8_linear (same quantization and epilogue)."""
    results, oracle = _int8_results(fmt, m, k, n, density, seed=m * 7 + k * 3 + n + int(density * 10))
    for variant, got in results.items():
        for name, g, want in zip(("matmul", "linear fp32", "linear bf16"), got, oracle):
            assert_same(g, want, f"{fmt} {name} {m}x{k}x{n} isa={variant}")


@pytest.mark.parametrize("fmt", FORMATS_F32)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_every_fp32_format_per_isa_deterministic_and_close(fmt, m, k, n):
    """fp32 sparse kernels sum in an ISA-specific order, so across ISAs they agree to fp32 rounding
    (not bit for bit); within one ISA every call gives the same bits."""
    g = _gen(m + k + n)
    w = torch.randn(n, k, generator=g) * (torch.rand(n, k, generator=g) < 0.3)
    x = torch.randn(m, k, generator=g)
    bias = torch.randn(n, generator=g)
    p = ops.pack_sparse(w, fmt)
    want = x.double() @ w.double().T + bias.double()
    for isa, vbmi in kernel_variants():
        use_variant(isa, vbmi)
        y = ops.sparse_linear(x, p, bias, n)
        assert_same(ops.sparse_linear(x, p, bias, n), y, f"{fmt} isa={isa} vbmi={vbmi}: repeat")
        torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------- concurrent set_isa: one ISA per call


def _concurrent_problems():
    """(name, call, the results it may give): int8 ops must give their one exact result under any
    ISA; an fp32 sparse_linear, one of its per-ISA results (never a mix of two)."""
    probs = []
    # Wide rows: quantizing x takes long enough (~0.1 ms on avx512_vnni) for set_isa calls from the
    # other thread to land between the quantization and the multiply; few channels keep ref fast.
    m, k, n = 64, 4096, 32
    g = _gen(99)
    x = torch.randn(m, k, generator=g)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    w_scale = torch.rand(n, generator=g) / 100
    bias = torch.randn(n, generator=g)
    for fmt in ("block", "2:4", "ell", "csr"):
        w = sparse_int8(fmt, n, k, 0.3, seed=len(probs))
        p = ops.pack_sparse(w, fmt)
        probs.append((f"sparse_int8_linear {fmt}", lambda p=p: ops.sparse_int8_linear(x, p, w_scale, bias)))
        probs.append((f"sparse_int8_matmul {fmt}", lambda p=p: ops.sparse_int8_matmul(a, p, n)))
    wd = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    pd = ops.pack_int8_weight(wd)
    probs.append(("int8_linear dense", lambda: ops.int8_linear(x, pd, w_scale, bias)))
    probs.append(("int8_matmul dense", lambda: ops.int8_matmul_packed(a, pd, n)))
    for fmt in FORMATS_F32:
        wf = torch.randn(n, k, generator=g) * (torch.rand(n, k, generator=g) < 0.3)
        pf = ops.pack_sparse(wf, fmt)
        probs.append((f"sparse_linear fp32 {fmt}", lambda pf=pf: ops.sparse_linear(x, pf, bias, n)))
    allowed = []
    for _name, call in probs:
        seen = []
        for isa, vbmi in kernel_variants():
            use_variant(isa, vbmi)
            y = call()
            if not any(torch.equal(y, s) for s in seen):
                seen.append(y)
        allowed.append(seen)
    use_variant(ISAS[-1], True)
    return probs, allowed


def test_concurrent_set_isa_never_mixes_isas_in_one_call():
    """One thread flips the ISA (and the VBMI switch) as fast as it can while another runs every op
    many times; the kernels release the GIL, so the flips land inside the calls. Before the kernel
    table, sparse_int8_linear read the ISA twice (quantize for one ISA, multiply with another's
    kernels: 2:4, block and ell results off by 128 * column sums)."""
    if len(kernel_variants()) < 2:
        pytest.skip("needs at least two ISAs")
    probs, allowed = _concurrent_problems()
    variants = kernel_variants()
    stop = threading.Event()
    flips = [0]
    errors: list[str] = []

    def toggler():
        j = 0
        while not stop.is_set():
            isa, vbmi = variants[j % len(variants)]
            fastinfer.set_isa(isa)
            _C.set_sparse_vbmi(vbmi)
            j += 1
        flips[0] = j

    def worker():
        deadline = time.monotonic() + 4.0  # at most: the ref kernels are slow on a loaded machine
        for it in range(100):
            for (name, call), ok in zip(probs, allowed):
                y = call()
                if not any(torch.equal(y, s) for s in ok):
                    errors.append(name)
            if time.monotonic() > deadline and it >= 10:
                break

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)  # the worker gets the GIL back soon after each call
    t = threading.Thread(target=toggler, daemon=True)
    t.start()
    try:
        w = threading.Thread(target=worker)
        w.start()
        w.join(120)
        assert not w.is_alive(), "worker hung"
    finally:
        stop.set()
        t.join(30)
        sys.setswitchinterval(switch)
    assert not t.is_alive()
    assert flips[0] > 100, f"only {flips[0]} ISA flips: the test did not exercise anything"
    assert not errors, f"mixed-ISA results: {dict(Counter(errors))}"
