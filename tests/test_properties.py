"""Property-based tests (hypothesis): the numerics contract of README.md / DESIGN.md ("Tests",
"Numerics") over drawn shapes, memory layouts, values, ISA paths and thread counts.

What each property states:

- int8_matmul / int8_matmul_packed (and pack/unpack) equal the int64 reference exactly; with K
  around 2^17 and extreme values, dense and sparse matmuls are exact mod 2^32;
- sparse_int8_matmul equals the int64 reference exactly for every int8 format ("csr", "2:4",
  "block", "ell"), on every kernel table (ISA x VBMI switch), and unpack_sparse(pack_sparse(w)) == w;
- quantize_per_token follows its docstring's rule bit for bit (conftest.ref_quantize_per_token),
  gives the same bits on every ISA, and its dequantization error is at most half a step;
- int8_linear (fp32 / bf16, bias or not, activation None / "gelu") gives the same bits on every ISA,
  equals the exact definition (fma(acc, sa * sw, bias) in fp32, as conftest.ref_int8_linear, the
  fused GELU applied before the cast) on sampled rows, gives NaN rows for NaN/Inf input rows and
  bias-only rows for zero rows;
- sparse_int8_linear gives, on every kernel table, the bits of the dense int8_linear of the same weights;
- the thread count (1 or 2, with or without flush-to-zero) never changes a result.

Tensors are built from drawn descriptors (shapes, layout names, value modes, row edits, a seed), so
a falsifying example prints as a short readable case. The default run is derandomized (the same
examples every run, no example database written) and prints the reproduction blob of a failure;
`HYPOTHESIS_PROFILE=fastinfer-explore` (or `pytest --hypothesis-profile=fastinfer-explore`) draws
fresh examples each run. Every property also has a `_slow` variant with more examples (marker `slow`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import tempfile

import pytest
import torch

pytest.importorskip("hypothesis")
from hypothesis import given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.database import DirectoryBasedExampleDatabase  # noqa: E402

import fastinfer  # noqa: E402
from conftest import ISAS, assert_same, fma_f32, int64_ref, ref_quantize_per_token  # noqa: E402
from fastinfer import _runtime, ops  # noqa: E402
from fastinfer._runtime import _C  # noqa: E402

# ------------------------------------------------------------------------------------------ profiles

settings.register_profile("fastinfer-ci", derandomize=True, database=None, print_blob=True, deadline=None)
settings.register_profile(  # fresh examples each run; failures kept for replay outside the source tree
    "fastinfer-explore", derandomize=False, print_blob=True, deadline=None,
    database=DirectoryBasedExampleDatabase(os.path.join(tempfile.gettempdir(), "fastinfer-hypothesis")),
)  # fmt: skip
if settings.get_current_profile_name() == "default":  # a --hypothesis-profile given to pytest wins
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fastinfer-ci"))

FORMATS_I8 = ("csr", "2:4", "block", "ell")

# Every kernel table this CPU can run: (ISA, VBMI sparse kernels allowed); ref first. VNNI without
# VBMI (a Cascade Lake) runs the panel fallback of the 2:4 and ell formats.
VARIANTS = [(isa, True) for isa in ISAS]
if "avx512_vnni" in ISAS and _C.cpu_flags()["avx512_vbmi"]:
    VARIANTS.append(("avx512_vnni", False))


@contextlib.contextmanager
def running(isa: str, vbmi: bool = True, threads: int | None = None, flush_denormal: bool = False):
    """Runs the block with this kernel table and thread setting; restores all of them after."""
    isa_before = fastinfer.set_isa(isa)
    vbmi_before = _C.set_sparse_vbmi(vbmi)
    threads_before = _runtime._pinned_threads
    if threads is not None:
        fastinfer.set_num_threads(threads)
    if flush_denormal and not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        yield
    finally:
        if flush_denormal:
            torch.set_flush_denormal(False)
        fastinfer.set_num_threads(threads_before)
        _C.set_sparse_vbmi(vbmi_before)
        fastinfer.set_isa(isa_before)


def two_tests(body, fast: int, slow: int, case, slow_case=None):
    """The property `body(case)` as two tests: `fast` examples in the default run, and `slow` ones
    (marked slow) drawn from `slow_case` (larger shapes; default: the same strategy)."""
    fast_test = settings(max_examples=fast)(given(case=case)(body))
    slow_given = given(case=case if slow_case is None else slow_case)
    slow_test = pytest.mark.slow(settings(max_examples=slow)(slow_given(body)))
    return fast_test, slow_test


# ------------------------------------------------------------------------------- shape strategies

# Kernel edges: MR = 2 (avx2) / 6 (avx512) row tiles, 24-row small-M split, 96-row chunks; 16-channel
# blocks, 4-block (64-channel) groups; 4-byte K groups, K padded to 64, 64-input tiles (block), 128-input
# windows (ell).
EDGE_M = (1, 2, 3, 5, 6, 7, 11, 12, 13, 23, 24, 25, 95, 96, 97, 0)  # 1 first: where shrinking ends
EDGE_N = (1, 2, 15, 16, 17, 31, 32, 33, 47, 48, 49, 63, 64, 65, 80, 81, 0)


def dims_m(hi: int = 100):
    return st.one_of(st.sampled_from(EDGE_M), st.integers(0, hi))


def dims_n(hi: int = 100):
    return st.one_of(st.sampled_from(EDGE_N), st.integers(0, hi))


def dims_k(hi: int = 300):
    """0/1/small, just around a multiple of 64 (below / at / above), or anything up to hi."""
    near_64 = st.builds(lambda j, d: 64 * j + d, st.integers(1, hi // 64), st.integers(-3, 3))
    return st.one_of(st.integers(0, 9), near_64, st.integers(0, hi))


seeds = st.integers(0, 2**32 - 1)
variants = st.sampled_from(VARIANTS)
isas = st.sampled_from(ISAS)
thread_counts = st.sampled_from([None, 1, 2])  # None: follow torch's thread count

# ---------------------------------------------------------------------------------- memory layouts

# contiguous; padded: row stride > K (a slice of a wider tensor); transposed: column-major view;
# row_step: every other row of a taller tensor; unaligned: data one element past a 64-byte boundary;
# broadcast (int8 2-D only): one row expanded, row stride 0.
LAYOUTS = ("contiguous", "padded", "transposed", "row_step", "unaligned")
layouts = st.sampled_from(LAYOUTS)


def with_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A tensor equal to t with the named memory layout; what lies between its elements is garbage
    (NaN for floats, 0x5A for int8), so a kernel that reads past a row's end gives a wrong result."""
    fill = float("nan") if t.is_floating_point() else 0x5A
    shape = tuple(t.shape)
    if layout == "contiguous" or t.dim() == 0:
        out = t.clone()
    elif layout == "padded":
        out = torch.full((*shape[:-1], shape[-1] + 3), fill, dtype=t.dtype)[..., : shape[-1]]
    elif layout == "transposed" and t.dim() >= 2:
        out = torch.full((*shape[:-2], shape[-1], shape[-2]), fill, dtype=t.dtype).transpose(-1, -2)
    elif layout == "row_step" and t.dim() >= 2:
        out = torch.full((*shape[:-2], 2 * shape[-2], shape[-1]), fill, dtype=t.dtype)[..., ::2, :]
    elif layout == "unaligned":
        out = torch.full((t.numel() + 1,), fill, dtype=t.dtype)[1:].view(shape)
    else:  # transposed / row_step of a 1-D tensor
        out = t.clone()
    out.copy_(t)
    assert_same(out, t, f"layout {layout}")
    return out


