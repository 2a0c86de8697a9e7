"""Shared fixtures and reference implementations for the fastinfer test suite.

The references here are plain torch (int64 matmul, fp32 elementwise ops) and define, bit for bit,
what the kernels must return. Tests import them with `from conftest import ...`.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
import textwrap
from fractions import Fraction

import numpy as np
import pytest
import torch

import fastinfer
from fastinfer import _runtime
from fastinfer._runtime import ISA_NAMES as ALL_ISA_NAMES  # noqa: F401  (for the tests)
from fuzz_buffers import sparse_int8_weight

ISAS = fastinfer.available_isas()
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Subprocesses start here, never in the repo root: a `python -c` there puts the source tree's
# fastinfer/ (no compiled _C) first on sys.path instead of the installed package.
SUBPROCESS_CWD = tempfile.mkdtemp(prefix="fastinfer-tests-")
# .ci/sanitize sets FASTINFER_SANITIZER=1: the extension is built with ASan + UBSan and libasan is
# preloaded. The few tests that ASan's own runtime defeats (it replaces glibc malloc, its SEGV
# handler turns a signal into a report) skip on it.
UNDER_SANITIZER = os.environ.get("FASTINFER_SANITIZER") == "1"


# ----------------------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _restore_fastinfer_state():
    """Every test starts and ends with the session's ISA cap and thread setting."""
    isa_before = _runtime.active_isa()
    pinned_before = _runtime._pinned_threads
    torch_threads_before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != torch_threads_before:
        torch.set_num_threads(torch_threads_before)
    fastinfer.set_isa(isa_before)
    fastinfer.set_num_threads(pinned_before)


@pytest.fixture(params=ISAS, ids=lambda name: f"isa={name}")
def isa(request):
    """Runs the test once per ISA this CPU supports, with that ISA active."""
    previous = fastinfer.set_isa(request.param)
    assert fastinfer.info()["isa"] == request.param
    yield request.param
    fastinfer.set_isa(previous)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# --------------------------------------------------------------------------------------- references


def wrap_int32(x: torch.Tensor) -> torch.Tensor:
    """int64 -> int32 modulo 2**32 (two's complement), written out so it does not rely on casts."""
    return (((x + 2**31) % 2**32) - 2**31).to(torch.int32)


