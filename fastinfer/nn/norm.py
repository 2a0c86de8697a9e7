"""LayerNorm: nn.LayerNorm on fastinfer's CPU kernel (fastinfer.ops.layer_norm)."""

from __future__ import annotations

import torch
from torch import nn

from fastinfer.ops._common import DTYPE_CODE, eager_fast_path
from fastinfer.ops.norm import layer_norm_cpu, layer_norm_native

__all__ = ["LayerNorm"]


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
        if not isinstance(x, torch.Tensor) or not self._serves(x):
            return super().forward(x)
        shape = list(self.normalized_shape)
        if eager_fast_path(x):
            return layer_norm_cpu(x, shape, self.weight, self.bias, float(self.eps))
        return torch.ops.fastinfer.layer_norm(x, shape, self.weight, self.bias, float(self.eps))

    def extra_repr(self) -> str:
        return super().extra_repr() + ", kernel=fastinfer"