# ------------------------------------------------------------------------------------- int8 values

INT8_MODES = ("uniform", "extremes", "min", "max", "small", "sparse")
INT8_EDITS = ("zero", "min", "max", "alternating")


def int8_values(mode: str, shape: tuple[int, ...], g: torch.Generator, low: int = -128) -> torch.Tensor:
    """int8 values: uniform over [low, 127]; only low / 127; all low; all 127; in [-2, 2]; 90% zeros."""
    if mode == "uniform":
        return torch.randint(low, 128, shape, dtype=torch.int8, generator=g)
    if mode == "extremes":
        return torch.where(torch.rand(shape, generator=g) < 0.5, low, 127).to(torch.int8)
    if mode == "min":
        return torch.full(shape, low, dtype=torch.int8)
    if mode == "max":
        return torch.full(shape, 127, dtype=torch.int8)
    if mode == "small":
        return torch.randint(-2, 3, shape, dtype=torch.int8, generator=g)
    if mode == "sparse":
        v = torch.randint(low, 128, shape, dtype=torch.int8, generator=g)
        return v * (torch.rand(shape, generator=g) < 0.1)
    raise AssertionError(mode)


def edit_rows(t: torch.Tensor, edits, low: int = -128) -> torch.Tensor:
    """Overwrites rows (dim 0) of an int8 [R, C] tensor: edits are (kind, index) with index mod R."""
    if t.shape[0] == 0:
        return t
    for kind, idx in edits:
        r = idx % t.shape[0]
        if kind == "zero":
            t[r] = 0
        elif kind == "min":
            t[r] = low
        elif kind == "max":
            t[r] = 127
        else:  # alternating
            t[r] = torch.where(torch.arange(t.shape[1]) % 2 == 0, low, 127).to(torch.int8)
    return t


int8_edits = st.lists(st.tuples(st.sampled_from(INT8_EDITS), st.integers(0, 999)), max_size=3)


# ------------------------------------------------------------------------------------ float values

