"""LayerNorm: nn.LayerNorm on fastinfer's CPU kernel (fastinfer.ops.layer_norm)."""

from __future__ import annotations

import math
import weakref

import torch
from torch import nn

from fastinfer._runtime import _C
from fastinfer.ops._common import DTYPE_CODE, eager_fast_path, new_output
from fastinfer.ops.norm import layer_norm_cpu, layer_norm_native

__all__ = ["LayerNorm"]


class _FastNorm:
    """An eager call of a LayerNorm without the op's per-call checks of its parameters (~10 of a
    small call's ~14 us): built after a checked call, for the parameter tensors (the same objects at
    the same addresses), eps and normalized_shape it checked; the kernel reads the parameters'
    values at each call. Inputs it does not take (not a plain contiguous CPU float tensor of the
    normalized shape, or one autograd would see) take the checked path. Kept outside the module
    (_FAST_NORM), so copies and pickles of a layer never carry it."""

    __slots__ = ("key", "shape", "h", "args")

    def __init__(self, ln: nn.LayerNorm) -> None:
        w, b = ln.weight, ln.bias
        self.key = self.state(ln)
        self.shape = tuple(ln.normalized_shape)
        self.h = math.prod(self.shape)
        wdt = DTYPE_CODE[(w if w is not None else b).dtype] if (w is not None or b is not None) else 0
        self.args = (w.data_ptr() if w is not None else 0, b.data_ptr() if b is not None else 0, wdt, float(ln.eps))

    @staticmethod
    def state(ln: nn.LayerNorm) -> tuple:
        """(weight, its address, dtype and shape, bias, ..., eps, normalized_shape); holding the tensors
        keeps their ids from being reused while the key lives."""
        w, b = ln.weight, ln.bias
        return (w, None if w is None else (w.data_ptr(), w.dtype, w.shape), b,
                None if b is None else (b.data_ptr(), b.dtype, b.shape), ln.eps, tuple(ln.normalized_shape))  # fmt: skip

    def valid_for(self, ln: nn.LayerNorm) -> bool:
        w, wk, b, bk, eps, shape = self.key
        return (ln.weight is w and ln.bias is b and (w is None or (w.data_ptr(), w.dtype, w.shape) == wk)
                and (b is None or (b.data_ptr(), b.dtype, b.shape) == bk) and ln.eps == eps
                and tuple(ln.normalized_shape) == shape)  # fmt: skip

    def __call__(self, ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor | None:
        if not self.valid_for(ln) or type(x) is not torch.Tensor or not x.is_cpu or x.dtype not in DTYPE_CODE:
            return None
        if not layer_norm_native():  # an ISA without the kernel set since (fastinfer.set_isa): torch's, as _serves says
            return None
        nd = len(self.shape)
        if x.dim() < nd or tuple(x.shape[x.dim() - nd:]) != self.shape or not x.is_contiguous() or x.numel() == 0:
            return None
        if torch.is_grad_enabled() and (x.requires_grad or any(p is not None and p.requires_grad for p in (ln.weight, ln.bias))):
            return None
        out = new_output(tuple(x.shape), x.dtype)
        rows = x.numel() // self.h
        w, b, wdt, eps = self.args
        _C.layer_norm(x.data_ptr(), DTYPE_CODE[x.dtype], rows, self.h, self.h, w, b, wdt, eps, out.data_ptr(), self.h)
        return out


# layer -> its _FastNorm. Weak keys: an entry lives as long as its layer and is never copied with it.
_FAST_NORM: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters, state_dict and semantics) whose forward runs fastinfer's
    kernel: one pass per row, fp32 arithmetic, the same bits on every ISA; about 1.3-2x torch's own
    on this project's machine (bench/RESULTS.md). It takes torch's F.layer_norm instead where the
    kernel does not apply: autograd to record, CUDA or other devices, dtypes other than fp32/bf16,
    weight and input of different devices, or a CPU without the kernel's ISA (AVX-512), where the
    reference kernel would be slower than torch's."""

    @classmethod
    def from_layernorm(cls, ln: nn.LayerNorm) -> LayerNorm:
        """The same layer (its parameters, not copies) on the fast kernel."""
        if type(ln) is not nn.LayerNorm:
            raise TypeError(f"LayerNorm.from_layernorm expects an nn.LayerNorm, got {type(ln).__name__}")
        new = cls.__new__(cls)
        # the module's own state (parameters, hooks, training flag, attributes a user set), each
        # dict copied so that the two modules do not share registrations from here on
        new.__dict__.update({k: (v.copy() if isinstance(v, dict) else v) for k, v in ln.__dict__.items()})
        return new

    def _serves(self, x: torch.Tensor) -> bool:
        params = [p for p in (self.weight, self.bias) if p is not None]
        if x.dtype not in DTYPE_CODE or any(p.dtype not in DTYPE_CODE or p.device != x.device for p in params):
            return False
        if len({p.dtype for p in params}) > 1:
            return False
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
            return False
        return x.device.type == "cpu" and (torch.compiler.is_compiling() or layer_norm_native())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        traced = torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None
        fast = None if traced else _FAST_NORM.get(self)
        if fast is not None:
            y = fast(self, x)
            if y is not None:
                return y
        if not isinstance(x, torch.Tensor) or not self._serves(x):
            return super().forward(x)
        shape = list(self.normalized_shape)
        if eager_fast_path(x):
            y = layer_norm_cpu(x, shape, self.weight, self.bias, float(self.eps))  # checked: the fast call may serve
            if not traced and all(p is None or (type(p) in (torch.Tensor, nn.Parameter) and p.is_contiguous())
                                  for p in (self.weight, self.bias)):  # fmt: skip
                _FAST_NORM[self] = _FastNorm(self)
            return y
        return torch.ops.fastinfer.layer_norm(x, shape, self.weight, self.bias, float(self.eps))

    def extra_repr(self) -> str:
        return super().extra_repr() + ", kernel=fastinfer"
