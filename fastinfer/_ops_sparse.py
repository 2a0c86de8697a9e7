"""Sparse ops ("fastinfer::sparse_*"): packing to the engine's sparse formats, validation, and the
torch.library ops behind fastinfer.nn.SparseLinear / SparseInt8Linear. Re-exported by fastinfer.ops.

Formats (see csrc/cpu/sparse.h): "csr" (unstructured, fp32 or int8 values, uint16 column indices
up to K = 65536), "2:4" (int8; at most 2 nonzeros in every group of 4 inputs), "block" (int8; 16 x 64
tiles, all-zero tiles skipped), "ell" (int8, unstructured: 16-channel steps of 4 nonzeros per
channel with 1-byte indices into a 128-input window that slides with the block's least advanced
channel, activations gathered in registers with vpermi2b; as float32, one nonzero per channel and
step in a 64-input window, gathered with vpermi2ps).
"""

from __future__ import annotations

import weakref

import torch

from fastinfer import _C
from fastinfer.ops import (
    _aligned_empty,
    _check_cpu,
    _check_float_input,
    _check_scale_bias,
    _check_tensor,
    _cpu_kernel,
    _eager_fast_path,
    _has_data,
    _new_output,
    _rows,
    _run_int8_linear,
    _run_int8_matmul,
)

FORMATS = ("csr", "2:4", "block", "ell")
_CODE = {("csr", torch.float32): 1, ("csr", torch.int8): 2, ("2:4", torch.int8): 3, ("block", torch.int8): 4,
         ("ell", torch.int8): 5, ("ell", torch.float32): 6}  # fmt: skip
_NAME = {v: k for k, v in _CODE.items()}
TILE = (16, 64)  # block format tile: output channels x inputs

torch.library.define("fastinfer::sparse_linear", "(Tensor x, Tensor packed, Tensor? bias, int n) -> Tensor")
torch.library.define(
    "fastinfer::sparse_int8_linear", "(Tensor x, Tensor packed, Tensor w_scale, Tensor? bias) -> Tensor"
)
torch.library.define("fastinfer::sparse_int8_matmul", "(Tensor a, Tensor packed, int n) -> Tensor")


# ------------------------------------------------------------------------------ packing and checks


def pack_sparse(w: torch.Tensor, format: str = "csr") -> torch.Tensor:
    """Packs a dense weight [N, K] (float32 for "csr" and "ell"; int8 for every format) into the
    engine's sparse format: a 1-D uint8 tensor with a versioned header. Zeros (and -0.0) are not
    stored. "2:4" raises ValueError when a group of 4 inputs holds more than 2 nonzeros."""
    w = _check_tensor("pack_sparse", "w", w)
    _check_cpu("pack_sparse", w=w)
    if format not in FORMATS:
        raise ValueError(f"fastinfer.pack_sparse: unknown format {format!r}; valid: {', '.join(FORMATS)}")
    if w.dim() != 2:
        raise ValueError(f"fastinfer.pack_sparse: w must be 2-D [N, K], got shape {tuple(w.shape)}")
    if (format, w.dtype) not in _CODE:
        want = "float32 or int8" if format in ("csr", "ell") else "int8"
        raise TypeError(f"fastinfer.pack_sparse: format {format!r} needs {want} weights, got {w.dtype}")
    if not _has_data(w):
        raise ValueError("fastinfer.pack_sparse: w has no data (meta or fake tensor)")
    if w.dtype == torch.float32 and not torch.isfinite(w).all():
        raise ValueError("fastinfer.pack_sparse: w has NaN or Inf")
    code = _CODE[(format, w.dtype)]
    n, k = w.shape
    w2 = w.contiguous()
    nbytes = _C.sparse_measure(code, w2.data_ptr(), n, k, k)
    with torch.inference_mode(False):  # a normal tensor: its version counter guards the validation cache
        out = _aligned_empty(nbytes)
    _C.sparse_pack(code, w2.data_ptr(), n, k, k, out.data_ptr(), nbytes)
    _remember_valid(out)
    return out


def sparse_info(packed: torch.Tensor) -> dict:
    """{"format", "dtype", "n", "k", "nnz", "nbytes"} of a packed sparse weight (nnz: stored values for
    "csr", kept slots for "2:4", nonzero tiles for "block")."""
    packed = _check_packed("sparse_info", packed)
    code, n, k, nnz = _C.sparse_info(packed.data_ptr(), packed.numel())
    fmt, dtype = _NAME[code]
    return {"format": fmt, "dtype": dtype, "n": n, "k": k, "nnz": nnz, "nbytes": packed.numel()}