FLT_MAX = torch.finfo(torch.float32).max
FLOAT_MODES = ("normal", "wide", "integers", "ties", "large", "small")
# Row kinds the contract names: zero rows (and -0.0), NaN / Inf rows, rows of subnormals (amax below
# 127 / FLT_MAX: a zero row), rows whose scale is subnormal (kept, never flushed), rows reaching
# +-FLT_MAX, a single nonzero, exact rounding ties, subnormal elements in a normal row.
FLOAT_EDITS = (
    "zero", "neg_zero", "nan", "inf", "neg_inf", "subnormal", "subnormal_scale", "flt_max",
    "one_hot", "ties", "subnormal_elems", "constant",
)  # fmt: skip
NONFINITE_EDITS = ("nan", "inf", "neg_inf")


def tie_rows(rows: int, k: int, g: torch.Generator, p: torch.Tensor) -> torch.Tensor:
    """Rows with amax = 127 * 2**p[r], so 127 / amax = 2**-p exactly, and every other element an odd
    multiple of 2**(p-1): x * (127 / amax) is exactly j + 0.5, a round-half-even tie."""
    j = torch.randint(-127, 127, (rows, k), generator=g).float() + 0.5
    sign = torch.where(torch.rand(rows, generator=g) < 0.5, 127.0, -127.0)
    j[torch.arange(rows), torch.randint(0, k, (rows,), generator=g)] = sign
    return j * torch.exp2(p.float()).reshape(rows, 1)


