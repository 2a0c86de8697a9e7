"""fastinfer.quantize: float linear layers (and SparseLinear) -> int8 layers."""

from __future__ import annotations

import copy

from torch import nn

from fastinfer.config import QuantConfig
from fastinfer.convert._select import select
from fastinfer.convert._swap import swap
from fastinfer.convert.sparsify import sparse_int8_or_dense
from fastinfer.nn import Int8Linear, SparseLinear, quantize_weight_per_channel

__all__ = ["quantize"]


def quantize(model: nn.Module, config: QuantConfig | None = None, *, inplace: bool = False) -> nn.Module:
    """Returns `model` with every nn.Linear (not skipped by `config`) replaced by an Int8Linear, and
    every fastinfer.nn.SparseLinear by its int8 counterpart (SparseInt8Linear, or Int8Linear where
    the sparse int8 kernel would not be faster): quantize after sparsify equals sparsify after quantize.

    Hugging Face `Conv1D` layers (GPT-2 and relatives store linear weights as [in, out]) are
    linear layers too and are converted the same way. Subclasses of nn.Linear are left alone: they
    may change forward() in ways a swap would lose.

    The original model is not modified unless inplace=True. The result is a plain nn.Module: same
    inputs, same outputs (within int8 rounding), usable with torch.compile.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize expects an nn.Module, got {type(model).__name__}")
    if config is None:
        config = QuantConfig()
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a fastinfer.QuantConfig, got {type(config).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    targets = select(model, (SparseLinear,), skip=config.skip, filter_fn=config.filter_fn,
                     min_features=config.min_features)  # fmt: skip
    return swap(model, targets, _to_int8, config.progress, "fastinfer.quantize")


def _to_int8(mod: nn.Module) -> nn.Module:
    """Int8Linear for a float linear layer; for a SparseLinear, the same quantization of its weights
    (zeros stay zero) stored in the int8 sparse format sparsify() would pick, or dense if none pays."""
    if not isinstance(mod, SparseLinear):
        return Int8Linear.from_linear(mod)
    dense = Int8Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
    dense.set_weight(*quantize_weight_per_channel(mod.dense_weight()))
    if mod.bias is not None:
        dense.bias.copy_(mod.bias)
    dense.train(mod.training)
    return sparse_int8_or_dense(dense)
