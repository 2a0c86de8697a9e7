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
                    wf: torch.Tensor, bias: torch.Tensor | None, act: int, x_shape, dtype,
                    residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(d loss / d x, grad * act'(z)): the second is also the gradient of a residual added before
    the activation."""
    z = None
    if act in _NEEDS_INPUT:
        z = torch.nn.functional.linear(x.float(), wf, bias)
        if residual is not None:
            z = z + residual.float()
    g = activation_grad(name, grad, act, out, z)
    return (g @ wf).reshape(x_shape).to(dtype), g


def _setup(ctx, inputs, output) -> None:
    """int8_linear, weight_only_linear and sparse_int8_linear: (x, packed, w_scale, bias, act), the
    dense int8_linear with its residual after them (static_int8_linear's through _static_setup)."""
    x, packed, w_scale, bias, act = inputs[:5]
    _save(ctx, x, packed, w_scale, bias, act, inputs[5] if len(inputs) > 5 else None, output, len(inputs))


def _static_setup(ctx, inputs, output) -> None:
    """static_int8_linear: (x, packed, w_scale, bias, x_scale, act, residual); x_scale gets no gradient."""
    x, packed, w_scale, bias, _x_scale, act = inputs[:6]
    _save(ctx, x, packed, w_scale, bias, act, inputs[6] if len(inputs) > 6 else None, output, len(inputs))


def _save(ctx, x, packed, w_scale, bias, act, residual, output, n_inputs: int) -> None:
    needs_x = act in _NEEDS_INPUT
    ctx.meta = (tuple(x.shape), x.dtype, act, None if residual is None else residual.dtype, n_inputs)
    ctx.save_for_backward(x if needs_x else None, packed, w_scale, bias, output if act in (2, 3) else None,
                          residual if needs_x else None)  # fmt: skip


def _int8_backward(name: str, unpack):
    """The backward of an int8 linear op (unpack(packed, n, k): its float weight before the scales):
    the input's gradient first, none for the weight side, and a residual (the dense ops' last
    input) the output's gradient through act'."""

    def backward(ctx, grad):
        x, packed, w_scale, bias, out, residual = ctx.saved_tensors
        shape, dtype, act, res_dtype, n_inputs = ctx.meta
        wf = unpack(packed, w_scale.shape[0], shape[-1]).float() * w_scale[:, None]
        gx, g = _input_gradient(name, grad, x, out, wf, bias, act, shape, dtype, residual)
        grads = [gx] + [None] * (n_inputs - 1)
        if res_dtype is not None and ctx.needs_input_grad[n_inputs - 1]:
            grads[-1] = g.to(res_dtype)
        return tuple(grads)

    return backward


def _sparse_linear_setup(ctx, inputs, output) -> None:
    x, packed, bias, _n = inputs
    ctx.meta = (tuple(x.shape), x.dtype, 0)
    ctx.save_for_backward(packed, bias)


def _sparse_linear_backward(ctx, grad):
    packed, bias = ctx.saved_tensors
    shape, dtype, act = ctx.meta
    wf = unpack_sparse(packed, bounded=False).float()
    return _input_gradient("sparse_linear", grad, None, None, wf, bias, act, shape, dtype)[0], None, None, None


for _name in ("int8_linear", "weight_only_linear"):
    torch.library.register_autograd(f"fastinfer::{_name}", _int8_backward(_name, unpack_int8_weight), setup_context=_setup)
torch.library.register_autograd("fastinfer::static_int8_linear", _int8_backward("static_int8_linear", unpack_int8_weight),
                                setup_context=_static_setup)  # fmt: skip
torch.library.register_autograd("fastinfer::sparse_int8_linear",
                                _int8_backward("sparse_int8_linear", lambda p, n, k: unpack_sparse(p, bounded=False)),
                                setup_context=_setup)  # fmt: skip
torch.library.register_autograd("fastinfer::sparse_linear", _sparse_linear_backward, setup_context=_sparse_linear_setup)