def rows2d(t: torch.Tensor) -> torch.Tensor:
    """t [..., K] as [rows, K] (a view where the layout allows; also for K = 0 and 1-D t)."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def float_values(mode: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    if mode == "normal":
        return torch.randn(shape, generator=g) * 3
    if mode == "wide":  # each row its own magnitude, 1e-30 .. 1e30
        rows = math.prod(shape[:-1])
        mag = torch.logspace(-30, 30, max(rows, 1))[torch.randperm(max(rows, 1), generator=g)][:rows]
        return torch.randn(shape, generator=g) * mag.reshape(*shape[:-1], 1)
    if mode == "integers":  # many exact ties in x * 127 / amax
        return torch.randint(-300, 301, shape, generator=g).float()
    if mode == "ties":
        rows = math.prod(shape[:-1])
        if rows == 0 or shape[-1] == 0:
            return torch.zeros(shape)
        return tie_rows(rows, shape[-1], g, torch.randint(-20, 21, (rows,), generator=g)).reshape(shape)
    if mode == "large":
        return (torch.rand(shape, generator=g) * 2 - 1) * FLT_MAX
    if mode == "small":  # scales near the subnormal boundary
        return torch.randn(shape, generator=g) * 1e-36
    raise AssertionError(mode)


def edit_float_rows(x: torch.Tensor, edits, g: torch.Generator) -> list[tuple[int, str]]:
    """Overwrites rows of a float32 [R, K] tensor in place; returns the (row, kind) edits applied."""
    r_count, k = x.shape
    applied = []
    if r_count == 0 or k == 0:
        return applied
    for kind, idx, col in edits:
        r, c = idx % r_count, col % k
        if kind == "zero":
            x[r] = 0.0
        elif kind == "neg_zero":
            x[r] = -0.0
        elif kind in NONFINITE_EDITS:
            x[r, c] = {"nan": float("nan"), "inf": float("inf"), "neg_inf": float("-inf")}[kind]
        elif kind == "subnormal":  # amax < 127 / FLT_MAX: counts as a zero row
            x[r] = torch.randn(k, generator=g) * 1e-40
            x[r, c] = 1e-45
        elif kind == "subnormal_scale":  # amax / 127 is subnormal, 127 / amax finite
            x[r] = torch.randn(k, generator=g) * 1e-37
            x[r, c] = 5e-37
        elif kind == "flt_max":
            x[r] = (torch.rand(k, generator=g) * 2 - 1) * FLT_MAX
            x[r, c] = -FLT_MAX
        elif kind == "one_hot":
            x[r] = 0.0
            x[r, c] = -3.25
        elif kind == "ties":
            x[r] = tie_rows(1, k, g, torch.tensor([col % 11 - 5]))[0]
        elif kind == "subnormal_elems":
            x[r, c] = 1e-39
            x[r, (c + 1) % k] = -1e-45
        else:  # constant
            x[r] = 0.7
        applied.append((r, kind))
    return applied


float_edits = st.lists(
    st.tuples(st.sampled_from(FLOAT_EDITS), st.integers(0, 999), st.integers(0, 999)), max_size=4
)


def gelu_f32(y: torch.Tensor) -> torch.Tensor:
    """The fused epilogue's GELU (the library's scalar helper, the same fp32 operations on every path)."""
    y = y.clone().contiguous()
    if y.numel():
        _C.apply_activation(y.data_ptr(), y.numel(), 1)
    return y


# ============================================================================ int8_matmul (dense)


@dataclasses.dataclass(frozen=True)
class MatmulCase:
    m: int
    k: int
    n: int
    a_mode: str
    w_mode: str
    a_layout: str
    w_layout: str
    a_edits: tuple
    w_edits: tuple
    seed: int
    isa: str
    threads: int | None


@st.composite
def matmul_cases(draw, m_hi=100, n_hi=100, k_hi=300):
    return MatmulCase(
        m=draw(dims_m(m_hi)), k=draw(dims_k(k_hi)), n=draw(dims_n(n_hi)),
        a_mode=draw(st.sampled_from(INT8_MODES)), w_mode=draw(st.sampled_from(INT8_MODES)),
        a_layout=draw(st.sampled_from((*LAYOUTS, "broadcast"))), w_layout=draw(layouts),
        a_edits=tuple(draw(int8_edits)), w_edits=tuple(draw(int8_edits)),
        seed=draw(seeds), isa=draw(isas), threads=draw(thread_counts),
    )  # fmt: skip


def build_matmul(c: MatmulCase) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(c.seed)
    a = edit_rows(int8_values(c.a_mode, (c.m, c.k), g), c.a_edits)
    w = edit_rows(int8_values(c.w_mode, (c.n, c.k), g), c.w_edits)
    if c.a_layout == "broadcast":  # every row the same, row stride 0
        a = a[:1].expand(c.m, c.k) if c.m > 0 else a
    else:
        a = with_layout(a, c.a_layout)
    return a, with_layout(w, c.w_layout)


def _int8_matmul_exact(case: MatmulCase):
    """int8_matmul, int8_matmul_packed and unpack(pack(w)): exactly the int64 reference."""
    a, w = build_matmul(case)
    want = int64_ref(a.contiguous(), w.contiguous())
    with running(case.isa, threads=case.threads):
        packed = ops.pack_int8_weight(w)
        assert_same(ops.unpack_int8_weight(packed), w.contiguous(), "unpack(pack(w))")
        got = ops.int8_matmul(a, w)
        assert got.dtype == torch.int32 and got.shape == (case.m, case.n)
        assert_same(got, want, "int8_matmul")
        assert_same(ops.int8_matmul_packed(a, packed, case.n), want, "int8_matmul_packed")


test_int8_matmul_exact, test_int8_matmul_exact_slow = two_tests(
    _int8_matmul_exact, fast=200, slow=2000, case=matmul_cases(), slow_case=matmul_cases(300, 200, 1100)
)


# ============================================================================ sparse int8 matmul


@dataclasses.dataclass(frozen=True)
class SparseCase:
    fmt: str
    m: int
    k: int
    n: int
    density: float
    a_mode: str
    w_mode: str
    a_layout: str
    a_edits: tuple
    w_edits: tuple
    seed: int
    variant: tuple
    threads: int | None


@st.composite
def sparse_cases(draw, m_hi=100, n_hi=100, k_hi=300):
    return SparseCase(
        fmt=draw(st.sampled_from(FORMATS_I8)),
        m=draw(dims_m(m_hi)), k=draw(dims_k(k_hi)), n=draw(dims_n(n_hi)),
        density=draw(st.sampled_from([0.0, 0.05, 0.3, 0.7, 1.0])),
        a_mode=draw(st.sampled_from(INT8_MODES)), w_mode=draw(st.sampled_from(INT8_MODES)),
        a_layout=draw(layouts), a_edits=tuple(draw(int8_edits)), w_edits=tuple(draw(int8_edits)),
        seed=draw(seeds), variant=draw(variants), threads=draw(thread_counts),
    )  # fmt: skip


def sparse_weight(fmt: str, w: torch.Tensor, density: float, g: torch.Generator) -> torch.Tensor:
    """w with the zeros fmt stores: at most 2 nonzeros per group of 4 inputs ("2:4", the last group
    may be partial), whole zero 16 x 64 tiles ("block"), or any zeros ("csr", "ell")."""
    n, k = w.shape
    if fmt == "2:4":
        kk = (k + 3) // 4 * 4
        keep = torch.rand(n, kk // 4, 4, generator=g).argsort(-1) < 2  # 2 of every 4 ...
        keep &= torch.rand(n, kk // 4, 4, generator=g) < density  # ... and fewer
        return w * keep.reshape(n, kk)[:, :k]
    if fmt == "block":
        tiles = torch.rand((n + 15) // 16, (k + 63) // 64, generator=g) < density
        mask = tiles.repeat_interleave(16, 0)[:n].repeat_interleave(64, 1)[:, :k]
        return w * mask
    return w * (torch.rand(n, k, generator=g) < density)


def build_sparse(c: SparseCase) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(c.seed)
    a = edit_rows(int8_values(c.a_mode, (c.m, c.k), g), c.a_edits)
    w = edit_rows(int8_values(c.w_mode, (c.n, c.k), g), c.w_edits)
    return with_layout(a, c.a_layout), sparse_weight(c.fmt, w, c.density, g)


def _sparse_int8_matmul_exact(case: SparseCase):
    """sparse_int8_matmul on one kernel table: exactly the int64 reference; the buffer unpacks to w."""
    a, w = build_sparse(case)
    want = int64_ref(a.contiguous(), w)
    packed = ops.pack_sparse(w, case.fmt)
    assert_same(ops.unpack_sparse(packed), w, f"unpack_sparse(pack_sparse(w, {case.fmt!r}))")
    assert ops.sparse_nonzeros(packed) == int((w != 0).sum())
    isa, vbmi = case.variant
    with running(isa, vbmi, threads=case.threads):
        got = ops.sparse_int8_matmul(a, packed, case.n)
    assert got.dtype == torch.int32 and got.shape == (case.m, case.n)
    assert_same(got, want, f"sparse_int8_matmul {case.fmt}")


test_sparse_int8_matmul_exact, test_sparse_int8_matmul_exact_slow = two_tests(
    _sparse_int8_matmul_exact, fast=300, slow=3000, case=sparse_cases(), slow_case=sparse_cases(300, 200, 1100)
)


# ============================================================================ quantize_per_token


@dataclasses.dataclass(frozen=True)
class FloatCase:
    lead: tuple
    k: int
    dtype: str
    mode: str
    layout: str
    edits: tuple
    seed: int


def lead_shapes(m_hi=100):
    """The leading dims of x [..., K]: none (x is 1-D), [M], or [B, M]."""
    return st.one_of(
        st.tuples(dims_m(m_hi)), st.tuples(st.integers(0, 4), st.integers(0, 30)), st.just(())
    )


@st.composite
def float_cases(draw, m_hi=100, k_hi=300):
    return FloatCase(
        lead=draw(lead_shapes(m_hi)), k=draw(dims_k(k_hi)),
        dtype=draw(st.sampled_from(["float32", "bfloat16"])), mode=draw(st.sampled_from(FLOAT_MODES)),
        layout=draw(layouts), edits=tuple(draw(float_edits)), seed=draw(seeds),
    )  # fmt: skip


def build_float(c: FloatCase, g: torch.Generator) -> tuple[torch.Tensor, list[tuple[int, str]]]:
    """x [*lead, K] in the case's dtype and layout, and the (flat row, kind) edits applied."""
    shape = (*c.lead, c.k)
    x = float_values(c.mode, shape, g)
    applied = edit_float_rows(rows2d(x), c.edits, g)
    x = x.to(getattr(torch, c.dtype))
    return with_layout(x, c.layout), applied


