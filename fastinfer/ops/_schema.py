"""Every fastinfer op ("fastinfer::..."): its schema and its fake (shape) implementation, which
torch.compile, torch.export and opcheck run instead of a kernel. The kernels register per device:
CPU in fastinfer/ops/linear.py and fastinfer/ops/sparse.py, CUDA in fastinfer/ops/cuda.py."""

from __future__ import annotations

import torch

from fastinfer.ops._common import (
    activation_name,
    check_float_input,
    check_input_scale,
    check_int8_2d,
    check_int8_linear_params,
    check_residual,
    check_scale_bias,
    packed_nbytes,
)

# dense int8 (the packed weight is pack_int8_weight's K4N16 layout on the CPU, RN128 on CUDA)
torch.library.define("fastinfer::quantize_per_token", "(Tensor x) -> (Tensor, Tensor)")
torch.library.define("fastinfer::pack_int8_weight", "(Tensor w) -> Tensor")
torch.library.define("fastinfer::unpack_int8_weight", "(Tensor packed, int n, int k) -> Tensor")
torch.library.define("fastinfer::int8_matmul", "(Tensor a, Tensor w) -> Tensor")
torch.library.define("fastinfer::int8_matmul_packed", "(Tensor a, Tensor packed, int n) -> Tensor")
torch.library.define(
    "fastinfer::int8_linear",
    "(Tensor x, Tensor packed, Tensor w_scale, Tensor? bias, int act=0, Tensor? residual=None) -> Tensor",
)
torch.library.define(
    "fastinfer::static_int8_linear",
    "(Tensor x, Tensor packed, Tensor w_scale, Tensor? bias, Tensor x_scale, int act=0, Tensor? residual=None) -> Tensor",
)
torch.library.define(
    "fastinfer::weight_only_linear", "(Tensor x, Tensor packed, Tensor w_scale, Tensor? bias, int act=0) -> Tensor"
)
# sparse (the packed weight is pack_sparse's buffer, any format)
torch.library.define("fastinfer::sparse_linear", "(Tensor x, Tensor packed, Tensor? bias, int n) -> Tensor")
torch.library.define(
    "fastinfer::sparse_int8_linear",
    "(Tensor x, Tensor packed, Tensor w_scale, Tensor? bias, int act=0) -> Tensor",
)
torch.library.define("fastinfer::sparse_int8_matmul", "(Tensor a, Tensor packed, int n) -> Tensor")


@torch.library.register_fake("fastinfer::quantize_per_token")
def _quantize_per_token_fake(x):
    check_float_input("quantize_per_token", x)
    return torch.empty_like(x, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.register_fake("fastinfer::pack_int8_weight")
def _pack_fake(w):
    check_int8_2d("pack_int8_weight", "w", w)
    return w.new_empty((packed_nbytes(w.shape[0], w.shape[1]),), dtype=torch.uint8)


@torch.library.register_fake("fastinfer::unpack_int8_weight")
def _unpack_fake(packed, n, k):
    return packed.new_empty((n, k), dtype=torch.int8)


@torch.library.register_fake("fastinfer::int8_matmul")
def _int8_matmul_fake(a, w):
    check_int8_2d("int8_matmul", "a", a)
    check_int8_2d("int8_matmul", "w", w)
    torch._check(a.shape[1] == w.shape[1], lambda: "fastinfer.int8_matmul: K of a and w must match")
    return a.new_empty((a.shape[0], w.shape[0]), dtype=torch.int32)


@torch.library.register_fake("fastinfer::int8_matmul_packed")
def _int8_matmul_packed_fake(a, packed, n):
    check_int8_2d("int8_matmul", "a", a)
    return a.new_empty((a.shape[0], n), dtype=torch.int32)


@torch.library.register_fake("fastinfer::int8_linear")
def _int8_linear_fake(x, packed, w_scale, bias, act=0, residual=None):
    check_float_input("int8_linear", x)
    activation_name("int8_linear", act)
    n = check_int8_linear_params(packed, w_scale, bias)
    check_residual("int8_linear", residual, (*x.shape[:-1], n), x.dtype)
    return x.new_empty((*x.shape[:-1], n))


@torch.library.register_fake("fastinfer::static_int8_linear")
def _static_int8_linear_fake(x, packed, w_scale, bias, x_scale, act=0, residual=None):
    check_float_input("static_int8_linear", x)
    activation_name("static_int8_linear", act)
    check_input_scale("static_int8_linear", x_scale)
    n = check_int8_linear_params(packed, w_scale, bias, "static_int8_linear")
    check_residual("static_int8_linear", residual, (*x.shape[:-1], n), x.dtype)
    return x.new_empty((*x.shape[:-1], n))


@torch.library.register_fake("fastinfer::weight_only_linear")
def _weight_only_linear_fake(x, packed, w_scale, bias, act=0):
    check_float_input("weight_only_linear", x)
    activation_name("weight_only_linear", act)
    n = check_int8_linear_params(packed, w_scale, bias, "weight_only_linear")
    return x.new_empty((*x.shape[:-1], n))


@torch.library.register_fake("fastinfer::sparse_linear")
def _sparse_linear_fake(x, packed, bias, n):
    check_float_input("sparse_linear", x)
    return x.new_empty((*x.shape[:-1], n))


@torch.library.register_fake("fastinfer::sparse_int8_linear")
def _sparse_int8_linear_fake(x, packed, w_scale, bias, act=0):
    check_float_input("sparse_int8_linear", x)
    activation_name("sparse_int8_linear", act)
    n = check_scale_bias("sparse_int8_linear", w_scale, bias)
    return x.new_empty((*x.shape[:-1], n))


@torch.library.register_fake("fastinfer::sparse_int8_matmul")
def _sparse_int8_matmul_fake(a, packed, n):
    return a.new_empty((a.shape[0], n), dtype=torch.int32)
