"""Sparse ops on the CPU ("fastinfer::sparse_*"): packing to the engine's sparse formats,
validation, and the kernels behind fastinfer.nn.SparseLinear / SparseInt8Linear (schemas and fakes
in fastinfer/ops/_schema.py).

Formats (see csrc/cpu/sparse.h): "csr" (unstructured, fp32 or int8 values, uint16 column indices
up to K = 65536), "2:4" (int8; at most 2 nonzeros in every group of 4 inputs), "block" (int8; 16 x 64
tiles, all-zero tiles skipped), "ell" (int8, unstructured: 16-channel steps of 4 nonzeros per
channel with 1-byte indices into a 128-input window that slides with the block's least advanced
channel, activations gathered in registers with vpermi2b; as float32, one nonzero per channel and
step in a 64-input window, gathered with vpermi2ps).

On CUDA only "2:4" has a kernel (mma.sp; the SP24 layout of fastinfer/_cuda_layout.py): pack_sparse
of a CUDA int8 tensor builds it, and sparse_info / sparse_nonzeros / unpack_sparse / sparse_validate
read it. pack_sparse of a CUDA tensor in another format raises.
"""

from __future__ import annotations

import torch

from fastinfer import _cuda_layout
from fastinfer._runtime import _C
from fastinfer.ops import _prepared, _schema  # noqa: F401  (_schema: the ops these kernels serve)
from fastinfer.ops._common import (
    activation_name,
    aligned_empty,
    check_device,
    check_float_input,
    check_scale_bias,
    check_tensor,
    eager_fast_path,
    has_data,
    linear_entry,
    register,
    ValidatedBuffers,
)

# The formats: name -> {weight dtype: the engine's format code (the packed header's)}. A new format
# is one row here (and its C++ side); everything in Python that names formats reads this table.
FORMAT_CODES: dict[str, dict[torch.dtype, int]] = {
    "csr": {torch.float32: 1, torch.int8: 2},
    "2:4": {torch.int8: 3},
    "block": {torch.int8: 4},
    "ell": {torch.int8: 5, torch.float32: 6},
}
FORMATS = tuple(FORMAT_CODES)
_FORMAT_OF_CODE = {code: (fmt, dtype) for fmt, codes in FORMAT_CODES.items() for dtype, code in codes.items()}


def formats_for(dtype: torch.dtype) -> tuple[str, ...]:
    """The formats that store weights of `dtype` (float32: "csr", "ell"; int8: every format)."""
    return tuple(fmt for fmt, codes in FORMAT_CODES.items() if dtype in codes)


# ------------------------------------------------------------------------------ packing and checks


def pack_sparse(w: torch.Tensor, format: str = "csr") -> torch.Tensor:
    """Packs a dense weight [N, K] (float32 for "csr" and "ell"; int8 for every format) into the
    engine's sparse format: a 1-D uint8 tensor with a versioned header. Zeros (and -0.0) are not
    stored. "2:4" raises ValueError when a group of 4 inputs holds more than 2 nonzeros."""
    w = check_tensor("pack_sparse", "w", w)
    check_device("pack_sparse", w=w)
    if format not in FORMAT_CODES:
        raise ValueError(f"fastinfer.pack_sparse: unknown format {format!r}; valid: {', '.join(FORMATS)}")
    if w.dim() != 2:
        raise ValueError(f"fastinfer.pack_sparse: w must be 2-D [N, K], got shape {tuple(w.shape)}")
    code = FORMAT_CODES[format].get(w.dtype)
    if code is None:
        want = " or ".join(sorted(str(d).removeprefix("torch.") for d in FORMAT_CODES[format]))
        raise TypeError(f"fastinfer.pack_sparse: format {format!r} needs {want} weights, got {w.dtype}")
    if not has_data(w):
        raise ValueError("fastinfer.pack_sparse: w has no data (meta or fake tensor)")
    if w.dtype == torch.float32 and not torch.isfinite(w).all():
        raise ValueError("fastinfer.pack_sparse: w has NaN or Inf")
    if w.device.type == "cuda":
        return _pack_cuda(w, format)
    n, k = w.shape
    w2 = w.contiguous()
    nbytes = _C.sparse_measure(code, w2.data_ptr(), n, k, k)
    with torch.inference_mode(False):  # a normal tensor: its version counter guards the validation cache
        out = aligned_empty(nbytes)
    _C.sparse_pack(code, w2.data_ptr(), n, k, k, out.data_ptr(), nbytes)
    _VALID.remember(out)
    return out


def _pack_cuda(w: torch.Tensor, format: str) -> torch.Tensor:
    if format != "2:4":
        raise ValueError(
            f"fastinfer.pack_sparse: on CUDA only the '2:4' format has a kernel; pack {format!r} on the CPU, "
            "or prune to 2:4 for the GPU"
        )
    try:
        with torch.inference_mode(False):
            return _cuda_layout.pack_sp24(w)
    except ValueError as e:
        raise ValueError(f"fastinfer.pack_sparse: {e}") from None