def _quantize_per_token_rule(case: FloatCase):
    """quantize_per_token: the docstring's rule bit for bit, the same bits on every ISA, and
    |x - q * scale| <= scale / 2 (plus fp32 rounding) on every finite row."""
    x, _ = build_float(case, torch.Generator().manual_seed(case.seed))
    x_before = x.clone()
    want_q, want_s = ref_quantize_per_token(x)
    for isa in ISAS:
        with running(isa):
            q, s = ops.quantize_per_token(x)
        assert q.dtype == torch.int8 and s.dtype == torch.float32
        assert q.shape == x.shape and s.shape == x.shape[:-1]
        assert_same(s, want_s, f"[{isa}] scale")
        assert_same(q, want_q, f"[{isa}] q")
    assert_same(x, x_before, "input modified")
    # The rule's consequences, independent of the reference's code:
    x32 = rows2d(x.float())
    xf, q2, s2 = x32.double(), rows2d(q).int(), s.reshape(-1).double()
    assert bool(((q2 >= -127) & (q2 <= 127)).all()), "q outside [-127, 127]"
    finite = torch.isfinite(xf).all(-1)
    assert torch.isnan(s2[~finite]).all() and (q2[~finite] == 0).all(), "NaN/Inf row: scale NaN, q 0"
    amax = x32.abs().amax(-1) if case.k else torch.zeros(x32.shape[0])
    zero_like = finite & ((amax == 0) | torch.isinf(torch.tensor(127.0) / amax))  # 127 / amax overflows fp32
    assert (s2[zero_like] == 0).all() and (q2[zero_like] == 0).all(), "zero row: scale 0, q 0"
    live = finite & ~zero_like
    if live.any():
        err = (xf[live] - q2[live].double() * s2[live, None]).abs()
        # half a step, plus the fp32 roundings of 127 / amax, x * (127 / amax) and amax / 127
        # (relative 2^-24 each; absolute 2^-150 for a subnormal scale, times |q| <= 127)
        bound = s2[live, None] * (0.5 + 127 * 2.0**-22) + 128 * 2.0**-150
        assert (err <= bound).all(), f"dequantization error {float((err - bound).max())} above half a step"
        # the element of largest magnitude maps to +-127
        top = q2[live].abs().max(-1).values
        assert (top == 127).all(), "the row's amax element does not map to +-127"


