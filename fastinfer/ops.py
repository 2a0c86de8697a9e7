"""fastinfer's torch.library ops ("fastinfer::..."): validation, output allocation, fake impls.

Tensors reach the compiled kernels as data_ptr() integers with sizes and row strides; the kernels
never see torch. Every op is opaque to torch.compile / torch.export and passes opcheck.
"""

from __future__ import annotations

import math

import torch

from fastinfer import _C

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1}

torch.library.define("fastinfer::quantize_per_token", "(Tensor x) -> (Tensor, Tensor)")
torch.library.define("fastinfer::pack_int8_weight", "(Tensor w) -> Tensor")
torch.library.define("fastinfer::unpack_int8_weight", "(Tensor packed, int n, int k) -> Tensor")
torch.library.define("fastinfer::int8_matmul", "(Tensor a, Tensor w) -> Tensor")
torch.library.define("fastinfer::int8_matmul_packed", "(Tensor a, Tensor packed, int n) -> Tensor")
torch.library.define(
    "fastinfer::int8_linear", "(Tensor x, Tensor packed, Tensor w_scale, Tensor? bias) -> Tensor"
)


# ---------------------------------------------------------------- checks shared by kernels and fakes


def _check_cpu(name: str, **tensors: torch.Tensor | None) -> None:
    """CPU, CUDA (the CUDA kernels say when their backend is missing) and meta tensors only."""
    for arg, t in tensors.items():
        if t is not None and t.device.type not in ("cpu", "cuda", "meta"):
            raise RuntimeError(f"fastinfer.{name}: {arg} is on {t.device}; fastinfer runs on CPU and CUDA tensors")