def _header(packed: torch.Tensor) -> tuple[str, torch.dtype, int, int, int]:
    """(format, weight dtype, n, k, nnz) of a checked packed sparse weight (a GPU 2:4 weight counts
    its kept slots, two per group of 4 inputs, padding groups included)."""
    if packed.device.type == "cuda":
        h = packed[16:32].cpu().view(torch.int64)
        n, k = int(h[0]), int(h[1])
        return "2:4", torch.int8, n, k, n * _cuda_layout.sp24_sizes(n, k)[1] // 2
    code, n, k, nnz = _C.sparse_info(packed.data_ptr(), packed.numel())
    return (*_FORMAT_OF_CODE[code], n, k, nnz)


def sparse_info(packed: torch.Tensor) -> dict:
    """{"format", "dtype", "n", "k", "nnz", "nbytes"} of a packed sparse weight (nnz: stored values for
    "csr", kept slots for "2:4", nonzero tiles for "block")."""
    packed = check_packed("sparse_info", packed)
    fmt, dtype, n, k, nnz = _header(packed)
    return {"format": fmt, "dtype": dtype, "n": n, "k": k, "nnz": nnz, "nbytes": packed.numel()}


def sparse_nonzeros(packed: torch.Tensor) -> int:
    """How many weights of a packed sparse weight are nonzero, counted from its stored values (time
    O(stored bytes), no memory): never the dense [N, K]."""
    packed = check_packed("sparse_nonzeros", packed)
    if packed.device.type == "cuda":
        n, _, _, _, vals, _ = _cuda_layout.sp24_parts(packed)
        return int((vals[:n] != 0).sum())
    return _C.sparse_count_nonzero(packed.data_ptr(), packed.numel())


# How many weights (padded to 16 x 64) unpack_sparse allocates for a buffer it is given: a valid
# buffer may declare a shape far larger than itself (an all-zero [n, k] csr is ~8n bytes), so a
# 256-byte file could otherwise ask for gigabytes. Real pruned layers sit far inside (a 99.9%-sparse
# 4096 x 4096 csr: ~130 weights a stored byte); a layer unpacking its own weight, whose shape
# load_state_dict checked against the layer's, is not bounded.
UNPACK_FREE_WEIGHTS = 1 << 26
UNPACK_WEIGHTS_PER_BYTE = 4096


def unpack_sparse(packed: torch.Tensor, *, bounded: bool = True) -> torch.Tensor:
    """The dense weight [N, K] (float32 or int8) a packed sparse weight holds.

    bounded: refuse (ValueError, before allocating) a buffer whose padded dense size passes
    max(2^26, 4096 x its bytes) weights; pass False for a buffer whose shape you trust."""
    packed = check_packed("unpack_sparse", packed)
    if packed.device.type == "cuda":  # its size is its shape's (checked): no bound needed
        return _cuda_layout.unpack_sp24(packed).to(packed.device)
    _, dtype, n, k, _ = _header(packed)
    padded = (n + 15) // 16 * 16 * ((k + 63) // 64 * 64)
    if bounded and padded > max(UNPACK_FREE_WEIGHTS, UNPACK_WEIGHTS_PER_BYTE * packed.numel()):
        raise ValueError(
            f"fastinfer.unpack_sparse: the buffer declares [{n}, {k}] ({padded} padded weights) in "
            f"{packed.numel()} bytes; unpack allocates at most max(2^26, {UNPACK_WEIGHTS_PER_BYTE} x its bytes) "
            "weights for a buffer it is given (pass bounded=False if you trust its shape)"
        )
    out = torch.empty((n, k), dtype=dtype)
    _C.sparse_unpack(packed.data_ptr(), packed.numel(), out.data_ptr())
    return out


_VALID = ValidatedBuffers()  # sparse buffers that passed _C.sparse_validate (see ValidatedBuffers)


def sparse_validate(packed: torch.Tensor) -> None:
    """Full O(nnz) check of a packed sparse weight (pointers, indices, masks); ValueError if corrupt.
    The ops run it once per tensor version by themselves."""
    check_packed("sparse_validate", packed, force=True)


def check_packed(name: str, packed: torch.Tensor, force: bool = False) -> torch.Tensor:
    """The validated, 64-byte aligned buffer of a packed sparse weight (packed itself, or a copy)."""
    packed = check_tensor(name, "packed", packed)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise TypeError(f"fastinfer.{name}: packed must be a 1-D uint8 tensor from pack_sparse")
    if not packed.is_contiguous():
        raise ValueError(f"fastinfer.{name}: packed must be contiguous")
    if not has_data(packed):
        raise ValueError(f"fastinfer.{name}: packed has no data (meta or fake tensor)")
    if packed.device.type == "cuda":
        from fastinfer.ops.cuda import sp24_validate  # noqa: PLC0415  (the CUDA side, loaded on use)

        sp24_validate(name, packed, force)
        return packed
    return _VALID.checked(packed, _C.sparse_validate, force)


