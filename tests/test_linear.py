"""Int8Linear and ops.int8_linear: accuracy against nn.Linear, the exact fp32 epilogue, special rows,
bit-identical outputs across ISAs, state_dict round trips and input validation."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import fastinfer
from conftest import ISAS, assert_same, ref_int8_linear, sqnr
from fastinfer import ops
from fastinfer.nn import Int8Linear, quantize_weight_per_channel


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _linear(k: int, n: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias).eval()


SHAPES = [(64, 32, 8), (256, 512, 16), (1000, 300, 7), (17, 5, 3), (4096, 64, 2), (768, 3072, 1)]


# ---------------------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("k,n,m", SHAPES, ids=[f"K{k}-N{n}-M{m}" for k, n, m in SHAPES])
def test_sqnr_fp32_gaussian(isa, k, n, m):
    lin = _linear(k, n, seed=k + n)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(m, k, generator=_gen(m))
    with torch.no_grad():
        ref = lin(x)
    out = q(x)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    assert sqnr(ref, out) >= 35.0, f"[{isa}] SQNR {sqnr(ref, out):.1f} dB"


@pytest.mark.parametrize("k,n,m", SHAPES[:4], ids=[f"K{k}-N{n}-M{m}" for k, n, m in SHAPES[:4]])
def test_sqnr_gaussian_weights(isa, k, n, m):
    """Gaussian (not uniform) weights have larger max/std ratios: still >= 35 dB."""
    lin = _linear(k, n, seed=3)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02, generator=_gen(4))
        lin.bias.normal_(0, 0.02, generator=_gen(5))
    x = torch.randn(m, k, generator=_gen(6))
    with torch.no_grad():
        ref = lin(x)
    assert sqnr(ref, Int8Linear.from_linear(lin)(x)) >= 35.0


def test_3d_and_4d_inputs_match_flattened(isa):
    lin = _linear(96, 40)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(3, 5, 96, generator=_gen(7))
    out = q(x)
    assert out.shape == (3, 5, 40)
    assert torch.equal(out, q(x.reshape(15, 96)).reshape(3, 5, 40))
    x4 = torch.randn(2, 3, 4, 96, generator=_gen(8))
    assert torch.equal(q(x4), q(x4.reshape(-1, 96)).reshape(2, 3, 4, 40))
    with torch.no_grad():
        assert sqnr(lin(x), out) >= 35.0


def test_rows_are_independent(isa):
    """Per-token quantization: a row's output does not depend on the other rows of the batch."""
    q = Int8Linear.from_linear(_linear(130, 70))
    x = torch.randn(29, 130, generator=_gen(9))
    x[5] *= 1000
    full = q(x)
    for i in (0, 5, 6, 28):
        assert torch.equal(full[i : i + 1], q(x[i : i + 1]))
    assert torch.equal(full[3:20], q(x[3:20]))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_bf16_inputs(isa, bias):
    lin = _linear(256, 128, bias=bias)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(4, 7, 256, generator=_gen(10)).bfloat16()
    out = q(x)
    assert out.dtype == torch.bfloat16 and out.shape == (4, 7, 128)
    with torch.no_grad():
        ref = lin(x.float())
    assert sqnr(ref, out.float()) >= 30.0
    # bf16 inputs convert to fp32 exactly, and the epilogue runs in fp32: the bf16 output is the
    # round-to-nearest-even bf16 of the fp32 output for the same values.
    assert torch.equal(out, q(x.float()).bfloat16())


def test_matches_exact_definition(isa):
    """y = fma(float(acc), sa[m] * sw[n], bias[n]) in fp32 with exact int32 acc, for every element."""
    lin = _linear(77, 21)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(9, 77, generator=_gen(11)) * torch.logspace(-2, 2, 9).unsqueeze(1)
    x[4] = 0
    ref = ref_int8_linear(x, q.weight_int8, q.weight_scale, q.bias)
    assert_same(q(x), ref, f"[{isa}] fp32")
    xb = x.bfloat16()
    assert_same(q(xb), ref_int8_linear(xb, q.weight_int8, q.weight_scale, q.bias), f"[{isa}] bf16")
    q_nb = Int8Linear.from_linear(_linear(77, 21, bias=False))
    assert_same(q_nb(x), ref_int8_linear(x, q_nb.weight_int8, q_nb.weight_scale, None), f"[{isa}] no bias")


