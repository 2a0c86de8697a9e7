"""Weight-only int8 (W8A32): fastinfer.ops.weight_only_linear and fastinfer.nn.WeightOnlyInt8Linear,
what QuantConfig(activations="none") builds. Its definition: acc = fma(x[k], float(W[n, k]), acc)
from +0 over k in order, then act(fma(acc, w_scale[n], bias[n])), in fp32 (a bf16 x widened
exactly) -- checked exactly on small shapes, bit for bit across ISAs on larger ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastinfer
from conftest import ISAS, assert_same, fma_f32, sqnr
from fastinfer import QuantConfig, ops
from fastinfer.nn import Int8Linear, SparseInt8Linear, WeightOnlyInt8Linear


def _weights(n, k, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)  # -128 too: the kernels must take it
    scale = torch.rand(n, generator=g) * 0.02 + 1e-3
    return w, scale, (torch.randn(n, generator=g) if bias else None)


def ref_weight_only(x, w, scale, bias):
    """The definition, with every fma rounded once (conftest.fma_f32, exact rationals)."""
    xf = x.float().reshape(-1, x.shape[-1])
    acc = torch.zeros(xf.shape[0], w.shape[0])
    for i in range(w.shape[1]):
        acc = fma_f32(xf[:, i : i + 1], w[:, i].float()[None, :], acc)
    b = bias if bias is not None else torch.zeros(w.shape[0])
    y = fma_f32(acc, scale[None, :], b[None, :])
    return y.reshape(*x.shape[:-1], w.shape[0]).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m,k,n,bias", [(1, 5, 3, True), (2, 9, 17, False), (3, 12, 33, True), (5, 7, 16, True)])
def test_exact_definition_on_every_isa(isa, dtype, m, k, n, bias):
    w, scale, b = _weights(n, k, seed=m * 100 + k, bias=bias)
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(k)) * 4).to(dtype)
    got = ops.weight_only_linear(x, ops.pack_int8_weight(w), scale, b)
    assert_same(got, ref_weight_only(x, w, scale, b), f"{isa} {dtype}")


@pytest.mark.parametrize("act", [None, "gelu", "relu", "relu6", "silu", "hardswish", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m,k,n", [(1, 4096, 40), (1, 130, 300), (4, 77, 129), (7, 256, 64), (30, 67, 50)])
def test_bit_identical_on_every_isa_and_close_to_float(act, dtype, m, k, n):
    w, scale, b = _weights(n, k, seed=m + k + n)
    packed = ops.pack_int8_weight(w)
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(n)) * 2).to(dtype)
    outs = {}
    for name in ISAS:
        fastinfer.set_isa(name)
        outs[name] = ops.weight_only_linear(x, packed, scale, b, activation=act)
    for name, y in outs.items():
        assert_same(y, outs[ISAS[0]], f"{name} vs {ISAS[0]}")
    z = x.double() @ (w.double() * scale.double()[:, None]).T + b.double()
    act_fn = {None: lambda t: t, "gelu": nn.functional.gelu, "relu": torch.relu, "relu6": nn.functional.relu6,
              "silu": nn.functional.silu, "hardswish": nn.functional.hardswish,
              "gelu_tanh": lambda t: nn.functional.gelu(t, approximate="tanh")}[act]  # fmt: skip
    want = act_fn(z)
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    assert (outs[ISAS[0]].double() - want).abs().max().item() <= tol * z.abs().max().item() + 1e-6  # z's scale: the sum's rounding


def test_non_finite_inputs_stay_in_their_rows(isa):
    w, scale, b = _weights(20, 40, seed=1)
    x = torch.randn(4, 40)
    x[1, 3], x[2, 39] = float("nan"), float("inf")
    y = ops.weight_only_linear(x, ops.pack_int8_weight(w), scale, b)
    assert torch.isfinite(y[[0, 3]]).all()
    assert y[1].isnan().all()
    # inf times the weights: +-inf where the weight is nonzero, NaN where it is 0 (inf * 0), as fp32 does
    want = torch.where(w[:, 39] == 0, float("nan"), torch.sign(w[:, 39].float()) * float("inf"))
    assert_same(y[2], want, "inf row")


def test_layer_matches_dequantized_float_and_keeps_outliers():
    """Activations with outlier channels (the LLM case): int8 per-token quantization loses the small
    channels, weight-only keeps them; both are checked against the float layer."""
    torch.manual_seed(0)
    lin = nn.Linear(256, 128)
    x = torch.randn(16, 256)
    x[:, :4] *= 200.0  # four outlier channels
    wo, dyn = WeightOnlyInt8Linear.from_linear(lin), Int8Linear.from_linear(lin)
    with torch.inference_mode():
        y, yw, yd = lin(x), wo(x), dyn(x)
        ydq = nn.functional.linear(x, wo.dequantized_weight(), wo.bias)
    assert (yw - ydq).abs().max().item() < 1e-4 * ydq.abs().max().item()  # only the weight's rounding
    assert torch.equal(wo.weight_int8, dyn.weight_int8)  # same weights, another kernel
    s_wo, s_dyn = sqnr(y, yw), sqnr(y, yd)
    assert s_wo > 38 and s_wo > s_dyn + 10, (s_wo, s_dyn)


def test_quantize_activations_none_converts_linear_layers_only():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = nn.Sequential(nn.Linear(8, 32), nn.SiLU(), nn.Linear(32, 4))

        def forward(self, x):
            h = self.conv(x).flatten(2).transpose(1, 2)
            h = self.mha(h, h, h, need_weights=False)[0]
            return self.fc(h.mean(1))

    torch.manual_seed(0)
    model = Net().eval()
    q = fastinfer.quantize(model, QuantConfig(activations="none"))
    assert type(q.fc[0]) is WeightOnlyInt8Linear and q.fc[0].activation == "silu"
    assert type(q.fc[2]) is WeightOnlyInt8Linear
    assert type(q.conv) is nn.Conv2d and type(q.mha) is nn.MultiheadAttention
    rows = {r.name: r for r in fastinfer.conversion_report(q)}
    assert "activations='none'" in rows["conv"].detail and "activations='none'" in rows["mha"].detail
    x = torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        assert sqnr(model(x), q(x)) > 35
    with pytest.raises(ValueError, match="calibration_data"):  # static scales need calibration
        fastinfer.quantize(model, QuantConfig(activations="static"))
    with pytest.raises(ValueError, match="activations"):
        QuantConfig(activations="int4")


def test_gradient_state_dict_files_and_lower_isa(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 96), nn.GELU(approximate="tanh"), nn.Linear(96, 10)).eval()
    q = fastinfer.quantize(model, QuantConfig(activations="none"))
    assert q[0].activation == "gelu_tanh"
    x = torch.randn(5, 48, requires_grad=True)
    q(x).square().sum().backward()
    ref = nn.Sequential(nn.Linear(48, 96), nn.GELU(approximate="tanh"), nn.Linear(96, 10))
    for i in (0, 2):
        ref[i].weight.data, ref[i].bias.data = q[i].dequantized_weight(), q[i].bias.clone()
    xr = x.detach().clone().requires_grad_(True)
    ref(xr).square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)

    xi = x.detach()
    with torch.inference_mode():
        want = q(xi)
    path = tmp_path / "wo.safetensors"
    fastinfer.save(q, path)
    for name in ISAS:
        fastinfer.set_isa(name)
        back = fastinfer.load(path, model)
        assert type(back[0]) is WeightOnlyInt8Linear and back[0].activation == "gelu_tanh"
        with torch.inference_mode():
            assert_same(back(xi), want, name)
    sd = q.state_dict()
    fresh = WeightOnlyInt8Linear(48, 96, activation="gelu_tanh")
    fresh.load_state_dict({k[2:]: v for k, v in sd.items() if k.startswith("0.")})
    assert_same(fresh(xi), q[0](xi), "state_dict")


def test_prune_then_sparsify_keeps_it_dense_and_compile():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64)).eval()
    q = fastinfer.quantize(fastinfer.prune(model, 0.5, pattern="2:4"), QuantConfig(activations="none"))
    assert type(q[0]) is WeightOnlyInt8Linear
    s = fastinfer.sparsify(q)
    assert type(s[0]) is WeightOnlyInt8Linear and not isinstance(s[0], SparseInt8Linear)
    x = torch.randn(3, 128)
    compiled = torch.compile(q, fullgraph=True)
    with torch.inference_mode():
        assert_same(compiled(x), q(x), "compile")
    torch.library.opcheck(torch.ops.fastinfer.weight_only_linear.default,
                          (x, q[0].packed_weight, q[0].weight_scale, q[0].bias, 0))  # fmt: skip


def test_bad_inputs_raise():
    layer = WeightOnlyInt8Linear.from_linear(nn.Linear(16, 8))
    with pytest.raises(ValueError, match="last dim must be 16"):
        layer(torch.randn(2, 15))
    with pytest.raises(TypeError, match="float32 and bfloat16"):
        layer(torch.randn(2, 16).half())
    w, scale, b = _weights(8, 16, seed=2)
    with pytest.raises(ValueError, match="K=15"):
        ops.weight_only_linear(torch.randn(2, 15), ops.pack_int8_weight(w), scale, b)
    with pytest.raises(TypeError, match="weight_only_linear: bias must be float32"):
        ops.weight_only_linear(torch.randn(2, 16), ops.pack_int8_weight(w), scale[:4], b)
    assert ops.weight_only_linear(torch.randn(0, 16), ops.pack_int8_weight(w), scale, b).shape == (0, 8)
    y = ops.weight_only_linear(torch.randn(3, 0), ops.pack_int8_weight(w[:, :0]), scale, b)
    assert_same(y, b.expand(3, 8).contiguous(), "K = 0")
    assert "weight-only" in repr(layer)
