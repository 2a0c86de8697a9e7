"""The one road from Python to each compute kernel: how its arguments are marshalled (row layout,
output allocation, the empty and K = 0 cases, data_ptr() integers and dtype codes).

The linear kernels take a prepared call: the weight side (packed weight, scales, bias) checked once
and resolved to addresses, then called with each input. The registered ops' CPU kernels build one
per call after their checks; a fastinfer.nn layer keeps the one its last checked call built for
as long as its buffers stay the same (fastinfer/nn/_base.py). So the eager fast path and the op
run the same marshalling and cannot drift apart. Inputs reach a prepared call checked: float32 or
bfloat16, at least 1-D, last dim k.
"""

from __future__ import annotations

import torch

from fastinfer._runtime import _C
from fastinfer.ops._common import DTYPE_CODE, new_output, rows


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


class Int8LinearCall:
    """y [..., n] = kernel(x [..., k]) for _C.int8_linear, _C.weight_only_linear and
    _C.sparse_int8_linear (one signature), and _C.static_int8_linear (x_scale given): per-token (or
    static) int8 quantization of x, exact int32 accumulation, fp32 epilogue
    act(acc * sa[m] * w_scale[n] + bias[n] + residual[..., n]), output in x's dtype.

    weight: the checked, 64-byte aligned packed buffer (K4N16 or sparse); w_scale float32 [n];
    bias float32 [n] or None; act: the checked activation code (ACTIVATION_CODE, 0 none);
    residual: whether the kernel takes one (the dense int8 kernels; each call then passes a checked
    residual of the output's shape and dtype, or none). The call holds every tensor whose address it
    passes."""

    __slots__ = ("kernel", "weight", "w_scale", "bias", "n", "k", "act", "x_scale", "residual", "_ptrs", "_extra")

    def __init__(self, kernel, weight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                 n: int, k: int, act: int = 0, x_scale: torch.Tensor | None = None,
                 residual: bool = False) -> None:  # fmt: skip
        self.kernel, self.weight, self.n, self.k, self.act, self.residual = kernel, weight, n, k, act, residual
        self.w_scale = w_scale.contiguous()
        self.bias = bias.contiguous() if bias is not None else None
        self._ptrs = (weight.data_ptr(), weight.numel(), self.w_scale.data_ptr(), _ptr(self.bias))
        # _C.static_int8_linear: the input's one calibrated scale (float32, one element), read by the
        # kernel at each call; the per-token kernels take no such argument
        self.x_scale = x_scale
        self._extra = () if x_scale is None else (x_scale.data_ptr(),)

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        n, k = self.n, self.k
        out = new_output((*x.shape[:-1], n), x.dtype)
        if out.numel() == 0:
            return out
        if k == 0:  # y = act(bias + residual), or act(0) = 0 (gelu and none alike)
            if self.bias is None and residual is None:
                return out.zero_()
            y = torch.zeros(out.shape, dtype=torch.float32)
            if self.bias is not None:
                y += self.bias
            if residual is not None:
                y += residual.float()
            if self.act:
                _C.apply_activation(y.data_ptr(), y.numel(), self.act)
            return out.copy_(y)
        x2, ld = rows(x)
        code = DTYPE_CODE[x.dtype]
        w, w_nbytes, s, b = self._ptrs
        res = None if residual is None else residual.contiguous()  # rows of n, as out's (held through the call)
        tail = (*self._extra, _ptr(res)) if self.residual else self._extra
        self.kernel(x2.data_ptr(), code, x2.shape[0], k, ld, w, w_nbytes, s, b, out.data_ptr(), code, n, self.act,
                    *tail)  # fmt: skip
        return out


class SparseLinearCall:
    """y [..., n] = x [..., k] @ W^T + bias for _C.sparse_linear_f32 (fp32 "csr" or "ell" weight):
    fp32 accumulation; a bfloat16 x is computed in fp32 and the output cast back.

    weight: the checked, 64-byte aligned sparse buffer; bias float32 [n] or None."""

    __slots__ = ("weight", "bias", "n", "k", "_ptrs")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, n: int, k: int) -> None:
        self.weight, self.n, self.k = weight, n, k
        self.bias = bias.contiguous() if bias is not None else None
        self._ptrs = (weight.data_ptr(), weight.numel(), _ptr(self.bias))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.n, self.k
        out = new_output((*x.shape[:-1], n), torch.float32)
        if out.numel() == 0:
            return out.to(x.dtype)
        if k == 0:
            return (out.copy_(self.bias.expand_as(out)) if self.bias is not None else out.zero_()).to(x.dtype)
        x2, ld = rows(x if x.dtype == torch.float32 else x.float())
        w, w_nbytes, b = self._ptrs
        _C.sparse_linear_f32(x2.data_ptr(), x2.shape[0], k, ld, w, w_nbytes, b, out.data_ptr(), n)
        return out.to(x.dtype)


def int8_matmul(kernel, a: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    """Exact int32 [m, n] = a int8 [m, k] @ W^T: kernel is _C.int8_matmul or _C.sparse_int8_matmul
    (one signature) on the checked, aligned packed weight W [n, k]."""
    m, k = a.shape
    out = new_output((m, n), torch.int32)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    a2, ld = rows(a)
    kernel(a2.data_ptr(), m, k, ld, packed.data_ptr(), packed.numel(), out.data_ptr(), n)
    return out


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [..., k], scale float32 [...]) of a checked float x [..., k]."""
    k = x.shape[-1]
    q = torch.empty(x.shape, dtype=torch.int8)
    scale = torch.empty(x.shape[:-1], dtype=torch.float32)
    if x.numel() == 0:
        scale.zero_()
        return q, scale
    x2, ld = rows(x)
    _C.quantize_per_token(x2.data_ptr(), DTYPE_CODE[x.dtype], x2.shape[0], k, ld, q.data_ptr(), k, scale.data_ptr())
    return q, scale