def test_functional_op_matches_module(isa):
    lin = _linear(50, 30)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(6, 50, generator=_gen(12))
    assert torch.equal(ops.int8_linear(x, q.packed_weight, q.weight_scale, q.bias), q(x))
    assert torch.equal(torch.ops.fastinfer.int8_linear(x, q.packed_weight, q.weight_scale, q.bias), q(x))
    # non-contiguous scale / bias views are read correctly
    ws = torch.stack([q.weight_scale, torch.full_like(q.weight_scale, 9.0)], 1)[:, 0]
    b = torch.stack([q.bias, torch.full_like(q.bias, 9.0)], 1)[:, 0]
    assert not ws.is_contiguous() and not b.is_contiguous()
    assert torch.equal(ops.int8_linear(x, q.packed_weight, ws, b), q(x))


# ------------------------------------------------------------------------------------ special rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_zero_row_gives_bias_exactly(isa, dtype):
    lin = _linear(40, 33)
    with torch.no_grad():
        lin.bias.normal_(generator=_gen(13))
    q = Int8Linear.from_linear(lin)
    x = torch.randn(4, 40, generator=_gen(14))
    x[2] = 0
    out = q(x.to(dtype))
    assert torch.equal(out[2], lin.bias.detach().to(dtype))
    q_nb = Int8Linear.from_linear(_linear(40, 33, bias=False))
    out_nb = q_nb(x.to(dtype))
    assert (out_nb[2] == 0).all() and (out_nb[[0, 1, 3]] != 0).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_nan_or_inf_row_gives_nan_row(isa, dtype, bad):
    q = Int8Linear.from_linear(_linear(70, 20))
    x = torch.randn(5, 70, generator=_gen(15))
    x[1, 33] = bad
    x[3, 69] = bad
    x = x.to(dtype)
    out = q(x)
    assert torch.isnan(out[[1, 3]]).all()
    good = [0, 2, 4]
    assert torch.isfinite(out[good]).all()
    assert torch.equal(out[good], q(x[good]))


