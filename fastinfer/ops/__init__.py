"""fastinfer's torch.library ops ("fastinfer::..."): every op is opaque to torch.compile /
torch.export and passes opcheck.

    _schema.py    every op's schema and fake (shape) implementation
    _common.py    argument checks, row layout, outputs
    _prepared.py  how each kernel's arguments are marshalled (shared with the layers' eager calls)
    attention.py  fused scaled dot-product attention (CPU)
    conv.py       int8 Conv2d: pack_conv_weight, int8_conv2d (CPU)
    norm.py       LayerNorm (CPU)
    linear.py     dense int8: quantize_per_token, pack/unpack, int8_matmul, int8_linear,
                  static_int8_linear, weight_only_linear (CPU)
    sparse.py     the sparse formats, pack_sparse, validation, the sparse ops (CPU)
    cuda.py       the CUDA kernels
    autograd.py   the linear ops' gradients with respect to their input
"""

from fastinfer.ops import cuda  # noqa: F401  (registers the CUDA kernels)
from fastinfer.ops.attention import attention, attention_native
from fastinfer.ops.conv import int8_conv2d, pack_conv_weight, unpack_conv_weight
from fastinfer.ops.norm import layer_norm, layer_norm_native
from fastinfer.ops._common import LARGE_OUTPUT_BYTES, packed_nbytes
from fastinfer.ops.linear import (
    int8_linear,
    int8_matmul,
    int8_matmul_packed,
    pack_int8_weight,
    quantize_per_token,
    static_int8_linear,
    unpack_int8_weight,
    validate_int8_weight,
    weight_only_linear,
)
from fastinfer.ops import autograd  # noqa: F401,E402  (registers the linear ops' backward)
from fastinfer.ops.sparse import (
    FORMATS as SPARSE_FORMATS,
    pack_sparse,
    sparse_info,
    sparse_int8_linear,
    sparse_int8_matmul,
    sparse_linear,
    sparse_nonzeros,
    sparse_validate,
    unpack_sparse,
)

__all__ = [
    "LARGE_OUTPUT_BYTES", "SPARSE_FORMATS", "attention", "attention_native", "int8_conv2d", "int8_linear", "int8_matmul", "int8_matmul_packed", "layer_norm", "layer_norm_native", "pack_conv_weight", "pack_int8_weight",
    "pack_sparse", "packed_nbytes", "quantize_per_token", "sparse_info", "sparse_int8_linear", "sparse_int8_matmul",
    "sparse_linear", "sparse_nonzeros", "sparse_validate", "static_int8_linear", "unpack_conv_weight", "unpack_int8_weight", "unpack_sparse",
    "validate_int8_weight", "weight_only_linear",
]  # fmt: skip
