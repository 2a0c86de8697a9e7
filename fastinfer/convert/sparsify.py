"""fastinfer.sparsify: swap pruned layers for sparse ones, where the sparse kernel is the faster one.

The format follows the zeros a layer really has (not how they were made), as fastinfer.plan's
rules decide: whole 16 x 64 tiles -> "block", few enough nonzeros anywhere -> "ell", at most 2
nonzeros in every group of 4 inputs -> "2:4"; otherwise the layer stays dense.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fastinfer.config import skip_patterns
from fastinfer.convert._select import select
from fastinfer.convert._swap import swap
from fastinfer.nn import (
    Int8Linear,
    SparseInt8Linear,
    SparseLinear,
    StaticInt8Linear,
    WeightOnlyInt8Linear,
    linear_weight_and_bias,
)
from fastinfer.plan.rules import DEFAULT_RULE, SparseRule, choose_format

__all__ = ["sparse_int8_or_dense", "sparsify"]


def sparse_int8_or_dense(layer: Int8Linear, rule: SparseRule = DEFAULT_RULE) -> nn.Module:
    """SparseInt8Linear in the chosen format, or the dense Int8Linear itself (always for a layer
    with SmoothQuant's input_scale, and for the weight-only and static layers: the sparse layers
    have neither)."""
    if layer.input_scale is not None or type(layer) is not Int8Linear:
        return layer
    fmt = choose_format(layer.weight_int8, rule)
    return layer if fmt is None else SparseInt8Linear.from_int8linear(layer, fmt)


def sparsify(
    model: nn.Module,
    *,
    rule: SparseRule | None = None,
    skip=(),
    inplace: bool = False,
    progress: bool | None = None,
) -> nn.Module:
    """Returns `model` with each pruned layer that runs faster sparse replaced: nn.Linear (and
    transformers Conv1D) -> fastinfer.nn.SparseLinear, Int8Linear -> SparseInt8Linear (a
    WeightOnlyInt8Linear or StaticInt8Linear stays dense: no sparse weight-only or static kernel). Layers whose
    zeros do not pay (see SparseRule) stay as they are; so do layers matched by `skip` (patterns as
    in QuantConfig). Outputs are unchanged up to fp32 summation order (SparseLinear) or exactly
    (SparseInt8Linear vs Int8Linear). The original model is not modified unless inplace=True.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsify expects an nn.Module, got {type(model).__name__}")
    rule = DEFAULT_RULE if rule is None else rule
    if not isinstance(rule, SparseRule):
        raise TypeError(f"rule must be a fastinfer.SparseRule, got {type(rule).__name__}")
    skip = skip_patterns(skip, "sparsify(skip=...)")
    if not inplace:
        model = copy.deepcopy(model)

    def convert(mod: nn.Module) -> nn.Module:
        if isinstance(mod, (WeightOnlyInt8Linear, StaticInt8Linear)):
            return mod  # no sparse weight-only or static kernel: it stays dense
        if isinstance(mod, Int8Linear):
            return sparse_int8_or_dense(mod, rule)
        weight, _ = linear_weight_and_bias(mod)
        with torch.no_grad():
            fmt = choose_format(weight.detach().float(), rule)
        return mod if fmt is None else SparseLinear.from_linear(mod, fmt)

    return swap(model, select(model, (Int8Linear,), skip=skip), convert, progress, "fastinfer.sparsify")
