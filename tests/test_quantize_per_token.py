"""quantize_per_token: bit-exact against the torch fp32 definition (see conftest.ref_quantize_per_token)
for float32 and bfloat16, on every ISA: odd K, rounding ties, zero/NaN/Inf/subnormal rows, N-D,
empty and strided inputs."""

from __future__ import annotations

import itertools

import pytest
import torch

import fastinfer
from conftest import ISAS, assert_same, ref_quantize_per_token
from fastinfer import ops

DTYPES = [torch.float32, torch.bfloat16]
KS = (1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 255, 256, 257, 1000, 4097)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _check(x: torch.Tensor, msg: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    x_before = x.clone()
    q, s = ops.quantize_per_token(x)
    rq, rs = ref_quantize_per_token(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert q.shape == x.shape and s.shape == x.shape[:-1]
    assert_same(s, rs, f"{msg} scale")
    assert_same(q, rq, f"{msg} q")
    assert_same(x, x_before, f"{msg} input modified")
    return q, s


def _distributions(m: int, k: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    n = torch.randn(m, k, generator=g)
    u = torch.rand(m, k, generator=g)
    outlier = n.clone()
    outlier[:, k // 2] = 80.0
    one_hot = torch.zeros(m, k)
    one_hot[:, (k - 1) // 3] = -3.25
    return {
        "normal": n,
        "uniform_pos": u,
        "negative": -u - 0.1,
        "heavy_tail": n**3,
        "outlier": outlier,
        "large": n * 1e30,
        "small": n * 1e-30,
        "constant": torch.full((m, k), 0.7),
        "one_nonzero": one_hot,
        "mixed_scales": n * torch.logspace(-20, 20, m).unsqueeze(1),
        "integers": torch.randint(-300, 300, (m, k), generator=g).float(),
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_matches_reference(isa, dtype):
    g = _gen(1)
    for k in KS:
        for name, x in _distributions(5, k, g).items():
            _check(x.to(dtype), f"[{isa}] {dtype} K={k} {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("m,k", [(20000, 3), (3000, 17), (700, 100), (1, 70000), (64, 16384)])
def test_many_rows_split_over_tasks(isa, dtype, m, k):
    """Row counts that span several work items of the thread pool (16384 / K rows each)."""
    x = torch.randn(m, k, generator=_gen(m + k)).to(dtype)
    _check(x, f"[{isa}] {dtype} {m}x{k}")


def _tie_rows(amaxes, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose first element is amax and whose other elements x satisfy fl32(x * fl32(127/amax))
    == j + 0.5 exactly. Returns (rows [R, 64] float32, mask of the tie elements)."""
    rows, masks = [], []
    for amax in amaxes:
        amax = torch.tensor(amax, dtype=torch.float32)
        inv = torch.tensor(127.0, dtype=torch.float32) / amax
        j = torch.randint(-127, 127, (4000,), generator=g).float() + 0.5
        x0 = (j.double() / inv.double()).float()
        found = []
        for d in range(-4, 5):
            x = x0
            step = torch.full_like(x0, float("inf") if d > 0 else float("-inf"))
            for _ in range(abs(d)):
                x = torch.nextafter(x, step)
            hit = (x * inv == j) & (x.abs() <= amax)
            found.append(x[hit])
        ties = torch.cat(found)[:63]
        row = torch.cat([amax.reshape(1), ties])
        row = torch.nn.functional.pad(row, (0, 64 - row.numel()), value=0.25 * float(amax))
        mask = torch.zeros(64, dtype=torch.bool)
        mask[1 : 1 + ties.numel()] = True
        rows.append(row)
        masks.append(mask)
    return torch.stack(rows), torch.stack(masks)


def test_rounding_ties_half_to_even(isa):
    # amax 127 makes 127/amax exactly 1, so x = j + 0.5 are exact ties.
    simple = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5, 3.5, 4.5, 5.5])
    q, s = _check(simple, f"[{isa}] simple ties")
    assert q.tolist() == [127, 0, 2, 2, 0, -2, -2, 126, -126, 4, 4, 6]
    assert s.item() == 1.0
    # amax 254 -> 127/amax = 0.5 exactly: odd integers are ties
    odd = torch.tensor([[254.0, 1, 3, 5, 7, -1, -3, -5, 253, -253] + [9.0] * 7])
    q, _ = _check(odd, f"[{isa}] odd/2 ties")
    assert q[0].tolist() == [127, 0, 2, 2, 4, 0, -2, -2, 126, -126] + [4] * 7
    _check(odd.bfloat16(), f"[{isa}] bf16 ties")


def test_rounding_ties_of_the_fp32_product(isa):
    """Ties of the fp32 product x * fl(127/amax) (not of the exact value), at every lane position,
    including ones where fp64 arithmetic or x / scale would round the other way."""
    rows, masks = _tie_rows([1.0, 3.7, 0.0123, 9.1e4, 2.2e-20, 5.5e20, 77.7], _gen(2))
    assert masks.sum() > 100
    q, s = _check(rows, f"[{isa}] fp32-product ties")
    assert (q[masks].long() % 2 == 0).all(), "half-way products must round to even"
    # the data really separates the definition from its near misses:
    inv = 127.0 / rows.abs().amax(-1, keepdim=True)
    exact = rows.double() * inv.double()
    assert (masks & (exact * 2 != torch.round(exact * 2))).any(), "no tie that only fp32 creates"
    by_division = torch.round(rows / s.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    assert (by_division != q)[masks].any(), "x / scale would differ from x * (127 / amax) here"
    # tails: the same values at K % 16 != 0, shifted so that ties fall into the scalar/masked tail
    for k in (17, 33, 47, 63):
        _check(rows[:, :k].contiguous(), f"[{isa}] ties K={k}")
        _check(rows.roll(-1, dims=1)[:, -k:].contiguous(), f"[{isa}] ties tail K={k}")


def test_clamp_at_127(isa):
    """x * (127 / amax) can exceed 127 by an ulp for the amax element; q must stay within [-127, 127]."""
    g = _gen(3)
    amax = torch.rand(2000, generator=g) * 10 + 1e-3
    x = torch.stack([amax, -amax, amax * 0.5], dim=1)
    q, s = _check(x, f"[{isa}] clamp")
    assert q[:, 0].eq(127).all() and q[:, 1].eq(-127).all()
    assert q.min() >= -127


# ------------------------------------------------------------------------------- special rows


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_zero_rows(isa, dtype):
    x = torch.randn(6, 37, generator=_gen(4))
    x[1] = 0.0
    x[4] = -0.0
    x = x.to(dtype)
    q, s = _check(x, f"[{isa}] zero rows")
    assert s[1] == 0 and s[4] == 0
    assert (q[1] == 0).all() and (q[4] == 0).all()
    assert (s[[0, 2, 3, 5]] > 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("k", [1, 5, 16, 17, 40, 64, 100])
def test_nan_and_inf_rows(isa, dtype, k):
    nan, inf = float("nan"), float("inf")
    positions = sorted({0, k // 2, k - 1, max(0, k - 3)})
    rows = []
    for p, bad in itertools.product(positions, (nan, inf, -inf)):
        r = torch.randn(k, generator=_gen(p))
        r[p] = bad
        rows.append(r)
    both = torch.randn(k, generator=_gen(99))
    both[0], both[-1] = inf, nan
    good = torch.randn(3, k, generator=_gen(98))
    x = torch.cat([good[:1], torch.stack(rows), good[1:2], both.unsqueeze(0), good[2:]]).to(dtype)
    q, s = _check(x, f"[{isa}] {dtype} K={k}")
    bad_rows = torch.arange(1, 1 + len(rows)).tolist() + [len(rows) + 2]
    good_rows = [0, len(rows) + 1, len(rows) + 3]
    assert torch.isnan(s[bad_rows]).all()
    assert (q[bad_rows] == 0).all()
    assert torch.isfinite(s[good_rows]).all() and (s[good_rows] > 0).all()
    # the good rows are what they would be on their own
    q_good, s_good = ops.quantize_per_token(good.to(dtype))
    assert torch.equal(q[good_rows], q_good) and torch.equal(s[good_rows], s_good)


def test_subnormal_and_tiny_rows(isa):
    """amax so small that 127 / amax overflows to Inf: scale 0 and q 0 (the row counts as zero).
    amax slightly larger: 127 / amax is finite, the scale is subnormal and must not be flushed."""
    tiny = 2.0**-130  # subnormal
    x = torch.tensor(
        [
            [tiny, 0.0, -tiny / 2, tiny / 4],
            # 127 / 2**-120 is finite; scale = 2**-120 / 127 is subnormal
            [2.0**-120, -(2.0**-121), 2.0**-122, 0.0],
            # 127 / 2**-122 > FLT_MAX: counts as a zero row
            [2.0**-122, 2.0**-123, 0.0, -(2.0**-122)],
            [1.0, 2.0, 3.0, 4.0],
        ],
        dtype=torch.float32,
    )
    q, s = _check(x, f"[{isa}] tiny rows")
    assert s[0] == 0 and (q[0] == 0).all()
    assert s[2] == 0 and (q[2] == 0).all()
    assert 0 < s[1] < torch.finfo(torch.float32).tiny, "subnormal scale expected (flush-to-zero?)"
    assert q[1].tolist() == [127, -64, 32, 0]


def test_largest_finite_values(isa):
    fmax = torch.finfo(torch.float32).max
    x = torch.tensor([[fmax, -fmax, fmax / 2, 1.0], [fmax, fmax, fmax, fmax]])
    q, s = _check(x, f"[{isa}] float max")
    assert torch.isfinite(s).all()
    assert q[0, :2].tolist() == [127, -127] and q[1].eq(127).all()
    bmax = torch.finfo(torch.bfloat16).max
    _check(torch.tensor([[bmax, -bmax, 1.0, 0.0]], dtype=torch.bfloat16), f"[{isa}] bf16 max")


# --------------------------------------------------------------------------------- shapes & layout


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", [(3, 4, 17), (2, 3, 5, 33), (1, 1, 64), (4, 1, 9)])
def test_nd_inputs(isa, dtype, shape):
    x = torch.randn(shape, generator=_gen(5)).to(dtype)
    q, s = _check(x, f"[{isa}] {shape}")
    q2, s2 = ops.quantize_per_token(x.reshape(-1, shape[-1]))
    assert torch.equal(q, q2.reshape(shape)) and torch.equal(s, s2.reshape(shape[:-1]))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_1d_input_gives_scalar_scale(isa, dtype):
    x = torch.tensor([0.5, -2.0, 1.0, 0.25]).to(dtype)
    q, s = _check(x, f"[{isa}] 1-D")
    assert s.dim() == 0 and s.item() == pytest.approx(2.0 / 127, rel=1e-7)
    assert q.tolist() == [32, -127, 64, 16]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", [(0, 8), (5, 0), (0, 0), (2, 0, 5), (3, 4, 0), (0,)])
def test_empty_inputs(isa, dtype, shape):
    x = torch.empty(shape, dtype=dtype)
    q, s = ops.quantize_per_token(x)
    assert q.shape == x.shape and q.dtype == torch.int8
    assert s.shape == x.shape[:-1] and s.dtype == torch.float32
    assert (s == 0).all(), "rows with K = 0 have scale 0"


def _views(dtype, g: torch.Generator) -> dict[str, torch.Tensor]:
    big = torch.randn(40, 300, generator=g).to(dtype)
    return {
        "transposed": torch.randn(70, 12, generator=g).to(dtype).T,
        "row_stride": big[:9, 3:70],
        "col_step": big[:9, ::3],
        "row_step": big[::4, :65],
        "expanded": torch.randn(1, 33, generator=g).to(dtype).expand(6, 33),
        "permuted_3d": torch.randn(17, 4, 3, generator=g).to(dtype).permute(2, 1, 0),
        "offset": big.flatten()[7 : 7 + 11 * 23].view(11, 23),
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_noncontiguous_inputs(isa, dtype):
    for name, v in _views(dtype, _gen(6)).items():
        assert v.dtype == dtype
        if name != "offset":
            assert not v.is_contiguous(), name
        q, s = _check(v, f"[{isa}] {name} {dtype}")
        q2, s2 = ops.quantize_per_token(v.contiguous())
        assert torch.equal(q, q2) and torch.equal(s, s2), name


def test_single_row_with_row_stride_smaller_than_k(isa):
    """torch calls a (1, K) tensor with strides (1, 1) contiguous (e.g. a column's .T); it must work."""
    for k in (2, 16, 100):
        x = torch.randn(k, 1, generator=_gen(k)).T
        assert x.is_contiguous() and x.stride(0) < k
        _check(x, f"[{isa}] K={k} strides {x.stride()}")


# ----------------------------------------------------------------------------------- across ISAs


def test_identical_on_every_isa():
    g = _gen(7)
    inputs = []
    for k in (1, 7, 16, 33, 100, 1025):
        x = torch.randn(9, k, generator=g) * torch.logspace(-3, 3, 9).unsqueeze(1)
        x[2] = 0
        x[5, k // 2] = float("nan")
        x[7, 0] = float("inf")
        inputs += [x, x.bfloat16()]
    inputs.append(_tie_rows([3.7, 0.0123], g)[0])
    results = {}
    for name in ISAS:
        fastinfer.set_isa(name)
        results[name] = [ops.quantize_per_token(x) for x in inputs]
    base = ISAS[0]
    for name in ISAS[1:]:
        for i, ((q0, s0), (q1, s1)) in enumerate(zip(results[base], results[name])):
            assert_same(q1, q0, f"{name} vs {base} input {i} q")
            assert_same(s1, s0, f"{name} vs {base} input {i} scale")


def test_bf16_equals_fp32_of_same_values(isa):
    x = torch.randn(13, 77, generator=_gen(8)).bfloat16()
    q16, s16 = ops.quantize_per_token(x)
    q32, s32 = ops.quantize_per_token(x.float())
    assert torch.equal(q16, q32) and torch.equal(s16, s32)


def test_dequantization_error_bounded(isa):
    x = torch.randn(50, 300, generator=_gen(9))
    q, s = ops.quantize_per_token(x)
    err = (q.float() * s.unsqueeze(-1) - x).abs()
    assert (err <= s.unsqueeze(-1) * 0.5001 + 1e-12).all()
