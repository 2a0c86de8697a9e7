"""A residual added in the dense int8 linear's epilogue (act(x W^T * s + b + residual), rounded
once): float32 bit-identical to the unfused sum on every ISA, bfloat16 the fp32 sum rounded once;
the layers that add it after their kernel instead, bad residuals, gradients, compile. The
transformers blocks that pass it are tested in test_hf_blocks.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastinfer
from conftest import assert_same
from fastinfer import ops
from fastinfer.nn import Int8Linear, StaticInt8Linear, WeightOnlyInt8Linear

FP32, BF16 = torch.float32, torch.bfloat16
ACTS = {None: lambda t: t, "relu": torch.relu, "relu6": lambda t: F.hardtanh(t, 0, 6)}


def _weights(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    return ops.pack_int8_weight(w), torch.rand(n, generator=g) * 0.01, torch.randn(n, generator=g)


@pytest.mark.parametrize("act", [None, "relu", "relu6"])
@pytest.mark.parametrize("m,k,n", [(1, 64, 16), (7, 96, 40), (13, 384, 200), (64, 17, 33)])
def test_residual_equals_the_unfused_sum(isa, m, k, n, act):
    """float32: act(linear + r) equals torch's act(linear(x) + r) bit for bit (both one fp32 add);
    bfloat16: the float32 result of the same values, rounded once."""
    packed, scale, bias = _weights(n, k, seed=m * 7 + n)
    x = torch.randn(m, k) * 2
    y = ops.int8_linear(x, packed, scale, bias)
    r = torch.randn(m, n) * 3
    fused = ops.int8_linear(x, packed, scale, bias, act, residual=r)
    assert_same(fused, ACTS[act](y + r), f"float32 {act}")
    xb, rb = x.bfloat16(), r.bfloat16()
    want = ops.int8_linear(xb.float(), packed, scale, bias, act, residual=rb.float()).bfloat16()
    assert_same(ops.int8_linear(xb, packed, scale, bias, act, residual=rb), want, "bfloat16: rounded once")


def test_static_and_the_gelu_epilogue_take_the_residual(isa):
    packed, scale, bias = _weights(48, 80, seed=3)
    x, r = torch.randn(2, 9, 80), torch.randn(2, 9, 48)
    xs = torch.tensor([0.02])
    y = ops.static_int8_linear(x, packed, scale, bias, xs)
    assert_same(ops.static_int8_linear(x, packed, scale, bias, xs, residual=r), y + r, "static")
    z = ops.int8_linear(x, packed, scale, bias)
    g = ops.int8_linear(x, packed, scale, bias, "gelu", residual=r)
    torch.testing.assert_close(g, F.gelu(z + r), atol=2e-6, rtol=1e-6)  # the epilogue's erf: within 4e-7


def test_every_isa_gives_the_same_bits():
    packed, scale, bias = _weights(72, 200, seed=9)
    x, r = torch.randn(33, 200).bfloat16(), torch.randn(33, 72).bfloat16()
    outs = []
    for isa in fastinfer.available_isas():
        fastinfer.set_isa(isa)
        outs.append((isa, ops.int8_linear(x, packed, scale, bias, "gelu", residual=r)))
    for isa, out in outs[1:]:
        assert_same(out, outs[0][1], f"{isa} vs {outs[0][0]}")


def test_bad_residuals_raise():
    packed, scale, bias = _weights(8, 16, seed=1)
    x = torch.randn(3, 16)
    with pytest.raises(ValueError, match="output's shape"):
        ops.int8_linear(x, packed, scale, bias, residual=torch.zeros(3, 9))
    with pytest.raises(ValueError, match="output's shape"):
        ops.int8_linear(x, packed, scale, bias, residual=torch.zeros(8))  # the op does not broadcast
    with pytest.raises(TypeError, match="output's dtype"):
        ops.int8_linear(x, packed, scale, bias, residual=torch.zeros(3, 8, dtype=BF16))
    with pytest.raises(TypeError, match="residual"):
        ops.int8_linear(x, packed, scale, bias, residual=[0.0] * 8)
    meta = [t.to("meta") for t in (x, packed, scale)]
    with pytest.raises(ValueError, match="output's shape"):  # the fake checks it too (compile, export)
        torch.ops.fastinfer.int8_linear(*meta, None, 0, torch.empty(3, 7, device="meta"))
    assert torch.ops.fastinfer.int8_linear(*meta, None, 0, torch.empty(3, 8, device="meta")).shape == (3, 8)


def test_non_contiguous_residual_and_empty_and_k0():
    packed, scale, bias = _weights(24, 32, seed=2)
    x, r = torch.randn(5, 32), torch.randn(24, 5).t()
    assert_same(ops.int8_linear(x, packed, scale, bias, residual=r),
                ops.int8_linear(x, packed, scale, bias, residual=r.contiguous()), "strided residual")  # fmt: skip
    assert ops.int8_linear(x[:0], packed, scale, bias, residual=r[:0]).shape == (0, 24)
    layer = Int8Linear.from_linear(nn.Linear(0, 4))
    layer.activation = "relu"
    rr = torch.tensor([[-1.0, 2.0, 0.5, -3.0]])
    assert_same(layer(torch.zeros(1, 0), residual=rr), torch.relu(layer.bias + rr), "K = 0: act(bias + residual)")


def test_gradients_reach_x_and_the_residual():
    layer = Int8Linear.from_linear(nn.Linear(24, 16))
    layer.activation = "gelu"
    x = torch.randn(4, 24, requires_grad=True)
    r = torch.randn(4, 16, requires_grad=True)
    layer(x, residual=r).sum().backward()
    wf = layer.dequantized_weight()
    x2, r2 = x.detach().clone().requires_grad_(), r.detach().clone().requires_grad_()
    F.gelu(F.linear(x2, wf, layer.bias) + r2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(r.grad, r2.grad, atol=1e-5, rtol=1e-4)
    torch.library.opcheck(torch.ops.fastinfer.int8_linear,
                          (x.detach(), layer.packed_weight, layer.weight_scale, layer.bias, 1, r.detach()))  # fmt: skip


def test_compile_fullgraph_takes_the_residual():
    layer = Int8Linear.from_linear(nn.Linear(32, 24))
    x, r = torch.randn(6, 32), torch.randn(6, 24)
    compiled = torch.compile(lambda x, r: layer(x, residual=r), fullgraph=True)
    assert_same(compiled(x, r), layer(x, residual=r), "compiled")


def test_layers_without_the_kernel_add_it_after_and_broadcasting_falls_back():
    lin = nn.Linear(40, 24)
    x = torch.randn(3, 40)
    for layer in (WeightOnlyInt8Linear.from_linear(lin), fastinfer.nn.SparseInt8Linear.from_linear(lin)):
        r = torch.randn(3, 24)
        assert_same(layer(x, residual=r), layer(x) + r, type(layer).__name__)
    layer = Int8Linear.from_linear(lin)
    layer.activation = "relu"
    y = ops.int8_linear(x, layer.packed_weight, layer.weight_scale, layer.bias)
    for r in (torch.randn(24), 2.5, torch.randn(3, 24, dtype=torch.float64)):
        assert_same(layer(x, residual=r), torch.relu(y + r), f"fallback {type(r).__name__}")  # torch's add, then relu
    assert StaticInt8Linear._ADDS_RESIDUAL and Int8Linear._ADDS_RESIDUAL and not WeightOnlyInt8Linear._ADDS_RESIDUAL


def test_the_fast_call_and_the_op_agree():
    layer = Int8Linear.from_linear(nn.Linear(64, 48))
    x, r = torch.randn(5, 64).bfloat16(), torch.randn(5, 48).bfloat16()
    first = layer(x, residual=r)  # the checked op (builds the fast call)
    assert_same(layer(x, residual=r), first, "fast call")
    assert_same(layer(x), ops.int8_linear(x, layer.packed_weight, layer.weight_scale, layer.bias), "no residual")
