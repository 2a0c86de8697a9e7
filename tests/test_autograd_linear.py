"""Gradients with respect to the input through the int8 and sparse linear layers: equal to fp32
autograd through the dequantized weights (the layers' buffers get none), fused ReLU / GELU
included; an activation without a gradient raises at backward. Before: backward() "succeeded" with
x.grad silently None."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fastinfer
from conftest import sparse_int8
from fastinfer.nn import Int8Linear, SparseInt8Linear, SparseLinear


def _x(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).requires_grad_()


def _reference_grad(x, weight, bias, act, grad_out):
    ref = x.detach().float().clone().requires_grad_()
    y = F.linear(ref, weight, bias)
    if act == "gelu":
        y = F.gelu(y)
    y.backward(grad_out.float())
    return ref.grad


@pytest.mark.parametrize("act", [None, "gelu", "relu", "relu6"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_input_gradient(isa, act, dtype):
    torch.manual_seed(1)
    layer = Int8Linear.from_linear(nn.Linear(48, 20), activation=act)
    x = _x(2, 5, 48, dtype=dtype)
    y = layer(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    y.backward(g)
    assert x.grad is not None and x.grad.dtype == dtype and x.grad.shape == x.shape
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    if act in ("relu", "relu6"):
        # the mask is the layer's own output's (int8 rounding can move a value across 0 or 6)
        out = y.detach().float()
        mask = (out > 0) & (out < 6) if act == "relu6" else out > 0
        ref = (g.float() * mask) @ layer.dequantized_weight()
        y_float = F.linear(x.detach().float(), layer.dequantized_weight(), layer.bias)
        assert ((out > 0) == (y_float > 0)).float().mean() > 0.97
    else:
        ref = _reference_grad(x, layer.dequantized_weight(), layer.bias, act, g)
    torch.testing.assert_close(x.grad.float(), ref, atol=tol * float(ref.abs().max()), rtol=tol)
    assert layer.weight_scale.grad is None and layer.packed_weight.grad is None


@pytest.mark.parametrize("fmt", ["csr", "2:4", "block"])
def test_sparse_int8_linear_input_gradient_equals_the_dense_one(fmt):
    dense = Int8Linear(128, 32)
    dense.set_weight(sparse_int8(fmt, 32, 128, 0.4, seed=3), torch.rand(32, generator=torch.Generator().manual_seed(4)))
    sparse = SparseInt8Linear.from_int8linear(dense, fmt)
    xs, xd = _x(6, 128, seed=5), _x(6, 128, seed=5)
    sparse(xs).sum().backward()
    dense(xd).sum().backward()
    torch.testing.assert_close(xs.grad, xd.grad, atol=1e-5, rtol=1e-5)


def test_sparse_float_linear_input_gradient():
    lin = nn.Linear(64, 24)
    with torch.no_grad():
        lin.weight[:, ::2] = 0
    layer = SparseLinear.from_linear(lin, "csr")
    x = _x(3, 64, seed=6)
    layer(x).sum().backward()
    ref = _reference_grad(x, lin.weight.detach(), lin.bias.detach(), None, torch.ones(3, 24))
    torch.testing.assert_close(x.grad, ref, atol=1e-5, rtol=1e-5)


def test_activation_without_gradient_raises_at_backward():
    """hardswish has no backward here (silu and gelu_tanh do: tests/test_activation_fusion.py)."""
    layer = Int8Linear.from_linear(nn.Linear(16, 8), activation="hardswish")
    x = _x(2, 16)
    y = layer(x)
    with pytest.raises(RuntimeError, match="no gradient through the fused hardswish activation"):
        y.sum().backward()


def test_saliency_through_a_quantized_model_matches_its_float_twin():
    """A quantized MLP with GELU fused, used as a frozen feature extractor: the input gradient is
    that of the float model with the dequantized weights (to the int8 error of the GELU's input)."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3)).eval()
    q = fastinfer.quantize(model)
    assert q[0].activation == "gelu"
    twin = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
    with torch.no_grad():
        for i in (0, 2, 4):
            twin[i].weight.copy_(q[i].dequantized_weight())
            twin[i].bias.copy_(q[i].bias)
    x = _x(8, 32, seed=8)
    q(x)[:, 1].sum().backward()
    xr = x.detach().clone().requires_grad_()
    twin(xr)[:, 1].sum().backward()
    cos = F.cosine_similarity(x.grad.flatten(), xr.grad.flatten(), dim=0)
    assert cos > 0.99, float(cos)