def _check_tensor(name: str, arg: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fastinfer.{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _check_float_input(name: str, x: torch.Tensor) -> None:
    if x.dtype not in _DTYPE_CODE:
        raise TypeError(f"fastinfer.{name}: x must be float32 or bfloat16, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"fastinfer.{name}: x must have at least 1 dimension [..., K], got a scalar")


def _check_int8_2d(name: str, arg: str, t: torch.Tensor) -> None:
    if t.dtype != torch.int8:
        raise TypeError(f"fastinfer.{name}: {arg} must be int8, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"fastinfer.{name}: {arg} must be 2-D, got shape {tuple(t.shape)}")


def _rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(2-D view [rows, K] with unit inner stride, its row stride in elements).

    Copies only when the layout needs it. A single row's stride(0) is meaningless (a [1, K] slice of
    a transposed tensor may report 1), so one row gets K."""
    t2 = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    rows, k = t2.shape
    if (k > 1 and t2.stride(-1) != 1) or (rows > 1 and t2.stride(0) < k):
        t2 = t2.contiguous()
    return t2, (t2.stride(0) if rows > 1 else k)


def _packed_nk(name: str, packed: torch.Tensor) -> tuple[int, int]:
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise TypeError(f"fastinfer.{name}: packed must be a 1-D uint8 tensor from pack_int8_weight")
    if not packed.is_contiguous():
        raise ValueError(f"fastinfer.{name}: packed must be contiguous")
    if not _has_data(packed):
        raise ValueError(
            f"fastinfer.{name}: packed is a {packed.device.type} / fake tensor with no data, so its "
            "header cannot be read; pass the weight shape (n, k) explicitly"
        )
    return _C.packed_shape(packed.data_ptr(), packed.numel())


def _has_data(t: torch.Tensor) -> bool:
    """True for a real CPU tensor whose bytes can be read (not meta, not a FakeTensor)."""
    if t.device.type != "cpu":
        return False
    if type(t) is torch.Tensor:  # the common case, decided without the subclass check below
        return True
    from torch._subclasses.fake_tensor import is_fake

    return not is_fake(t) and (t.numel() == 0 or t.data_ptr() != 0)


# ---------------------------------------------------------------------------------- kernels (CPU)


def _cpu_kernel(opname: str):
    """Registers fn as the CPU kernel of fastinfer::opname and keeps it callable from Python."""

    def wrap(fn):
        torch.library.register_kernel(f"fastinfer::{opname}", "cpu", fn)
        return fn

    return wrap


@_cpu_kernel("quantize_per_token")
def _quantize_per_token_cpu(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_float_input("quantize_per_token", x)
    k = x.shape[-1]
    q = torch.empty(x.shape, dtype=torch.int8)
    scale = torch.empty(x.shape[:-1], dtype=torch.float32)
    if x.numel() == 0:
        scale.zero_()
        return q, scale
    x2, ld = _rows(x)
    _C.quantize_per_token(
        x2.data_ptr(), _DTYPE_CODE[x.dtype], x2.shape[0], k, ld, q.data_ptr(), k, scale.data_ptr()
    )
    return q, scale


@_cpu_kernel("pack_int8_weight")
def _pack_cpu(w: torch.Tensor) -> torch.Tensor:
    _check_int8_2d("pack_int8_weight", "w", w)
    n, k = w.shape
    w2, ld = _rows(w) if n > 0 and k > 0 else (w.contiguous(), k)
    out = _aligned_empty(packed_nbytes(n, k))
    _C.pack_weight(w2.data_ptr(), n, k, max(ld, k), out.data_ptr(), out.numel())
    return out


def _aligned_empty(nbytes: int) -> torch.Tensor:
    """uint8 buffer whose data is 64-byte aligned (the kernels use aligned vector loads).

    torch's CPU allocator aligns to 64 bytes; the check keeps us honest if that ever changes.
    """
    out = torch.empty(nbytes, dtype=torch.uint8)
    if out.data_ptr() % 64 != 0:
        raise RuntimeError("fastinfer: torch returned a buffer that is not 64-byte aligned")
    return out


# Outputs at least this large get their own huge-page mapping (see csrc/cpu/large_buffer.h): a
# fresh 32 MiB tensor costs ~8 ms of page faults with 4 KiB pages, ~1-2 ms with 2 MiB pages.
# Such a tensor behaves like any other (views, pickling, share_memory_) except that its storage
# cannot be resized: resize_() to a larger size, or passing it as out= to an op that must grow it,
# raises "Trying to resize storage that is not resizable".
LARGE_OUTPUT_BYTES = 8 << 20


def _new_output(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    numel = math.prod(shape)
    nbytes = numel * dtype.itemsize
    if nbytes < LARGE_OUTPUT_BYTES:
        return torch.empty(shape, dtype=dtype)
    # frombuffer keeps a reference to the LargeBuffer for the tensor's lifetime (unmapped after)
    return torch.frombuffer(_C.LargeBuffer(nbytes), dtype=dtype, count=numel).view(shape)


def packed_nbytes(n, k):
    """Size in bytes of pack_int8_weight's output for weights [n, k] (works on symbolic sizes)."""
    np_, kp = (n + 15) // 16 * 16, (k + 63) // 64 * 64
    return 64 + 4 * np_ + np_ * kp


@_cpu_kernel("unpack_int8_weight")
def _unpack_cpu(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    pn, pk = _packed_nk("unpack_int8_weight", _ensure_aligned(packed))
    if (pn, pk) != (n, k):
        raise ValueError(f"fastinfer.unpack_int8_weight: packed holds [{pn}, {pk}], asked for [{n}, {k}]")
    packed = _ensure_aligned(packed)
    w = torch.empty((n, k), dtype=torch.int8)
    _C.unpack_weight(packed.data_ptr(), packed.numel(), w.data_ptr())
    return w


def _ensure_aligned(packed: torch.Tensor) -> torch.Tensor:
    if not _has_data(packed) or packed.data_ptr() % 64 == 0:
        return packed
    out = _aligned_empty(packed.numel())
    out.copy_(packed)
    return out


def _matmul_packed(a: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    _check_int8_2d("int8_matmul", "a", a)
    packed = _ensure_aligned(packed)
    pn, pk = _packed_nk("int8_matmul", packed)
    if pn != n:
        raise ValueError(f"fastinfer.int8_matmul: packed weight has N={pn}, expected {n}")
    m, k = a.shape
    if k != pk:
        raise ValueError(f"fastinfer.int8_matmul: a has K={k} but w has K={pk}")
    return _run_int8_matmul(_C.int8_matmul, a, packed, n)


def _run_int8_matmul(kernel, a: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    """The checked exact int8 matmul, dense or sparse: output, empty and K = 0 cases, row layout, then
    kernel (_C.int8_matmul or _C.sparse_int8_matmul, same arguments) on the checked packed weight."""
    m, k = a.shape
    out = _new_output((m, n), torch.int32)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    a2, ld = _rows(a)
    kernel(a2.data_ptr(), m, k, ld, packed.data_ptr(), packed.numel(), out.data_ptr(), n)
    return out


@_cpu_kernel("int8_matmul")
def _int8_matmul_cpu(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    _check_int8_2d("int8_matmul", "a", a)
    _check_int8_2d("int8_matmul", "w", w)
    if a.shape[1] != w.shape[1]:
        raise ValueError(
            f"fastinfer.int8_matmul: a is {tuple(a.shape)} and w is {tuple(w.shape)}; K must match"
        )
    return _matmul_packed(a, _pack_cpu(w), w.shape[0])


@_cpu_kernel("int8_matmul_packed")
def _int8_matmul_packed_cpu(a: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    return _matmul_packed(a, packed, n)


@_cpu_kernel("int8_linear")
def _int8_linear_cpu(
    x: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    _check_float_input("int8_linear", x)
    n = _check_linear_params(x, packed, w_scale, bias)
    packed = _ensure_aligned(packed)
    pn, pk = _packed_nk("int8_linear", packed)
    k = x.shape[-1]
    if pn != n or pk != k:
        raise ValueError(
            f"fastinfer.int8_linear: input has K={k} and w_scale N={n}, but the packed weight is [{pn}, {pk}]"
        )
    return _run_int8_linear(_C.int8_linear, x, packed, w_scale, bias, n)


def _run_int8_linear(
    kernel, x: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, n: int
) -> torch.Tensor:
    """The checked dense or sparse int8 linear: output, empty and K = 0 cases, row layout, then
    kernel (_C.int8_linear or _C.sparse_int8_linear, same arguments) on the checked packed weight."""
    k = x.shape[-1]
    out = _new_output((*x.shape[:-1], n), x.dtype)
    if out.numel() == 0:
        return out
    if k == 0:
        return out.copy_(bias.expand_as(out) if bias is not None else out.zero_())
    x2, ld = _rows(x)
    w_scale = w_scale.contiguous()
    bias = bias.contiguous() if bias is not None else None
    kernel(
        x2.data_ptr(), _DTYPE_CODE[x.dtype], x2.shape[0], k, ld,
        packed.data_ptr(), packed.numel(), w_scale.data_ptr(),
        bias.data_ptr() if bias is not None else 0, out.data_ptr(), _DTYPE_CODE[x.dtype], n,
    )  # fmt: skip
    return out


def _check_scale_bias(name: str, w_scale: torch.Tensor, bias: torch.Tensor | None) -> int:
    """N of an int8 linear's per-channel w_scale [N] (float32) and bias [N] (float32 or None)."""
    if w_scale.dtype != torch.float32 or w_scale.dim() != 1:
        raise TypeError(f"fastinfer.{name}: w_scale must be a 1-D float32 tensor [N]")
    n = w_scale.shape[0]
    if bias is not None and (bias.dtype != torch.float32 or tuple(bias.shape) != (n,)):
        raise TypeError(f"fastinfer.{name}: bias must be float32 [{n}], got {bias.dtype} {tuple(bias.shape)}")
    return n


def _check_linear_params(
    x: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> int:
    n = _check_scale_bias("int8_linear", w_scale, bias)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise TypeError("fastinfer.int8_linear: packed must be a 1-D uint8 tensor from pack_int8_weight")
    return n


# ------------------------------------------------------------------------------- kernels (CUDA)
# fastinfer/_cuda_ops.py holds them; fastinfer._C_cuda is imported on the first CUDA call only.


def _cuda_kernel(opname: str):
    def wrap(fn):
        torch.library.register_kernel(f"fastinfer::{opname}", "cuda", fn)
        return fn

    return wrap


@_cuda_kernel("quantize_per_token")
def _quantize_per_token_cuda(x):
    _check_float_input("quantize_per_token", x)
    from fastinfer import _cuda_ops

    return _cuda_ops.quantize_per_token(x)


@_cuda_kernel("pack_int8_weight")
def _pack_cuda(w):
    _check_int8_2d("pack_int8_weight", "w", w)
    from fastinfer import _cuda_ops

    return _cuda_ops.pack_int8_weight(w)


@_cuda_kernel("unpack_int8_weight")
def _unpack_cuda(packed, n, k):
    from fastinfer import _cuda_ops

    return _cuda_ops.unpack_int8_weight(packed, n, k)


@_cuda_kernel("int8_matmul")
def _int8_matmul_cuda(a, w):
    _check_int8_2d("int8_matmul", "a", a)
    _check_int8_2d("int8_matmul", "w", w)
    if a.shape[1] != w.shape[1]:
        raise ValueError(f"fastinfer.int8_matmul: a is {tuple(a.shape)} and w is {tuple(w.shape)}; K must match")
    from fastinfer import _cuda_ops

    return _cuda_ops.int8_matmul(a, w)


@_cuda_kernel("int8_matmul_packed")
def _int8_matmul_packed_cuda(a, packed, n):
    _check_int8_2d("int8_matmul", "a", a)
    from fastinfer import _cuda_ops

    return _cuda_ops.int8_matmul_packed(a, packed, n)


@_cuda_kernel("int8_linear")
def _int8_linear_cuda(x, packed, w_scale, bias):
    _check_float_input("int8_linear", x)
    _check_linear_params(x, packed, w_scale, bias)
    from fastinfer import _cuda_ops

    return _cuda_ops.int8_linear(x, packed, w_scale, bias)


# ---------------------------------------------------------------------------- fake implementations


@torch.library.register_fake("fastinfer::quantize_per_token")
def _quantize_per_token_fake(x):
    _check_float_input("quantize_per_token", x)
    return torch.empty_like(x, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.register_fake("fastinfer::pack_int8_weight")
def _pack_fake(w):
    _check_int8_2d("pack_int8_weight", "w", w)
    return w.new_empty((packed_nbytes(w.shape[0], w.shape[1]),), dtype=torch.uint8)


@torch.library.register_fake("fastinfer::unpack_int8_weight")
def _unpack_fake(packed, n, k):
    return packed.new_empty((n, k), dtype=torch.int8)


@torch.library.register_fake("fastinfer::int8_matmul")
def _int8_matmul_fake(a, w):
    _check_int8_2d("int8_matmul", "a", a)
    _check_int8_2d("int8_matmul", "w", w)
    torch._check(a.shape[1] == w.shape[1], lambda: "fastinfer.int8_matmul: K of a and w must match")
    return a.new_empty((a.shape[0], w.shape[0]), dtype=torch.int32)


@torch.library.register_fake("fastinfer::int8_matmul_packed")
def _int8_matmul_packed_fake(a, packed, n):
    _check_int8_2d("int8_matmul", "a", a)
    return a.new_empty((a.shape[0], n), dtype=torch.int32)


@torch.library.register_fake("fastinfer::int8_linear")
def _int8_linear_fake(x, packed, w_scale, bias):
    _check_float_input("int8_linear", x)
    n = _check_linear_params(x, packed, w_scale, bias)
    return x.new_empty((*x.shape[:-1], n))


# ------------------------------------------------------------------------------------- public API


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 quantization of x [..., K] (float32 or bfloat16).

    Returns (q int8 [..., K], scale float32 [...]) with scale = max|row| / 127 and
    q = round_half_even(x * (127 / max|row|)), so x ~= q * scale. A row of zeros gets scale 0; a row
    holding NaN or Inf gets scale NaN and q = 0 (so a layer's output row becomes NaN, as in float).
    A row so tiny that 127 / max|row| overflows float32 (max|row| < 127 / FLT_MAX, about 3.7e-37)
    counts as a zero row (scale 0, q 0); above that, subnormal scales are kept, never flushed.
    """
    x = _check_tensor("quantize_per_token", "x", x)
    _check_cpu("quantize_per_token", x=x)
    return torch.ops.fastinfer.quantize_per_token(x)


def pack_int8_weight(w: torch.Tensor) -> torch.Tensor:
    """Packs int8 weights [N, K] once into the kernels' layout (1-D uint8 with a versioned header)."""
    w = _check_tensor("pack_int8_weight", "w", w)
    _check_cpu("pack_int8_weight", w=w)
    return torch.ops.fastinfer.pack_int8_weight(w)


def unpack_int8_weight(packed: torch.Tensor, n: int | None = None, k: int | None = None) -> torch.Tensor:
    """Inverse of pack_int8_weight: the int8 weights [N, K].

    The shape is read from the packed header; a meta or fake tensor has no header to read, so
    there (n, k) must be given (torch.compile tracing, `torch.device("meta")` construction)."""
    packed = _check_tensor("unpack_int8_weight", "packed", packed)
    _check_cpu("unpack_int8_weight", packed=packed)
    if n is None or k is None:
        if n is not None or k is not None:
            raise ValueError("fastinfer.unpack_int8_weight: give both n and k, or neither")
        if packed.device.type == "cuda":
            from fastinfer._cuda_layout import rn128_header

            _, n, k, _, _ = rn128_header(packed)
        else:
            n, k = _packed_nk("unpack_int8_weight", _ensure_aligned(packed))
    return torch.ops.fastinfer.unpack_int8_weight(packed, n, k)


def int8_matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact int32 [M, N] = a int8 [M, K] @ w int8 [N, K]^T, equal to (a.long() @ w.long().T).int()."""
    a = _check_tensor("int8_matmul", "a", a)
    w = _check_tensor("int8_matmul", "w", w)
    _check_cpu("int8_matmul", a=a, w=w)
    return torch.ops.fastinfer.int8_matmul(a, w)


def int8_matmul_packed(a: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    """int8_matmul against weights packed once with pack_int8_weight (N given for shape inference)."""
    a = _check_tensor("int8_matmul_packed", "a", a)
    packed = _check_tensor("int8_matmul_packed", "packed", packed)
    _check_cpu("int8_matmul_packed", a=a, packed=packed)
    return torch.ops.fastinfer.int8_matmul_packed(a, packed, n)


def int8_linear(
    x: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Dynamic int8 linear: quantize x [..., K] per token, int8 GEMM, fp32 epilogue
    acc * scale_x[m] * w_scale[n] + bias[n], cast to x.dtype. Returns [..., N]."""
    x = _check_tensor("int8_linear", "x", x)
    _check_cpu("int8_linear", x=x, packed=packed, w_scale=w_scale, bias=bias)
    if _eager_fast_path(x):
        # Same kernel function the op registers; skips ~5 us of dispatcher overhead per call,
        # which is 5% of a 4096x4096 layer at M=1.
        return _int8_linear_cpu(x, packed, w_scale, bias)
    return torch.ops.fastinfer.int8_linear(x, packed, w_scale, bias)


def _eager_fast_path(x: torch.Tensor) -> bool:
    """Plain eager CPU call with no autograd to record: nothing the dispatcher would add."""
    return (
        type(x) is torch.Tensor
        and x.device.type == "cpu"
        and not (x.requires_grad and torch.is_grad_enabled())
        and not torch.compiler.is_compiling()
        and torch._C._get_tracing_state() is None  # torch.jit.trace records dispatcher calls only
    )


# Sparse ops live in their own module; they are part of fastinfer.ops' public surface.
from fastinfer._ops_sparse import (  # noqa: E402
    FORMATS as SPARSE_FORMATS,
    pack_sparse,
    sparse_info,
    sparse_validate,
    sparse_int8_linear,
    sparse_int8_matmul,
    sparse_linear,
    unpack_sparse,
)