test_quantize_per_token_rule, test_quantize_per_token_rule_slow = two_tests(
    _quantize_per_token_rule, fast=300, slow=3000, case=float_cases(), slow_case=float_cases(300, 1100)
)


# ============================================================================ int8_linear (dense)


@dataclasses.dataclass(frozen=True)
class LinearCase:
    x: FloatCase
    n: int
    w_mode: str
    w_edits: tuple  # zero edits also zero the channel's scale (as quantize gives an all-zero channel)
    scale_mode: str
    bias: str  # "none", "normal", "large"
    activation: str | None


SCALE_MODES = ("normal", "with_zeros", "wide")


@st.composite
def linear_cases(draw, m_hi=60, n_hi=80, k_hi=300):
    return LinearCase(
        x=draw(float_cases(m_hi, k_hi)), n=draw(dims_n(n_hi)),
        w_mode=draw(st.sampled_from(INT8_MODES)), w_edits=tuple(draw(int8_edits)),
        scale_mode=draw(st.sampled_from(SCALE_MODES)), bias=draw(st.sampled_from(["none", "normal", "large"])),
        activation=draw(st.sampled_from([None, "gelu"])),
    )  # fmt: skip


def build_linear_weights(c: LinearCase, g: torch.Generator, fmt: str | None = None, density: float = 1.0):
    """(w int8 [N, K], w_scale fp32 [N], bias fp32 [N] or None); w fits fmt when one is given."""
    k, n = c.x.k, c.n
    w = edit_rows(int8_values(c.w_mode, (n, k), g, low=-127), c.w_edits, low=-127)
    if fmt is not None:
        w = sparse_weight(fmt, w, density, g)
    if c.scale_mode == "normal":
        scale = torch.rand(n, generator=g) * 0.02 + 1e-3
    elif c.scale_mode == "with_zeros":
        scale = torch.rand(n, generator=g) * 0.02 * (torch.rand(n, generator=g) < 0.7)
    else:  # products that overflow to Inf or underflow into subnormals
        scale = 10.0 ** (torch.rand(n, generator=g) * 76 - 38)
    for kind, idx in c.w_edits:
        if kind == "zero" and n:
            scale[idx % n] = 0.0
    bias = None
    if c.bias == "normal":
        bias = torch.randn(n, generator=g)
    elif c.bias == "large":
        bias = torch.randn(n, generator=g) * 1e30
    return w, scale, bias


def reference_linear(x, w, scale, bias, activation) -> torch.Tensor:
    """The exact definition of int8_linear (conftest.ref_int8_linear, also for K = 0 and overflow):
    y = act(fma(float(acc), sa[m] * w_scale[n], bias[n])) in fp32 with (q, sa) = quantize_per_token(x)
    and acc the exact int32 product, then cast to x.dtype."""
    n = w.shape[0]
    q, sa = ref_quantize_per_token(rows2d(x))
    acc = int64_ref(q, w).float()
    y = fma_f32(acc, sa[:, None] * scale[None, :], (torch.zeros(n) if bias is None else bias)[None, :])
    if activation is not None:
        y = gelu_f32(y)
    return y.reshape(*x.shape[:-1], n).to(x.dtype)


def check_special_rows(y, x, applied, bias, activation, what):
    """The contract's rows: a NaN/Inf row gives a NaN output row; a zero row gives act(bias)."""
    y2 = rows2d(y)
    x2 = rows2d(x).float()
    for r, _kind in applied:
        if not torch.isfinite(x2[r]).all():
            assert torch.isnan(y2[r]).all(), f"{what}: row {r} of x has NaN/Inf, output row is not all NaN"
        elif torch.isinf(127.0 / x2[r].abs().amax()) and y2.shape[1]:  # a zero row, or one that counts as one
            b = torch.zeros(y2.shape[1]) if bias is None else bias
            want = (gelu_f32(b) if activation else b).to(y.dtype)
            assert_same(y2[r], want, f"{what}: zero row {r} is not the bias-only output")


# The exact reference computes an fp32 fma per element through Python rationals (~5 us each): it
# checks these rows of a case (the edited ones first), never more than this many elements.
EXACT_ELEMENTS = 300