def test_zero_weight_rows_and_zero_inputs(isa):
    lin = _linear(32, 20)
    with torch.no_grad():
        lin.weight[[0, 7, 19]] = 0
    q = Int8Linear.from_linear(lin)
    assert (q.weight_scale[[0, 7, 19]] == 0).all()
    x = torch.randn(3, 32, generator=_gen(16))
    out = q(x)
    assert torch.equal(out[:, [0, 7, 19]], lin.bias.detach()[[0, 7, 19]].expand(3, 3))
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------------------------ across ISAs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_output_bit_identical_across_isas(dtype):
    cases = []
    for k, n, m, bias in [(64, 32, 8, True), (100, 70, 13, False), (257, 129, 30, True), (1, 17, 5, True), (4096, 48, 3, True)]:
        q = Int8Linear.from_linear(_linear(k, n, bias=bias, seed=k))
        x = torch.randn(m, k, generator=_gen(k + m)) * torch.logspace(-3, 3, m).unsqueeze(1)
        x[m // 2] = 0
        if m > 3:
            x[1, k // 2] = float("nan")
        cases.append((q, x.to(dtype)))
    outs = {}
    for name in ISAS:
        fastinfer.set_isa(name)
        outs[name] = [q(x) for q, x in cases]
    for name in ISAS[1:]:
        for i, (a, b) in enumerate(zip(outs[ISAS[0]], outs[name])):
            assert_same(b, a, f"{name} vs {ISAS[0]} case {i}")
    for i, (q, x) in enumerate(cases):  # and the plain torch.equal on the NaN-free rows
        rows = torch.isfinite(outs[ISAS[0]][i]).all(-1)
        for name in ISAS[1:]:
            assert torch.equal(outs[name][i][rows], outs[ISAS[0]][i][rows])


def test_fp32_output_bit_identical_across_isas_large():
    q = Int8Linear.from_linear(_linear(1024, 1000, seed=1))
    x = torch.randn(150, 1024, generator=_gen(17))
    outs = []
    for name in ISAS:
        fastinfer.set_isa(name)
        outs.append(q(x))
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


def test_result_independent_of_thread_count(isa):
    q = Int8Linear.from_linear(_linear(300, 200))
    x = torch.randn(120, 300, generator=_gen(18))
    base = q(x)
    for t in (1, 3):
        fastinfer.set_num_threads(t)
        assert torch.equal(q(x), base)


# ------------------------------------------------------------------------------- module contract


def test_from_linear_weights_and_scales():
    lin = _linear(45, 13)
    q = Int8Linear.from_linear(lin)
    assert (q.in_features, q.out_features) == (45, 13)
    wq, ws = quantize_weight_per_channel(lin.weight)
    assert torch.equal(q.weight_int8, wq)
    assert torch.equal(q.weight_scale, ws)
    assert q.weight_int8.abs().max() <= 127
    assert (q.weight_int8.abs().amax(1) == 127).all()
    w = lin.weight.detach()
    assert torch.equal(ws, w.abs().amax(1) / 127)
    assert ((q.dequantized_weight() - w).abs() <= ws[:, None] * 0.5001).all()
    assert torch.equal(q.bias, lin.bias.detach())
    assert q.bias.dtype == torch.float32
    # the float module is untouched and shares no storage
    assert q.bias.data_ptr() != lin.bias.data_ptr()
    assert not any(p.requires_grad for p in q.buffers())
    assert list(q.parameters()) == []


def test_from_bf16_linear():
    lin = _linear(64, 16).bfloat16()
    q = Int8Linear.from_linear(lin)
    assert q.weight_scale.dtype == torch.float32 and q.bias.dtype == torch.float32
    x = torch.randn(5, 64, generator=_gen(19)).bfloat16()
    with torch.no_grad():
        ref = lin.float()(x.float())
    assert sqnr(ref, q(x).float()) >= 30.0


@pytest.mark.parametrize("bias", [True, False])
def test_extra_repr(isa, bias):
    q = Int8Linear.from_linear(_linear(24, 12, bias=bias))
    text = repr(q)
    assert text.startswith("Int8Linear(")
    assert "in_features=24" in text and "out_features=12" in text
    assert f"bias={bias}" in text
    assert f"kernel={isa}" in text
    assert "int8" in text


@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_round_trip(isa, bias):
    q = Int8Linear.from_linear(_linear(70, 33, bias=bias))
    sd = q.state_dict()
    # the portable form only: the packed layout is this machine's cache, not state
    assert set(sd) == {"weight_int8", "weight_scale"} | ({"bias"} if bias else set())
    assert sd["weight_int8"].dtype == torch.int8 and torch.equal(sd["weight_int8"], q.weight_int8)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    fresh = Int8Linear(70, 33, bias=bias)
    x = torch.randn(6, 70, generator=_gen(20))
    assert not torch.equal(fresh(x), q(x))  # a fresh layer has zero weights
    fresh.load_state_dict(loaded)
    assert torch.equal(fresh(x), q(x))
    assert torch.equal(fresh.weight_int8, q.weight_int8)
    assert torch.equal(fresh.dequantized_weight(), q.dequantized_weight())


def test_state_dict_shape_mismatch_raises():
    q = Int8Linear.from_linear(_linear(70, 33))
    with pytest.raises(RuntimeError, match=r"weight_int8: holds torch.int8 \[33, 70\], this layer needs int8 \[34, 70\]"):
        Int8Linear(70, 34).load_state_dict(q.state_dict())
    sd = q.state_dict()
    sd["weight_int8"] = sd["weight_int8"].float()
    with pytest.raises(RuntimeError, match=r"weight_int8: holds torch.float32 \[33, 70\], this layer needs int8"):
        Int8Linear(70, 33).load_state_dict(sd)


def _legacy_state_dict(q: Int8Linear) -> dict:
    """What state format 1 wrote: the CPU packed layout under "packed_weight"."""
    sd = {"packed_weight": q.packed_weight.clone(), "weight_scale": q.weight_scale.clone()}
    if q.bias is not None:
        sd["bias"] = q.bias.clone()
    return sd


def test_state_format_1_still_loads(isa):
    q = Int8Linear.from_linear(_linear(70, 33))
    fresh = Int8Linear(70, 33)
    fresh.load_state_dict(_legacy_state_dict(q))  # strict: packed_weight is a known key
    x = torch.randn(5, 70, generator=_gen(24))
    assert torch.equal(fresh(x), q(x))
    assert torch.equal(fresh.weight_int8, q.weight_int8)
    assert set(fresh.state_dict()) == {"weight_int8", "weight_scale", "bias"}  # re-saved in format 2


def test_state_dict_missing_weight_is_named():
    sd = Int8Linear.from_linear(_linear(70, 33)).state_dict()
    del sd["weight_int8"]
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "weight_int8"'):
        Int8Linear(70, 33).load_state_dict(sd)
    fresh = Int8Linear(70, 33)
    result = fresh.load_state_dict(sd, strict=False)
    assert result.missing_keys == ["weight_int8"] and result.unexpected_keys == []


def test_state_dict_on_meta_and_assign():
    q = Int8Linear.from_linear(_linear(70, 33))
    with torch.device("meta"):
        skeleton = Int8Linear(70, 33)
    assert set(skeleton.state_dict()) == {"weight_int8", "weight_scale", "bias"}
    skeleton.load_state_dict(q.state_dict(), assign=True)
    assert skeleton.packed_weight.device.type == "cpu"
    x = torch.randn(5, 70, generator=_gen(25))
    assert torch.equal(skeleton(x), q(x))


def test_whole_model_save_load(tmp_path):
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    qm = fastinfer.quantize(model)
    path = tmp_path / "q.pt"
    torch.save(qm.state_dict(), path)
    qm2 = fastinfer.quantize(nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5)))
    qm2.load_state_dict(torch.load(path, weights_only=True))
    x = torch.randn(4, 20, generator=_gen(21))
    assert torch.equal(qm2(x), qm(x))