def _check_int8_packed(name: str, packed: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    packed = check_packed(name, packed)
    _, dtype, pn, pk, _ = _header(packed)
    if dtype != torch.int8:
        raise TypeError(f"fastinfer.{name}: packed holds float32 weights; use sparse_linear")
    return packed, pn, pk


def prepare_sparse_linear(
    packed: torch.Tensor, bias: torch.Tensor | None, n: int, k: int
) -> _prepared.SparseLinearCall:
    """The checked weight side of sparse_linear for inputs [..., k]: what its CPU kernel runs, and
    what a SparseLinear keeps for its eager calls."""
    packed = check_packed("sparse_linear", packed)
    _, dtype, pn, pk, _ = _header(packed)
    if dtype != torch.float32:
        raise TypeError("fastinfer.sparse_linear: packed holds int8 weights; use sparse_int8_linear")
    if pn != n or pk != k:
        raise ValueError(f"fastinfer.sparse_linear: input has K={k}, expected N={n}, but the weight is [{pn}, {pk}]")
    if bias is not None and (bias.dtype != torch.float32 or tuple(bias.shape) != (n,)):
        raise TypeError(f"fastinfer.sparse_linear: bias must be float32 [{n}]")
    return _prepared.SparseLinearCall(packed, bias, n, k)


def prepare_sparse_int8_linear(
    packed: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, k: int, act: int = 0
) -> _prepared.Int8LinearCall:
    """The checked weight side of sparse_int8_linear for inputs [..., k] and activation code act
    (see prepare_sparse_linear)."""
    n = check_scale_bias("sparse_int8_linear", w_scale, bias)
    activation_name("sparse_int8_linear", act)
    packed, pn, pk = _check_int8_packed("sparse_int8_linear", packed)
    if pn != n or pk != k:
        raise ValueError(
            f"fastinfer.sparse_int8_linear: input has K={k} and w_scale N={n}, but the weight is [{pn}, {pk}]"
        )
    return _prepared.Int8LinearCall(_C.sparse_int8_linear, packed, w_scale, bias, n, k, act)


# ------------------------------------------------------------------------------------- CPU kernels


@register("sparse_linear", "cpu")
def _sparse_linear_cpu(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
    check_float_input("sparse_linear", x)
    return prepare_sparse_linear(packed, bias, n, x.shape[-1])(x)


@register("sparse_int8_linear", "cpu")
def _sparse_int8_linear_cpu(
    x: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, act: int = 0
) -> torch.Tensor:
    check_float_input("sparse_int8_linear", x)
    return prepare_sparse_int8_linear(packed, w_scale, bias, x.shape[-1], act)(x)


@register("sparse_int8_matmul", "cpu")
def _sparse_int8_matmul_cpu(a: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    if a.dtype != torch.int8 or a.dim() != 2:
        raise TypeError(f"fastinfer.sparse_int8_matmul: a must be a 2-D int8 tensor, got {a.dtype} {tuple(a.shape)}")
    packed, pn, pk = _check_int8_packed("sparse_int8_matmul", packed)
    k = a.shape[1]
    if pn != n or pk != k:
        raise ValueError(f"fastinfer.sparse_int8_matmul: a has K={k}, expected N={n}, but the weight is [{pn}, {pk}]")
    return _prepared.int8_matmul(_C.sparse_int8_matmul, a, packed, n)


# -------------------------------------------------------------------------------------- public API


def sparse_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, n: int
) -> torch.Tensor:
    """x [..., K] (float32 or bfloat16) @ W^T + bias with W a packed fp32 "csr" or "ell" weight [n, K];
    fp32 accumulation (in a different order than a dense matmul: results agree to fp32 rounding)."""
    x = check_tensor("sparse_linear", "x", x)
    check_device("sparse_linear", x=x, packed=packed, bias=bias)
    if eager_fast_path(x):
        return _sparse_linear_cpu(x, packed, bias, n)
    return torch.ops.fastinfer.sparse_linear(x, packed, bias, n)


def sparse_int8_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """int8_linear with a packed sparse int8 weight: same per-token quantization, exact int32
    accumulation over the stored nonzeros, same fp32 epilogue and activation (None or "gelu";
    equal to the dense Int8Linear bit for bit)."""
    return linear_entry("sparse_int8_linear", _sparse_int8_linear_cpu, x, packed, w_scale, bias, activation)


def sparse_int8_matmul(a: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    """Exact int32 [M, N] = a int8 [M, K] @ W^T for a packed sparse int8 weight W [N, K]."""
    a = check_tensor("sparse_int8_matmul", "a", a)
    check_device("sparse_int8_matmul", a=a, packed=packed)
    return torch.ops.fastinfer.sparse_int8_matmul(a, packed, n)