def exact_rows(rows: int, n: int, applied) -> list[int]:
    budget = max(1, EXACT_ELEMENTS // max(n, 1))
    picked = []
    for r in [r for r, _ in applied] + [0, rows - 1, rows // 2]:
        if 0 <= r < rows and r not in picked and len(picked) < budget:
            picked.append(r)
    return picked


def _int8_linear_same_on_every_isa(case: LinearCase):
    """int8_linear: the same bits (NaN-aware) on every ISA, equal to the exact definition on sampled
    rows; NaN rows and zero rows as the contract states."""
    g = torch.Generator().manual_seed(case.x.seed)
    x, applied = build_float(case.x, g)
    w, scale, bias = build_linear_weights(case, g)
    packed = ops.pack_int8_weight(w)
    outs = {}
    for isa in ISAS:
        with running(isa):
            outs[isa] = ops.int8_linear(x, packed, scale, bias, activation=case.activation)
    y = outs[ISAS[0]]
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], case.n)
    for isa, out in outs.items():
        assert_same(out, y, f"int8_linear on {isa} vs {ISAS[0]}")
    check_special_rows(y, x, applied, bias, case.activation, "int8_linear")
    x2, y2 = rows2d(x), rows2d(y)
    rows = exact_rows(x2.shape[0], case.n, applied)
    note(f"exact rows checked: {rows}")
    if rows:
        want = reference_linear(x2[rows], w, scale, bias, case.activation)
        assert_same(y2[rows], want, "int8_linear vs the exact definition")


test_int8_linear_same_on_every_isa, test_int8_linear_same_on_every_isa_slow = two_tests(
    _int8_linear_same_on_every_isa, fast=200, slow=2000, case=linear_cases(), slow_case=linear_cases(150, 150, 700)
)


# ============================================================================ sparse_int8_linear


@st.composite
def sparse_linear_cases(draw, m_hi=60, n_hi=80, k_hi=300):
    """(format, density, LinearCase)."""
    return (
        draw(st.sampled_from(FORMATS_I8)),
        draw(st.sampled_from([0.0, 0.05, 0.3, 0.7, 1.0])),
        draw(linear_cases(m_hi, n_hi, k_hi)),
    )


def _sparse_int8_linear_matches_dense(case):
    """sparse_int8_linear on every kernel table (ISA x VBMI): the bits of the dense int8_linear of
    the same weights (itself checked above)."""
    fmt, density, lc = case
    g = torch.Generator().manual_seed(lc.x.seed)
    x, applied = build_float(lc.x, g)
    w, scale, bias = build_linear_weights(lc, g, fmt, density)
    sparse = ops.pack_sparse(w, fmt)
    with running("ref"):
        dense = ops.int8_linear(x, ops.pack_int8_weight(w), scale, bias, activation=lc.activation)
    for isa, vbmi in VARIANTS:
        with running(isa, vbmi):
            y = ops.sparse_int8_linear(x, sparse, scale, bias, activation=lc.activation)
        assert_same(y, dense, f"sparse_int8_linear {fmt} on {isa} (vbmi={vbmi}) vs dense int8_linear")
        check_special_rows(y, x, applied, bias, lc.activation, f"sparse_int8_linear {fmt} on {isa}")


test_sparse_int8_linear_matches_dense, test_sparse_int8_linear_matches_dense_slow = two_tests(
    _sparse_int8_linear_matches_dense, fast=200, slow=2000, case=sparse_linear_cases(),
    slow_case=sparse_linear_cases(150, 150, 700),
)


# ============================================================================ int32 wrap-around


@dataclasses.dataclass(frozen=True)
class WrapCase:
    fmt: str  # "dense" or a sparse int8 format
    m: int
    k: int
    n: int
    a_mode: str
    w_mode: str
    seed: int
    variant: tuple


@st.composite
def wrap_cases(draw):
    # -128 * -128 * 2^17 = 2^31: K around 2^17 takes the int32 sums past the range (K = 2^17 + 64j + d)
    return WrapCase(
        fmt=draw(st.sampled_from(("dense", *FORMATS_I8))), m=draw(st.integers(1, 7)),
        k=2**17 + 64 * draw(st.integers(-2, 4)) + draw(st.integers(-2, 2)), n=draw(st.integers(1, 40)),
        a_mode=draw(st.sampled_from(["extremes", "min", "max", "uniform"])),
        w_mode=draw(st.sampled_from(["extremes", "min", "max"])), seed=draw(seeds), variant=draw(variants),
    )  # fmt: skip


def _int8_matmul_wraps_mod_2_32(case: WrapCase):
    """K around 2^17 with extreme values: dense and sparse int8 matmuls are exact mod 2^32 (the
    contract beyond K = 2^17), equal to the int64 product wrapped to int32."""
    g = torch.Generator().manual_seed(case.seed)
    a = int8_values(case.a_mode, (case.m, case.k), g)
    w = int8_values(case.w_mode, (case.n, case.k), g)
    if case.fmt != "dense":
        w = sparse_weight(case.fmt, w, 1.0, g)
    want = int64_ref(a, w)
    isa, vbmi = case.variant
    with running(isa, vbmi):
        if case.fmt == "dense":
            got = ops.int8_matmul(a, w)
        else:
            got = ops.sparse_int8_matmul(a, ops.pack_sparse(w, case.fmt), case.n)
    assert_same(got, want, f"{case.fmt} matmul, K={case.k}")


