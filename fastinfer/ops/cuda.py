"""CUDA kernels of the fastinfer ops, backed by fastinfer._C_cuda (loaded by fastinfer._runtime on
the first CUDA call: CPU-only use never loads it). Of the sparse formats only "2:4" runs on CUDA
(mma.sp, the SP24 layout); the others and the fp32 sparse layer say so.

GPU weights use the RN128 layout (fastinfer/_cuda_layout.py): a 64-byte header then int8 rows
[np, kp]. Shapes are known from the op arguments, so no call reads the header back from the device
(that would synchronize); the buffer size is checked instead.
"""

from __future__ import annotations

import torch

from fastinfer import _cuda_layout as L
from fastinfer._runtime import cuda_module
from fastinfer.ops import _schema  # noqa: F401  (the ops these kernels serve)
from fastinfer.ops._common import (
    ValidatedBuffers,
    activation_name,
    check_float_input,
    check_scale_bias,
    check_int8_2d,
    check_int8_linear_params,
    check_int8_matmul_args,
    register,
)

_OUT_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.int32: 3}


def _mod(opname: str):
    mod, why = cuda_module()
    if mod is None:
        raise RuntimeError(f"fastinfer.{opname}: CUDA tensors need the CUDA backend: {why}")
    return mod


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _same_device(opname: str, *tensors: torch.Tensor | None) -> torch.device:
    dev = next(t.device for t in tensors if t is not None)
    for t in tensors:
        if t is not None and t.device != dev:
            raise RuntimeError(f"fastinfer.{opname}: all tensors must be on {dev}, got one on {t.device}")
    return dev


def _check_rn128(opname: str, packed: torch.Tensor, n: int, k: int) -> tuple[int, int]:
    np_, kp = L.rn128_sizes(n, k)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or not packed.is_contiguous():
        raise TypeError(f"fastinfer.{opname}: packed must be a contiguous 1-D uint8 tensor")
    if packed.numel() != L.HEADER_BYTES + np_ * kp:
        raise ValueError(
            f"fastinfer.{opname}: packed has {packed.numel()} bytes, a GPU (RN128) weight [{n}, {k}] has "
            f"{L.HEADER_BYTES + np_ * kp}; CPU-packed weights must be re-packed (module.to('cuda') does it)"
        )
    return np_, kp


def _quantize(mod, x2: torch.Tensor, kp: int) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = x2.shape
    q = torch.empty((m, kp), dtype=torch.int8, device=x2.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x2.device)
    code = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[x2.dtype]
    mod.quantize_rows(x2.data_ptr(), code, m, k, x2.stride(0), q.data_ptr(), kp, scale.data_ptr(), _stream(x2))
    return q, scale


def _gemm(mod, q, m, kp, packed, n, np_, sa, sw, bias, out, out_dtype):
    mod.gemm_i8(
        q.data_ptr(), m, kp, packed.data_ptr() + L.HEADER_BYTES, n, np_,
        sa.data_ptr() if sa is not None else 0, sw.data_ptr() if sw is not None else 0,
        bias.data_ptr() if bias is not None else 0, out.data_ptr(), _OUT_CODE[out_dtype], n, _stream(q),
    )  # fmt: skip


def _refuse_activation(opname: str, act: int) -> None:
    if act != 0:
        raise RuntimeError(
            f"fastinfer.{opname}: a fused activation is not implemented on CUDA yet (CPU only); "
            "build the layer without activation= (or quantize with QuantConfig(fuse_activations=False))"
        )


def _linear(mod, gemm, x, packed, n, np_, kp, w_scale, bias) -> torch.Tensor:
    """x [..., K] quantized per token, then gemm (a weight layout's GEMM) with the fp32 epilogue."""
    k = x.shape[-1]
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    if k == 0:
        return out.copy_(bias.expand_as(out)) if bias is not None else out.zero_()
    x2 = x.reshape(-1, k).contiguous()
    with torch.cuda.device(x.device):
        q, sa = _quantize(mod, x2, kp)
        gemm(mod, q, x2.shape[0], kp, packed, n, np_, sa, w_scale.contiguous(),
             bias.contiguous() if bias is not None else None, out, x.dtype)  # fmt: skip
    return out


def _matmul(mod, gemm, a, packed, n, np_, kp) -> torch.Tensor:
    """Exact int32 a @ W^T through gemm, a zero-padded to kp columns."""
    m, k = a.shape
    out = torch.empty((m, n), dtype=torch.int32, device=a.device)
    if m == 0 or n == 0:
        return out
    with torch.cuda.device(a.device):
        q = torch.zeros((m, kp), dtype=torch.int8, device=a.device)
        q[:, :k] = a
        gemm(mod, q, m, kp, packed, n, np_, None, None, None, out, torch.int32)
    return out