def unpack_sparse(packed: torch.Tensor) -> torch.Tensor:
    """The dense weight [N, K] (float32 or int8) a packed sparse weight holds."""
    packed = _check_packed("unpack_sparse", packed)
    code, n, k, _ = _C.sparse_info(packed.data_ptr(), packed.numel())
    out = torch.empty((n, k), dtype=_NAME[code][1])
    _C.sparse_unpack(packed.data_ptr(), packed.numel(), out.data_ptr())
    return out


# Tensors whose bytes passed the O(nnz) validation: id(tensor) -> (weak reference to that tensor,
# (address, size, version) when it was checked). A hit needs the same live tensor object with the
# same version: any in-place write through torch bumps the version, and a new tensor at a reused
# address is a different object. Writes that bypass torch's version counter (through .numpy(),
# .data or raw pointers) are not seen: call fastinfer.ops.sparse_validate(packed) after those.
# Inference tensors have no version counter: they are validated on every call.
_VALID: dict[int, tuple[weakref.ref, tuple[int, int, int]]] = {}
_VALID_MAX = 16384


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors do not track versions
        return None


def _is_known_valid(t: torch.Tensor) -> bool:
    ver = _version(t)
    entry = _VALID.get(id(t))
    return ver is not None and entry is not None and entry[0]() is t and entry[1] == (t.data_ptr(), t.numel(), ver)


def _remember_valid(t: torch.Tensor) -> None:
    ver = _version(t)
    if ver is None:
        return
    if len(_VALID) >= _VALID_MAX:
        _VALID.clear()
    _VALID[id(t)] = (weakref.ref(t), (t.data_ptr(), t.numel(), ver))


def sparse_validate(packed: torch.Tensor) -> None:
    """Full O(nnz) check of a packed sparse weight (pointers, indices, masks); ValueError if corrupt.
    The ops run it once per tensor version by themselves."""
    _check_packed("sparse_validate", packed, force=True)


def _check_packed(name: str, packed: torch.Tensor, force: bool = False) -> torch.Tensor:
    packed = _check_tensor(name, "packed", packed)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise TypeError(f"fastinfer.{name}: packed must be a 1-D uint8 tensor from pack_sparse")
    if not packed.is_contiguous():
        raise ValueError(f"fastinfer.{name}: packed must be contiguous")
    if not _has_data(packed):
        raise ValueError(f"fastinfer.{name}: packed has no data (meta or fake tensor)")
    source, use = packed, packed
    if packed.data_ptr() % 64 != 0:  # the kernels want 64-byte alignment: a per-call copy
        with torch.inference_mode(False):
            use = _aligned_empty(packed.numel())
        use.copy_(packed)
    if force or not _is_known_valid(source):
        _C.sparse_validate(use.data_ptr(), use.numel())
        _remember_valid(source)
    return use


# --------------------------------------------------------------------------------- CPU kernels


def _header(name: str, packed: torch.Tensor) -> tuple[str, torch.dtype, int, int]:
    code, n, k, _ = _C.sparse_info(packed.data_ptr(), packed.numel())
    return (*_NAME[code], n, k)