def int64_ref(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The definition of int8_matmul: a int8 [M, K] @ w int8 [N, K]^T in int64, wrapped to int32."""
    assert a.dtype == torch.int8 and w.dtype == torch.int8
    if a.shape[1] == 0:
        return torch.zeros((a.shape[0], w.shape[0]), dtype=torch.int32)
    return wrap_int32(a.long() @ w.long().T)


def ref_quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition of quantize_per_token, in torch fp32 ops.

    amax = max|row|; scale = amax / 127; q = clamp(round_half_even(x * (127 / amax)), -127, 127).
    A row with NaN/Inf: scale NaN, q = 0. A row of zeros, or one so small that 127 / amax overflows
    to Inf (subnormal amax): scale 0, q = 0.
    """
    xf = x.float()
    if xf.shape[-1] == 0:
        return torch.zeros(xf.shape, dtype=torch.int8), torch.zeros(xf.shape[:-1], dtype=torch.float32)
    amax = xf.abs().amax(-1)
    finite = torch.isfinite(xf).all(-1)
    inv = torch.tensor(127.0, dtype=torch.float32) / amax
    zero_row = (amax == 0) | ~torch.isfinite(inv)
    dead = (~finite) | zero_row
    safe_inv = torch.where(dead, torch.zeros_like(inv), inv)
    q = torch.round(xf * safe_inv.unsqueeze(-1)).clamp(-127, 127)
    q = torch.where(dead.unsqueeze(-1), torch.zeros_like(q), q).to(torch.int8)
    scale = amax / torch.tensor(127.0, dtype=torch.float32)
    scale = torch.where(zero_row, torch.zeros_like(scale), scale)
    scale = torch.where(finite, scale, torch.full_like(scale, float("nan")))
    return q, scale


def _round_fraction_to_f32(v: Fraction) -> np.float32:
    """Correctly rounded (nearest, ties to even) float32 of an exact rational."""
    r = np.float32(float(v))
    best = None
    for c in (np.nextafter(r, np.float32(-np.inf)), r, np.nextafter(r, np.float32(np.inf))):
        if not np.isfinite(c):
            continue
        d = abs(Fraction(float(c)) - v)
        even = (int(np.array(c, dtype=np.float32).view(np.uint32)) & 1) == 0
        key = (d, not even)
        if best is None or key < best[0]:
            best = (key, c)
    return best[1]


# Round to nearest fp32 gives Inf at or above this magnitude: FLT_MAX plus half an ulp (FLT_MAX's
# significand is odd, so the tie goes to Inf).
F32_OVERFLOW = Fraction(2**128 - 2**103)


def fma_f32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Elementwise fp32 a * b + c with one rounding, computed exactly; a result past FLT_MAX is Inf.

    Python 3.11 has no math.fma and torch has no fused elementwise op, so this goes through exact
    rationals; keep the tensors small (a few thousand elements).
    """
    a, b, c = torch.broadcast_tensors(a.float(), b.float(), c.float())
    out = np.empty(a.shape, dtype=np.float32)
    an, bn, cn = a.numpy(), b.numpy(), c.numpy()
    for idx in np.ndindex(a.shape):
        x, y, z = float(an[idx]), float(bn[idx]), float(cn[idx])
        if not (math.isfinite(x) and math.isfinite(y) and math.isfinite(z)):
            out[idx] = np.float32(x * y + z)  # NaN / Inf propagate as in IEEE fma (no overflow: |x*y| < 2^256)
            continue
        v = Fraction(x) * Fraction(y) + Fraction(z)
        if abs(v) >= F32_OVERFLOW:
            out[idx] = np.float32(math.copysign(math.inf, v))
        else:
            with np.errstate(over="ignore"):  # float(v) just above FLT_MAX: the search picks FLT_MAX
                out[idx] = _round_fraction_to_f32(v)
    return torch.from_numpy(out)


def ref_int8_linear(x, w_int8, w_scale, bias):
    """The definition of int8_linear: y[m, n] = fma(float(acc[m, n]), sa[m] * sw[n], bias[n]) in fp32,
    with (q, sa) = quantize_per_token(x) and acc the exact int32 product; cast to x.dtype."""
    k = x.shape[-1]
    n = w_int8.shape[0]
    q, sa = ref_quantize_per_token(x.reshape(-1, k))
    acc = int64_ref(q, w_int8).float()
    s = sa[:, None] * w_scale[None, :]
    b = bias if bias is not None else torch.zeros(n)
    y = fma_f32(acc, s, b[None, :])
    return y.reshape(*x.shape[:-1], n).to(x.dtype)


# ---------------------------------------------------------------------------------------- utilities


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when out == ref)."""
    ref = ref.detach().double()
    out = out.detach().double()
    noise = (ref - out).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10.0 * math.log10(signal / noise)


def assert_same(a: torch.Tensor, b: torch.Tensor, msg: str = "") -> None:
    """Bit-for-bit value equality with NaN == NaN (same dtype, shape, NaN positions, other values)."""
    assert a.dtype == b.dtype, f"{msg}: dtype {a.dtype} != {b.dtype}"
    assert a.shape == b.shape, f"{msg}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    if a.is_floating_point():
        na, nb = torch.isnan(a), torch.isnan(b)
        assert torch.equal(na, nb), f"{msg}: NaN positions differ"
        a = torch.where(na, torch.zeros_like(a), a)
        b = torch.where(nb, torch.zeros_like(b), b)
    if not torch.equal(a, b):
        diff = (a != b).nonzero()
        first = tuple(diff[0].tolist())
        raise AssertionError(
            f"{msg}: {diff.shape[0]} of {a.numel()} elements differ; first at {first}: "
            f"{a[first].item()!r} != {b[first].item()!r}"
        )


def rand_int8(*shape, gen: torch.Generator, low: int = -128, high: int = 128) -> torch.Tensor:
    return torch.randint(low, high, shape, dtype=torch.int8, generator=gen)


def trained_digits_mlp():
    """A 64-128-128-10 MLP trained here on scikit-learn's bundled digits (fixed seeds; skips without
    scikit-learn). Returns (model in eval mode, x_train, x_test, y_test); do not modify the model."""
    datasets = pytest.importorskip("sklearn.datasets")
    model_selection = pytest.importorskip("sklearn.model_selection")
    x, y = datasets.load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = model_selection.train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    x_tr = torch.tensor(x_tr, dtype=torch.float32) / 16.0
    x_te = torch.tensor(x_te, dtype=torch.float32) / 16.0
    y_tr, y_te = torch.tensor(y_tr), torch.tensor(y_te)

    torch.set_num_threads(1)  # tiny ops: avoids oversubscription stalls on a busy machine (restored by the fixture)
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _epoch in range(30):
        perm = torch.randperm(len(x_tr), generator=g)
        for i in range(0, len(perm), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx]).backward()
            opt.step()
    return model.eval(), x_tr, x_te, y_te