test_int8_matmul_wraps_mod_2_32, test_int8_matmul_wraps_mod_2_32_slow = two_tests(
    _int8_matmul_wraps_mod_2_32, fast=12, slow=200, case=wrap_cases()
)


# ============================================================================ threads


@dataclasses.dataclass(frozen=True)
class ThreadsCase:
    fmt: str
    linear: LinearCase
    a_mode: str
    variant: tuple
    flush_denormal: bool


@st.composite
def threads_cases(draw):
    # Shapes big enough to split: more than 24 rows or 4 channel blocks (GEMM tasks), more than
    # 16384 / K rows (quantization tasks).
    big_m = st.one_of(st.integers(97, 300), st.sampled_from([0, 1, 25, 200]))
    edits = tuple(draw(float_edits))
    if draw(st.booleans()):  # rows with subnormal scales spread over the tasks: what flush-to-zero changes
        edits += tuple(("subnormal_scale", j, j) for j in range(0, 300, 41))
    xcase = FloatCase(
        lead=(draw(big_m),), k=draw(st.one_of(st.integers(1, 400), st.sampled_from([63, 64, 65, 257]))),
        dtype=draw(st.sampled_from(["float32", "bfloat16"])), mode=draw(st.sampled_from(FLOAT_MODES)),
        layout=draw(layouts), edits=edits, seed=draw(seeds),
    )  # fmt: skip
    lc = LinearCase(
        x=xcase, n=draw(st.one_of(st.integers(65, 200), st.sampled_from([1, 17, 64]))),
        w_mode=draw(st.sampled_from(INT8_MODES)), w_edits=tuple(draw(int8_edits)),
        scale_mode=draw(st.sampled_from(SCALE_MODES)), bias=draw(st.sampled_from(["none", "normal"])),
        activation=draw(st.sampled_from([None, "gelu"])),
    )  # fmt: skip
    return ThreadsCase(
        fmt=draw(st.sampled_from(FORMATS_I8)), linear=lc, a_mode=draw(st.sampled_from(INT8_MODES)),
        variant=draw(variants), flush_denormal=draw(st.booleans()),
    )


def _threads_do_not_change_results(case: ThreadsCase):
    """quantize_per_token, int8_matmul_packed, sparse_int8_matmul, int8_linear and sparse_int8_linear:
    the same bits with 1 and 2 threads (with flush-to-zero on, too: workers run with the caller's MXCSR)."""
    lc = case.linear
    g = torch.Generator().manual_seed(lc.x.seed)
    x, _ = build_float(lc.x, g)
    w, scale, bias = build_linear_weights(lc, g, case.fmt, 0.3)
    a = int8_values(case.a_mode, tuple(rows2d(x).shape), g)
    packed, sparse = ops.pack_int8_weight(w), ops.pack_sparse(w, case.fmt)
    isa, vbmi = case.variant
    results = {}
    for threads in (1, 2):
        with running(isa, vbmi, threads=threads, flush_denormal=case.flush_denormal):
            assert _runtime.num_threads() == threads
            results[threads] = (
                *ops.quantize_per_token(x),
                ops.int8_matmul_packed(a, packed, lc.n),
                ops.sparse_int8_matmul(a, sparse, lc.n),
                ops.int8_linear(x, packed, scale, bias, activation=lc.activation),
                ops.sparse_int8_linear(x, sparse, scale, bias, activation=lc.activation),
            )
    names = ("quantize q", "quantize scale", "int8_matmul_packed", "sparse_int8_matmul", "int8_linear",
             "sparse_int8_linear")  # fmt: skip
    for name, one, two in zip(names, results[1], results[2]):
        assert_same(two, one, f"{name}: 2 threads vs 1 on {isa} (vbmi={vbmi}, ftz={case.flush_denormal})")
    # the integer results are also exact
    want = int64_ref(a, w)
    assert_same(results[1][2], want, "int8_matmul_packed vs int64")
    assert_same(results[1][3], want, "sparse_int8_matmul vs int64")


test_threads_do_not_change_results, test_threads_do_not_change_results_slow = two_tests(
    _threads_do_not_change_results, fast=40, slow=1000, case=threads_cases()
)


# ============================================================================ the profile


def test_default_profile_is_reproducible():
    """Unless another profile was chosen, the run draws the same examples every time (CI
    reproducibility), writes no example database and prints a failure's reproduction blob."""
    if settings.get_current_profile_name() != "fastinfer-ci":
        pytest.skip(f"hypothesis profile {settings.get_current_profile_name()!r} was chosen")
    assert settings.default.derandomize and settings.default.print_blob and settings.default.database is None
    assert settings.default.deadline is None  # timings on a shared 2-core machine are no signal