def test_set_weight():
    q = Int8Linear(8, 4)
    w = torch.randint(-127, 128, (4, 8), dtype=torch.int8, generator=_gen(22))
    s = torch.tensor([0.1, 0.2, 0.0, 1.0])
    q.set_weight(w, s)
    assert torch.equal(q.weight_int8, w) and torch.equal(q.weight_scale, s)
    x = torch.randn(3, 8, generator=_gen(23))
    assert_same(q(x), ref_int8_linear(x, w, s, q.bias))
    with pytest.raises(ValueError, match="int8"):
        q.set_weight(w.float(), s)
    with pytest.raises(ValueError):
        q.set_weight(w[:3], s)
    with pytest.raises(ValueError, match="scale"):
        q.set_weight(w, s[:3])


def test_inference_mode_and_no_grad():
    q = Int8Linear.from_linear(_linear(16, 8))
    x = torch.randn(2, 16, generator=_gen(24))
    ref = q(x)
    with torch.inference_mode():
        assert torch.equal(q(x), ref)
    with torch.no_grad():
        assert torch.equal(q(x), ref)


def test_zero_size_layers_and_batches(isa):
    q = Int8Linear.from_linear(_linear(16, 8))
    assert q(torch.randn(0, 16)).shape == (0, 8)
    assert q(torch.randn(2, 0, 16)).shape == (2, 0, 8)
    empty_out = Int8Linear(16, 0)
    assert empty_out(torch.randn(3, 16)).shape == (3, 0)
    empty_in = Int8Linear(0, 5)
    empty_in.bias.copy_(torch.arange(5.0))
    out = empty_in(torch.randn(3, 0))
    assert out.shape == (3, 5)
    assert torch.equal(out, empty_in.bias.expand(3, 5))
    for n_in, n_out in ((0, 5), (5, 0), (0, 0)):
        lin = nn.Linear(n_in, n_out)
        with torch.no_grad():
            lin.bias.copy_(torch.arange(float(n_out)))
        q = Int8Linear.from_linear(lin)
        x = torch.randn(2, n_in)
        out = q(x)
        assert out.shape == (2, n_out)
        assert torch.equal(out, lin(x).detach())  # K=0: bias only; N=0: empty


