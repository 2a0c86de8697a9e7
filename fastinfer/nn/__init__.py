"""Modules that replace float layers. Each is a plain nn.Module whose forward calls fastinfer ops.

    _base.py   the input contract, dtype-keeping _apply, forward() and its eager fast path; Fused
    linear.py  Int8Linear, StaticInt8Linear, WeightOnlyInt8Linear (and quantize_weight_per_channel, the weights they store)
    sparse.py  SparseLinear, SparseInt8Linear
    conv.py    Int8Conv2d, DepthwiseConv2d, Int8Conv1d (and fold_batchnorm)
    attention.py  Int8MultiheadAttention (nn.MultiheadAttention with int8 projections)
    norm.py    LayerNorm (nn.LayerNorm on fastinfer's kernel)
"""

from fastinfer.nn._base import Fused, linear_weight_and_bias
from fastinfer.nn.linear import Int8Linear, StaticInt8Linear, WeightOnlyInt8Linear, quantize_weight_per_channel
from fastinfer.nn.sparse import SparseInt8Linear, SparseLinear
from fastinfer.nn.conv import DepthwiseConv2d, Int8Conv1d, Int8Conv2d, fold_batchnorm
from fastinfer.nn.attention import Int8MultiheadAttention
from fastinfer.nn.norm import LayerNorm

__all__ = [
    "DepthwiseConv2d", "Fused", "Int8Conv1d", "Int8Conv2d", "Int8Linear", "Int8MultiheadAttention", "LayerNorm", "SparseInt8Linear", "fold_batchnorm", "SparseLinear", "StaticInt8Linear", "WeightOnlyInt8Linear", "linear_weight_and_bias", "quantize_weight_per_channel",
]  # fmt: skip
