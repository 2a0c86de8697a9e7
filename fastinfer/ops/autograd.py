"""Gradients of the linear ops with respect to their input, through the dequantized weights.

The layers are for inference, but a quantized model is also used for saliency maps, adversarial
checks, or as a frozen feature extractor under a trained head: there backward() must give x.grad,
never a silent None. d loss / d x = (g * act'(z)) @ W_dq, with W_dq the weight the layer multiplies
by (int8 values times their scales, or the sparse fp32 values). The activation's derivative uses the
saved output (ReLU, ReLU6) or z recomputed in fp32 from x and W_dq (GELU: the kernel's own z differs
by the int8 rounding of x, the straight-through estimate of quantization). The weights, scales and
bias get no gradient (they are buffers, not parameters)."""

from __future__ import annotations

import torch

from fastinfer.ops._common import activation_grad
from fastinfer.ops.linear import unpack_int8_weight
from fastinfer.ops.sparse import unpack_sparse


_NEEDS_INPUT = (1, 4, 6)  # gelu, silu, gelu_tanh: their derivative is computed from the recomputed z


def _input_gradient(name: str, grad: torch.Tensor, x: torch.Tensor | None, out: torch.Tensor | None,
                    wf: torch.Tensor, bias: torch.Tensor | None, act: int, x_shape, dtype) -> torch.Tensor:  # fmt: skip
    z = torch.nn.functional.linear(x.float(), wf, bias) if act in _NEEDS_INPUT else None
    return (activation_grad(name, grad, act, out, z) @ wf).reshape(x_shape).to(dtype)


def _setup(ctx, inputs, output) -> None:
    """int8_linear, weight_only_linear and sparse_int8_linear: (x, packed, w_scale, bias, act)
    (static_int8_linear's through _static_setup)."""
    x, packed, w_scale, bias, act = inputs
    ctx.meta = (tuple(x.shape), x.dtype, act)
    ctx.save_for_backward(x if act in _NEEDS_INPUT else None, packed, w_scale, bias, output if act in (2, 3) else None)


def _dense_int8_backward(name: str):
    """The backward of int8_linear and weight_only_linear: one packed int8 weight, two kernels."""

    def backward(ctx, grad):
        x, packed, w_scale, bias, out = ctx.saved_tensors
        shape, dtype, act = ctx.meta
        wf = unpack_int8_weight(packed, w_scale.shape[0], shape[-1]).float() * w_scale[:, None]
        return _input_gradient(name, grad, x, out, wf, bias, act, shape, dtype), None, None, None, None

    return backward


def _static_setup(ctx, inputs, output) -> None:
    """static_int8_linear: (x, packed, w_scale, bias, x_scale, act); x_scale gets no gradient."""
    x, packed, w_scale, bias, _x_scale, act = inputs
    _setup(ctx, (x, packed, w_scale, bias, act), output)


def _static_int8_backward(ctx, grad):
    return (*_dense_int8_backward("static_int8_linear")(ctx, grad)[:4], None, None)


def _sparse_int8_linear_backward(ctx, grad):
    x, packed, w_scale, bias, out = ctx.saved_tensors
    shape, dtype, act = ctx.meta
    wf = unpack_sparse(packed, bounded=False).float() * w_scale[:, None]
    return _input_gradient("sparse_int8_linear", grad, x, out, wf, bias, act, shape, dtype), None, None, None, None


def _sparse_linear_setup(ctx, inputs, output) -> None:
    x, packed, bias, _n = inputs
    ctx.meta = (tuple(x.shape), x.dtype, 0)
    ctx.save_for_backward(packed, bias)


def _sparse_linear_backward(ctx, grad):
    packed, bias = ctx.saved_tensors
    shape, dtype, act = ctx.meta
    wf = unpack_sparse(packed, bounded=False).float()
    return _input_gradient("sparse_linear", grad, None, None, wf, bias, act, shape, dtype), None, None, None


for _name in ("int8_linear", "weight_only_linear"):
    torch.library.register_autograd(f"fastinfer::{_name}", _dense_int8_backward(_name), setup_context=_setup)
torch.library.register_autograd("fastinfer::static_int8_linear", _static_int8_backward, setup_context=_static_setup)
torch.library.register_autograd("fastinfer::sparse_int8_linear", _sparse_int8_linear_backward, setup_context=_setup)
torch.library.register_autograd("fastinfer::sparse_linear", _sparse_linear_backward, setup_context=_sparse_linear_setup)