@_cpu_kernel("sparse_linear")
def _sparse_linear_cpu(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
    _check_float_input("sparse_linear", x)
    packed = _check_packed("sparse_linear", packed)
    fmt, dtype, pn, pk = _header("sparse_linear", packed)
    if dtype != torch.float32:
        raise TypeError("fastinfer.sparse_linear: packed holds int8 weights; use sparse_int8_linear")
    k = x.shape[-1]
    if pn != n or pk != k:
        raise ValueError(f"fastinfer.sparse_linear: input has K={k}, expected N={n}, but the weight is [{pn}, {pk}]")
    if bias is not None and (bias.dtype != torch.float32 or tuple(bias.shape) != (n,)):
        raise TypeError(f"fastinfer.sparse_linear: bias must be float32 [{n}]")
    out = _new_output((*x.shape[:-1], n), torch.float32)
    if out.numel() == 0:
        return out.to(x.dtype)
    if k == 0:
        return out.copy_(bias.expand_as(out) if bias is not None else out.zero_()).to(x.dtype)
    x2, ld = _rows(x.float() if x.dtype != torch.float32 else x)
    bias = bias.contiguous() if bias is not None else None
    _C.sparse_linear_f32(
        x2.data_ptr(), x2.shape[0], k, ld, packed.data_ptr(), packed.numel(),
        bias.data_ptr() if bias is not None else 0, out.data_ptr(), n,
    )  # fmt: skip
    return out if x.dtype == torch.float32 else out.to(x.dtype)


def _check_int8_packed(name: str, packed: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    packed = _check_packed(name, packed)
    _, dtype, pn, pk = _header(name, packed)
    if dtype != torch.int8:
        raise TypeError(f"fastinfer.{name}: packed holds float32 weights; use sparse_linear")
    return packed, pn, pk


@_cpu_kernel("sparse_int8_linear")
def _sparse_int8_linear_cpu(
    x: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    _check_float_input("sparse_int8_linear", x)
    n = _check_scale_bias("sparse_int8_linear", w_scale, bias)
    packed, pn, pk = _check_int8_packed("sparse_int8_linear", packed)
    k = x.shape[-1]
    if pn != n or pk != k:
        raise ValueError(
            f"fastinfer.sparse_int8_linear: input has K={k} and w_scale N={n}, but the weight is [{pn}, {pk}]"
        )
    return _run_int8_linear(_C.sparse_int8_linear, x, packed, w_scale, bias, n)


@_cpu_kernel("sparse_int8_matmul")
def _sparse_int8_matmul_cpu(a: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    if a.dtype != torch.int8 or a.dim() != 2:
        raise TypeError(f"fastinfer.sparse_int8_matmul: a must be a 2-D int8 tensor, got {a.dtype} {tuple(a.shape)}")
    packed, pn, pk = _check_int8_packed("sparse_int8_matmul", packed)
    m, k = a.shape
    if pn != n or pk != k:
        raise ValueError(f"fastinfer.sparse_int8_matmul: a has K={k}, expected N={n}, but the weight is [{pn}, {pk}]")
    return _run_int8_matmul(_C.sparse_int8_matmul, a, packed, n)


def _make_cuda_refusal(opname: str):
    def refuse(*args, **kwargs):
        raise RuntimeError(
            f"fastinfer.{opname}: CUDA tensors are not supported yet (the CUDA backend is not built); "
            "move the inputs and the module to the CPU"
        )

    return refuse


for _op in ("sparse_linear", "sparse_int8_linear", "sparse_int8_matmul"):
    torch.library.register_kernel(f"fastinfer::{_op}", "cuda", _make_cuda_refusal(_op))


# ------------------------------------------------------------------------------------------ fakes


@torch.library.register_fake("fastinfer::sparse_linear")
def _sparse_linear_fake(x, packed, bias, n):
    _check_float_input("sparse_linear", x)
    return x.new_empty((*x.shape[:-1], n))


@torch.library.register_fake("fastinfer::sparse_int8_linear")
def _sparse_int8_linear_fake(x, packed, w_scale, bias):
    _check_float_input("sparse_int8_linear", x)
    n = _check_scale_bias("sparse_int8_linear", w_scale, bias)
    return x.new_empty((*x.shape[:-1], n))


@torch.library.register_fake("fastinfer::sparse_int8_matmul")
def _sparse_int8_matmul_fake(a, packed, n):
    return a.new_empty((a.shape[0], n), dtype=torch.int32)


# ------------------------------------------------------------------------------------- public API


def sparse_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, n: int
) -> torch.Tensor:
    """x [..., K] (float32 or bfloat16) @ W^T + bias with W a packed fp32 "csr" weight [n, K]; fp32
    accumulation (in a different order than a dense matmul: results agree to fp32 rounding)."""
    x = _check_tensor("sparse_linear", "x", x)
    _check_cpu("sparse_linear", x=x, packed=packed, bias=bias)
    if _eager_fast_path(x):
        return _sparse_linear_cpu(x, packed, bias, n)
    return torch.ops.fastinfer.sparse_linear(x, packed, bias, n)


def sparse_int8_linear(
    x: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """int8_linear with a packed sparse int8 weight: same per-token quantization, exact int32
    accumulation over the stored nonzeros, same fp32 epilogue (equal to the dense Int8Linear bit for bit)."""
    x = _check_tensor("sparse_int8_linear", "x", x)
    _check_cpu("sparse_int8_linear", x=x, packed=packed, w_scale=w_scale, bias=bias)
    if _eager_fast_path(x):
        return _sparse_int8_linear_cpu(x, packed, w_scale, bias)
    return torch.ops.fastinfer.sparse_int8_linear(x, packed, w_scale, bias)


def sparse_int8_matmul(a: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    """Exact int32 [M, N] = a int8 [M, K] @ W^T for a packed sparse int8 weight W [N, K]."""
    a = _check_tensor("sparse_int8_matmul", "a", a)
    _check_cpu("sparse_int8_matmul", a=a, packed=packed)
    return torch.ops.fastinfer.sparse_int8_matmul(a, packed, n)