def test_single_row_with_row_stride_smaller_than_k(isa):
    """x of shape (1, K) with strides (1, 1) (a column's .T) is a valid contiguous tensor."""
    q = Int8Linear.from_linear(_linear(64, 8))
    x = torch.randn(64, 1, generator=_gen(25)).T
    assert x.is_contiguous() and x.stride() == (1, 1)
    x_plain = x.flatten().unsqueeze(0)
    assert x_plain.stride() == (64, 1)
    assert torch.equal(q(x), q(x_plain))


def test_module_dtype_cast_keeps_layer_usable():
    """model.bfloat16() / .to(dtype) after quantize() must not break the int8 layers: their scale and
    bias buffers are fp32 by contract, so a float cast must either leave them alone or still work."""
    qm = fastinfer.quantize(nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)))
    x = torch.randn(3, 32, generator=_gen(26)).bfloat16()
    ref = qm(x)
    qm = qm.bfloat16()
    out = qm(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ref)


# ------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "make_x,exc,match",
    [
        (lambda: torch.randn(3, 15), ValueError, "last dim must be 16"),
        (lambda: torch.randn(16, 3), ValueError, "last dim"),
        (lambda: torch.tensor(1.0), ValueError, "shape"),
        (lambda: torch.randn(3, 16).half(), TypeError, "float32 and bfloat16"),
        (lambda: torch.randn(3, 16).double(), TypeError, "float32 and bfloat16"),
        (lambda: torch.ones(3, 16, dtype=torch.int8), TypeError, "float32 and bfloat16"),
        (lambda: torch.ones(3, 16, dtype=torch.int32), TypeError, "float32 and bfloat16"),
        (lambda: torch.ones(3, 16, dtype=torch.complex64), TypeError, "float32 and bfloat16"),
        (lambda: [[0.0] * 16], TypeError, "tensor"),
        (lambda: None, TypeError, "tensor"),
    ],
)
def test_forward_rejects_bad_input(make_x, exc, match):
    q = Int8Linear.from_linear(_linear(16, 8))
    with pytest.raises(exc, match=match):
        q(make_x())


@pytest.mark.parametrize(
    "module",
    [nn.Conv1d(3, 4, 1), nn.Bilinear(3, 3, 2), nn.Sequential(nn.Linear(3, 3)), nn.Identity(), "linear", None],
    ids=["conv1d", "bilinear", "sequential", "identity", "str", "none"],
)
def test_from_linear_rejects_non_linear(module):
    with pytest.raises(TypeError, match="nn.Linear"):
        Int8Linear.from_linear(module)


def test_from_linear_rejects_non_finite_weights():
    lin = _linear(8, 4)
    with torch.no_grad():
        lin.weight[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        Int8Linear.from_linear(lin)


@pytest.mark.parametrize("args", [(-1, 3), (3, -1), (2.5, 3), (3, True), ("3", 3)])
def test_constructor_rejects_bad_sizes(args):
    with pytest.raises(ValueError, match="non-negative int"):
        Int8Linear(*args)


def test_int8_linear_op_rejects_bad_params():
    q = Int8Linear.from_linear(_linear(16, 8))
    x = torch.randn(2, 16)
    p, s, b = q.packed_weight, q.weight_scale, q.bias
    cases = [
        ((x.int(), p, s, b), TypeError, "float32 or bfloat16"),
        ((x, p, s.double(), b), TypeError, "w_scale"),
        ((x, p, s[None], b), TypeError, "w_scale"),
        ((x, p, s, b[:7]), TypeError, "bias"),
        ((x, p, s, b.bfloat16()), TypeError, "bias"),
        ((x, p.to(torch.int8), s, b), TypeError, "packed"),
        ((x, p[None], s, b), TypeError, "packed"),
        ((x[:, :15], p, s, b), ValueError, "K=15"),
        ((x, p, s[:7], b[:7]), ValueError, "packed weight is"),
        ((torch.tensor(1.0), p, s, b), ValueError, "at least 1 dimension"),
        (("x", p, s, b), TypeError, "torch.Tensor"),
    ]
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            ops.int8_linear(*args)