# ---------------------------------------------------------------------------------- CUDA kernels


@register("quantize_per_token", "cuda")
def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    check_float_input("quantize_per_token", x)
    mod = _mod("quantize_per_token")
    k = x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    with torch.cuda.device(x.device):
        if x2.shape[0] == 0 or k == 0:
            return torch.zeros(x.shape, dtype=torch.int8, device=x.device), torch.zeros(
                x.shape[:-1], dtype=torch.float32, device=x.device
            )
        q, scale = _quantize(mod, x2, L.rn128_sizes(1, k)[1])
    return q[:, :k].reshape(x.shape).contiguous(), scale.reshape(x.shape[:-1])


@register("pack_int8_weight", "cuda")
def pack_int8_weight(w: torch.Tensor) -> torch.Tensor:
    check_int8_2d("pack_int8_weight", "w", w)
    return L.pack_rn128(w)


@register("unpack_int8_weight", "cuda")
def unpack_int8_weight(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    np_, kp = _check_rn128("unpack_int8_weight", packed, n, k)
    return packed[L.HEADER_BYTES :].view(torch.int8).view(np_, kp)[:n, :k].clone()


@register("int8_matmul_packed", "cuda")
def int8_matmul_packed(a: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    check_int8_2d("int8_matmul", "a", a)
    mod = _mod("int8_matmul")
    _same_device("int8_matmul", a, packed)
    np_, kp = _check_rn128("int8_matmul", packed, n, a.shape[1])
    return _matmul(mod, _gemm, a, packed, n, np_, kp)


@register("int8_matmul", "cuda")
def int8_matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    check_int8_matmul_args(a, w)
    _same_device("int8_matmul", a, w)
    return int8_matmul_packed(a, L.pack_rn128(w), w.shape[0])


@register("int8_linear", "cuda")
def int8_linear(
    x: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, act: int = 0,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    check_float_input("int8_linear", x)
    _refuse_activation("int8_linear", act)
    if residual is not None:  # (an Int8Linear on CUDA adds its residual after the op, in torch)
        raise RuntimeError("fastinfer.int8_linear: the residual is added in the CPU kernel's epilogue only; on CUDA "
                           "add it to the output")  # fmt: skip
    n = check_int8_linear_params(packed, w_scale, bias)
    mod = _mod("int8_linear")
    _same_device("int8_linear", x, packed, w_scale, bias)
    np_, kp = _check_rn128("int8_linear", packed, n, x.shape[-1])
    return _linear(mod, _gemm, x, packed, n, np_, kp, w_scale, bias)


@register("static_int8_linear", "cuda")
def static_int8_linear(*args, **kwargs):
    raise RuntimeError(
        "fastinfer.static_int8_linear: static int8 runs on the CPU only (no CUDA kernel yet); on CUDA "
        "quantize with the default QuantConfig(activations='dynamic') (Int8Linear), or keep the layer on the CPU"
    )


@register("weight_only_linear", "cuda")
def weight_only_linear(*args, **kwargs):
    raise RuntimeError(
        "fastinfer.weight_only_linear: weight-only int8 runs on the CPU only (no CUDA kernel yet); on CUDA "
        "quantize with the default QuantConfig(activations='dynamic') (Int8Linear), or keep the layer on the CPU"
    )


# ------------------------------------------------------------------------------- 2:4 (SP24)

_SP24_VALID = ValidatedBuffers()  # GPU 2:4 buffers whose header and metadata codes passed the check
_SP24_SHAPE: dict[int, tuple[int, int]] = {}  # id -> the [n, k] its header declared (for known buffers)


def _sp24_check_now(packed: torch.Tensor) -> tuple[int, int]:
    """[n, k] from the header of a GPU 2:4 buffer, after checking the header (layout, sizes) and every
    metadata code (two ascending positions: the codes mma.sp leaves undefined never reach it), on
    its device (one synchronization)."""
    if packed.numel() < L.HEADER_BYTES:
        raise ValueError("not a GPU 2:4 (SP24) packed weight (too short)")
    h = packed[: L.HEADER_BYTES].cpu()
    layout = int(h[:16].view(torch.int32)[2])
    n, k, np_, kp = (int(v) for v in h[16:48].view(torch.int64))
    if layout != L.LAYOUT_SP24 or min(n, k) < 0 or (np_, kp) != L.sp24_sizes(n, k) or packed.numel() != L.sp24_nbytes(n, k):
        raise ValueError("not a GPU 2:4 (SP24) packed weight (header or size)")
    words = packed[L.HEADER_BYTES + np_ * kp // 2 :].view(torch.int32)
    nib = torch.stack([(words >> (4 * j)) & 0xF for j in range(8)])
    if not bool(((nib & 3) < (nib >> 2)).all()):
        raise ValueError("a metadata code of the GPU 2:4 weight is invalid")
    return n, k


def sp24_validate(opname: str, packed: torch.Tensor, force: bool = False) -> tuple[int, int]:
    """[n, k] of a GPU 2:4 buffer after its full check (once per tensor version unless force); what
    sparse_validate runs on CUDA."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or not packed.is_contiguous():
        raise TypeError(f"fastinfer.{opname}: packed must be a contiguous 1-D uint8 tensor")
    shape = _SP24_SHAPE.get(id(packed))
    if force or shape is None or not _SP24_VALID.known(packed):
        state = _SP24_VALID._state(packed)
        try:
            shape = _sp24_check_now(packed)
        except ValueError as e:
            raise ValueError(f"fastinfer.{opname}: {e}") from None
        if len(_SP24_SHAPE) >= ValidatedBuffers.MAX:
            _SP24_SHAPE.clear()
        _SP24_VALID.remember(packed, state)
        _SP24_SHAPE[id(packed)] = shape
    return shape


def sp24_check(opname: str, packed: torch.Tensor, n: int, k: int) -> tuple[int, int]:
    """(np, kp) of a GPU 2:4 weight that must be [n, k]: its size checked on every call, its header
    and codes once per tensor version (no synchronization after the first call)."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or not packed.is_contiguous():
        raise TypeError(f"fastinfer.{opname}: packed must be a contiguous 1-D uint8 tensor")
    if packed.numel() != L.sp24_nbytes(n, k):
        raise ValueError(
            f"fastinfer.{opname}: packed has {packed.numel()} bytes, a GPU 2:4 weight [{n}, {k}] has "
            f"{L.sp24_nbytes(n, k)}; on CUDA only the '2:4' format runs, packed on the GPU "
            "(pack_sparse(w.cuda(), '2:4'), or module.to('cuda'))"
        )
    hn, hk = sp24_validate(opname, packed)
    if (hn, hk) != (n, k):
        raise ValueError(f"fastinfer.{opname}: the weight is [{hn}, {hk}], expected [{n}, {k}]")
    return L.sp24_sizes(n, k)


def _sp24_gemm(mod, q, m, kp, packed, n, np_, sa, sw, bias, out, out_dtype):
    meta = packed.data_ptr() + L.HEADER_BYTES + np_ * kp // 2
    mod.gemm_sp24(
        q.data_ptr(), m, kp, packed.data_ptr() + L.HEADER_BYTES, meta, n, np_,
        sa.data_ptr() if sa is not None else 0, sw.data_ptr() if sw is not None else 0,
        bias.data_ptr() if bias is not None else 0, out.data_ptr(), _OUT_CODE[out_dtype], n, _stream(q),
    )  # fmt: skip


@register("sparse_int8_linear", "cuda")
def sparse_int8_linear(
    x: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, act: int = 0
) -> torch.Tensor:
    check_float_input("sparse_int8_linear", x)
    activation_name("sparse_int8_linear", act)
    _refuse_activation("sparse_int8_linear", act)
    n = check_scale_bias("sparse_int8_linear", w_scale, bias)
    mod = _mod("sparse_int8_linear")
    _same_device("sparse_int8_linear", x, packed, w_scale, bias)
    np_, kp = sp24_check("sparse_int8_linear", packed, n, x.shape[-1])
    return _linear(mod, _sp24_gemm, x, packed, n, np_, kp, w_scale, bias)


@register("sparse_int8_matmul", "cuda")
def sparse_int8_matmul(a: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    check_int8_2d("sparse_int8_matmul", "a", a)
    mod = _mod("sparse_int8_matmul")
    _same_device("sparse_int8_matmul", a, packed)
    np_, kp = sp24_check("sparse_int8_matmul", packed, n, a.shape[1])
    return _matmul(mod, _sp24_gemm, a, packed, n, np_, kp)


@register("sparse_linear", "cuda")
def sparse_linear(*args, **kwargs):
    raise RuntimeError(
        "fastinfer.sparse_linear: fp32 sparse weights run on the CPU only; on CUDA use an int8 '2:4' "
        "weight (SparseInt8Linear with format='2:4') or keep the layer on the CPU"
    )
