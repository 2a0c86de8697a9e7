"""LayerNorm on the CPU: fastinfer::layer_norm, one pass per row through fastinfer's kernel.

The semantics are torch.nn.functional.layer_norm's: the statistics over the last
len(normalized_shape) dimensions, the biased variance, 1 / sqrt(var + eps), then the weight and the
bias where given. The arithmetic is fp32 for fp32 and bf16 tensors, with one summation order on
every ISA (dispatch/kernel_table.h, LayerNormArgs), so every ISA gives the same bits; against torch's
own kernel, which sums in another order, results differ within fp32 rounding (bf16: the output's
rounding). x, the output and the parameters may each be float32 or bfloat16 (the weight and bias of
one dtype). The backward recomputes the forward with torch's own op (exact gradients of the same
function within fp32 rounding).
"""

from __future__ import annotations

import math

import torch

from fastinfer._runtime import _C
from fastinfer.ops._common import DTYPE_CODE, check_device, check_tensor, new_output, register

__all__ = ["layer_norm", "layer_norm_native"]

torch.library.define(
    "fastinfer::layer_norm",
    "(Tensor x, int[] normalized_shape, Tensor? weight, Tensor? bias, float eps) -> Tensor",
)

_NAME = "layer_norm"
_F32_MAX = torch.finfo(torch.float32).max


def layer_norm_native() -> bool:
    """Whether the active ISA has its own LayerNorm kernel (AVX-512 today). Without one the op still
    runs, on the scalar reference kernel: correct but slower than torch's, so converted models keep
    torch's LayerNorm there."""
    return bool(_C.layer_norm_simd())


def _check(x, normalized_shape, weight, bias, eps) -> int:
    """The checks of every path (CPU kernel, fake); returns the row length h."""
    check_tensor(_NAME, "x", x)
    if x.dtype not in DTYPE_CODE:
        raise TypeError(f"fastinfer.{_NAME}: x must be float32 or bfloat16, got {x.dtype}")
    shape = tuple(normalized_shape)
    if not shape or any(not isinstance(n, int) or n < 0 for n in shape):
        raise ValueError(f"fastinfer.{_NAME}: normalized_shape must be a non-empty list of sizes >= 0, got {list(shape)}")
    if x.dim() < len(shape) or tuple(x.shape[x.dim() - len(shape):]) != shape:
        raise ValueError(f"fastinfer.{_NAME}: x of shape {tuple(x.shape)} does not end in normalized_shape {list(shape)}")
    dtypes = set()
    for arg, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        check_tensor(_NAME, arg, t)
        if tuple(t.shape) != shape:
            raise ValueError(f"fastinfer.{_NAME}: {arg} must have shape {list(shape)}, got {tuple(t.shape)}")
        if t.dtype not in DTYPE_CODE:
            raise TypeError(f"fastinfer.{_NAME}: {arg} must be float32 or bfloat16, got {t.dtype}")
        dtypes.add(t.dtype)
    if len(dtypes) > 1:
        raise TypeError(f"fastinfer.{_NAME}: weight and bias must have one dtype, got {weight.dtype} and {bias.dtype}")
    check_device(_NAME, x=x, weight=weight, bias=bias)
    if any(t is not None and t.device != x.device for t in (weight, bias)):
        raise ValueError(f"fastinfer.{_NAME}: x, weight and bias must be on one device")
    if not isinstance(eps, float) or not math.isfinite(eps) or abs(eps) > _F32_MAX:
        raise ValueError(f"fastinfer.{_NAME}: eps must be a finite float (in float32's range), got {eps!r}")
    return math.prod(shape)


@torch.library.register_fake("fastinfer::layer_norm")
def _layer_norm_fake(x, normalized_shape, weight, bias, eps):
    _check(x, normalized_shape, weight, bias, eps)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@register(_NAME, "CPU")
def layer_norm_cpu(x, normalized_shape, weight, bias, eps: float) -> torch.Tensor:
    """The op's CPU kernel: checks, then fastinfer's kernel on rows of h values. Called directly
    (without the dispatcher) by fastinfer.nn.LayerNorm in plain eager calls."""
    h = _check(x, normalized_shape, weight, bias, eps)
    out = new_output(tuple(x.shape), x.dtype)
    if out.numel() == 0:
        return out
    rows = x.reshape(-1, h)  # a view where the rows already have unit inner stride
    if h > 1 and rows.stride(1) != 1 or rows.shape[0] > 1 and rows.stride(0) < h:
        rows = rows.contiguous()
    w = weight.contiguous() if weight is not None else None
    b = bias.contiguous() if bias is not None else None
    wdt = DTYPE_CODE[(w if w is not None else b).dtype] if (w is not None or b is not None) else 0
    _C.layer_norm(rows.data_ptr(), DTYPE_CODE[x.dtype], rows.shape[0], h, rows.stride(0) if rows.shape[0] > 1 else h,
                  w.data_ptr() if w is not None else 0, b.data_ptr() if b is not None else 0, wdt, eps,
                  out.data_ptr(), h)  # fmt: skip
    return out


@register(_NAME, "cuda")
def _layer_norm_cuda(x, normalized_shape, weight, bias, eps):
    raise RuntimeError(
        "fastinfer.layer_norm runs on the CPU only; on CUDA use torch.nn.functional.layer_norm "
        "(fastinfer.nn.LayerNorm takes it for CUDA tensors)"
    )


def layer_norm(x: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               eps: float = 1e-5) -> torch.Tensor:  # fmt: skip
    """torch.nn.functional.layer_norm on fastinfer's CPU kernel (see the module docstring)."""
    if isinstance(normalized_shape, int):
        normalized_shape = [normalized_shape]
    _check(x, list(normalized_shape), weight, bias, float(eps))  # clear errors before the dispatcher's own
    return torch.ops.fastinfer.layer_norm(x, list(normalized_shape), weight, bias, float(eps))


# ------------------------------------------------------------------------------------- backward


def _setup_context(ctx, inputs, output):
    x, normalized_shape, weight, bias, eps = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.meta = (list(normalized_shape), eps)


def _backward(ctx, grad):
    """Gradients of the same function through torch's layer_norm (recomputed from the inputs)."""
    x, weight, bias = ctx.saved_tensors
    shape, eps = ctx.meta
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(t.requires_grad) if t is not None else None for t in (x, weight, bias)]
        # torch's kernel wants the parameters in the input's dtype
        w, b = (t.to(x.dtype) if t is not None else None for t in leaves[1:])
        out = torch.nn.functional.layer_norm(leaves[0], shape, w, b, eps)
        need = [t for t in leaves if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(out, need, grad)) if need else iter(())
    gx, gw, gb = (next(grads) if t is not None and t.requires_grad else None for t in leaves)
    return gx, None, gw, gb, None


torch.library.register_autograd("fastinfer::layer_norm", _backward, setup_context=_setup_context)