def sparse_int8(fmt: str, n: int, k: int, density: float, seed: int) -> torch.Tensor:
    """int8 [n, k] in [-127, 127] with the zero pattern fmt stores: 2:4 groups, 16 x 64 tiles, or any."""
    return sparse_int8_weight(fmt, n, k, density, torch.Generator().manual_seed(seed))


def kernel_variants() -> list[tuple[str, bool]]:
    """Every kernel table this CPU can run: (ISA, VBMI sparse kernels allowed). ref first."""
    out = [(isa, True) for isa in ISAS]
    if "avx512_vnni" in ISAS and _runtime._C.cpu_flags()["avx512_vbmi"]:
        out.append(("avx512_vnni", False))  # VNNI without VBMI (Cascade Lake): the panel fallback
    return out


def use_variant(isa: str, vbmi: bool) -> None:
    """Makes (isa, vbmi) of kernel_variants() the active kernel table."""
    fastinfer.set_isa(isa)
    _runtime._C.set_sparse_vbmi(vbmi)


def subprocess_env(env: dict | None = None) -> dict:
    """os.environ without FASTINFER_ISA (a test's own setting must not leak), plus env."""
    full_env = {k: v for k, v in os.environ.items() if k != "FASTINFER_ISA"}
    full_env.update(env or {})
    return full_env


def spawn_python(code: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    """Starts code in a fresh interpreter in SUBPROCESS_CWD (pipes for stdout and stderr, text)."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], env=subprocess_env(env), cwd=SUBPROCESS_CWD,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs,
    )  # fmt: skip


def run_python(code: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs code in a fresh interpreter (for import-time behaviour and anything that might crash)."""
    p = spawn_python(code, env)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def pin_planner_times(monkeypatch, table, model_ms: dict | None = None, default: float | None = None,
                      settings_ms: dict | None = None) -> None:  # fmt: skip
    """Pins fastinfer.optimize's measurements, so its decisions can be tested without timing:
    each candidate takes table[name] us (a dict, or a callable (layer, name) -> us; a name missing
    from the dict takes `default`, or is an error), the whole-model check reports model_ms
    (default: every variant equally fast; a variant absent from model_ms takes its "quantize" entry),
    and the whole-model timing of settings (the conv handoff's "bf16" / "u8", the attention's
    implementations) reports settings_ms (default 1.0 ms each)."""
    from fastinfer.plan import planner

    def time_layer(lay, rounds, target_s=0.003):
        x = lay.x

        def us(name):
            if callable(table):
                return table(lay, name)
            return table[name] if default is None else table.get(name, default)

        lay.times = {c.name: us(c.name) for c in lay.candidates}
        lay.input = "x".join(map(str, x.shape))
        lay.x = None

    def model_check(root, variants, example_inputs, rounds):
        ms = model_ms or {}
        return {k: ms.get(k, ms.get("quantize", 1.0) if k != "optimize" else 1.0) for k in variants}

    def time_settings(root, settings, example_inputs, rounds):
        return {k: (settings_ms or {}).get(k, 1.0) for k in settings}

    monkeypatch.setattr(planner, "_time_layer", time_layer)
    monkeypatch.setattr(planner, "_model_check", model_check)
    monkeypatch.setattr(planner, "_time_settings", time_settings)
