"""Dense int8 ops on the CPU: per-token quantization, K4N16 weight packing, the exact int8 matmul
and the int8 linears (dynamic, static, weight-only) (their CPU kernels and public functions; schemas and fakes in
fastinfer/ops/_schema.py).

Tensors reach the compiled kernels as data_ptr() integers with sizes and row strides (see
fastinfer/ops/_prepared.py); the kernels never see torch.
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
    check_input_scale,
    check_int8_2d,
    check_int8_linear_params,
    check_int8_matmul_args,
    check_residual,
    check_tensor,
    has_data,
    linear_entry,
    register,
    rows,
    ValidatedBuffers,
)

_VALID = ValidatedBuffers()  # packed weights that passed _C.validate_packed (see ValidatedBuffers)


def check_packed(name: str, packed: torch.Tensor, force: bool = False) -> tuple[torch.Tensor, int, int]:
    """(the validated, 64-byte aligned buffer (packed itself or a copy), n, k) of a CPU weight packed
    by pack_int8_weight. Validation is O(bytes), once per tensor version: a tampered buffer (column
    sums, padding, header) raises ValueError instead of giving ISA-dependent results."""
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise TypeError(f"fastinfer.{name}: packed must be a 1-D uint8 tensor from pack_int8_weight")
    if not packed.is_contiguous():
        raise ValueError(f"fastinfer.{name}: packed must be contiguous")
    if not has_data(packed):
        raise ValueError(
            f"fastinfer.{name}: packed is a {packed.device.type} / fake tensor with no data, so its "
            "header cannot be read; pass the weight shape (n, k) explicitly"
        )
    use = _VALID.checked(packed, _C.validate_packed, force)
    return (use, *_C.packed_shape(use.data_ptr(), use.numel()))


def remember_valid(packed: torch.Tensor) -> None:
    """Marks a CPU packed weight as validated in its present state (a layer that just copied checked
    bytes into its buffer)."""
    if packed.device.type == "cpu" and has_data(packed):
        _VALID.remember(packed)


def validate_int8_weight(packed: torch.Tensor) -> None:
    """Full check of a packed int8 weight (header, padding bytes, column sums); ValueError if corrupt.
    The ops run it once per tensor version by themselves; call it after writing into the buffer by
    a way torch's version counter does not see (.numpy(), raw pointers)."""
    packed = check_tensor("validate_int8_weight", "packed", packed)
    check_device("validate_int8_weight", packed=packed)
    if packed.device.type != "cpu":
        raise ValueError("fastinfer.validate_int8_weight: validates CPU packed weights (a CUDA weight is packed on the device)")
    check_packed("validate_int8_weight", packed, force=True)


def prepare_int8_linear(
    packed: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, k: int, act: int = 0,
    name: str = "int8_linear", x_scale: torch.Tensor | None = None,
) -> _prepared.Int8LinearCall:  # fmt: skip
    """The checked weight side of int8_linear (or, with name="weight_only_linear", of the
    weight-only op: same weight side, another kernel) for inputs [..., k] and activation code act:
    what its CPU kernel runs, and what an Int8Linear keeps for its eager calls."""
    n = check_int8_linear_params(packed, w_scale, bias, name)
    activation_name(name, act)
    packed, pn, pk = check_packed(name, packed)
    if pn != n or pk != k:
        raise ValueError(f"fastinfer.{name}: input has K={k} and w_scale N={n}, but the packed weight is [{pn}, {pk}]")
    return _prepared.Int8LinearCall(getattr(_C, name), packed, w_scale, bias, n, k, act, x_scale,
                                    residual=name in ("int8_linear", "static_int8_linear"))


def prepare_static_int8_linear(
    packed: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, x_scale: torch.Tensor, k: int,
    act: int = 0,
) -> _prepared.Int8LinearCall:  # fmt: skip
    """The checked weight side of static_int8_linear: int8_linear's, and the input's one scale (a
    CPU float32 tensor of one element; finite and > 0, checked by the kernel at each call)."""
    check_input_scale("static_int8_linear", x_scale)
    if x_scale.device.type != "cpu":
        raise ValueError("fastinfer.static_int8_linear: x_scale must be on the CPU")
    return prepare_int8_linear(packed, w_scale, bias, k, act, "static_int8_linear", x_scale.reshape(1).contiguous())


# ------------------------------------------------------------------------------------- CPU kernels


@register("quantize_per_token", "cpu")
def _quantize_per_token_cpu(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    check_float_input("quantize_per_token", x)
    return _prepared.quantize_per_token(x)


@register("pack_int8_weight", "cpu")
def _pack_cpu(w: torch.Tensor) -> torch.Tensor:
    check_int8_2d("pack_int8_weight", "w", w)
    n, k = w.shape
    w2, ld = rows(w) if n > 0 and k > 0 else (w.contiguous(), k)
    with torch.inference_mode(False):  # a normal tensor: its version counter guards the validation cache
        out = aligned_empty(_C.packed_nbytes(n, k))
    _C.pack_weight(w2.data_ptr(), n, k, max(ld, k), out.data_ptr(), out.numel())
    _VALID.remember(out)
    return out


@register("unpack_int8_weight", "cpu")
def _unpack_cpu(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    packed, pn, pk = check_packed("unpack_int8_weight", packed)
    if (pn, pk) != (n, k):
        raise ValueError(f"fastinfer.unpack_int8_weight: packed holds [{pn}, {pk}], asked for [{n}, {k}]")
    w = torch.empty((n, k), dtype=torch.int8)
    _C.unpack_weight(packed.data_ptr(), packed.numel(), w.data_ptr())
    return w


def _matmul_packed(a: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    check_int8_2d("int8_matmul", "a", a)
    packed, pn, pk = check_packed("int8_matmul", packed)
    if pn != n:
        raise ValueError(f"fastinfer.int8_matmul: packed weight has N={pn}, expected {n}")
    if a.shape[1] != pk:
        raise ValueError(f"fastinfer.int8_matmul: a has K={a.shape[1]} but w has K={pk}")
    return _prepared.int8_matmul(_C.int8_matmul, a, packed, n)


@register("int8_matmul", "cpu")
def _int8_matmul_cpu(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    check_int8_matmul_args(a, w)
    return _matmul_packed(a, _pack_cpu(w), w.shape[0])


@register("int8_matmul_packed", "cpu")
def _int8_matmul_packed_cpu(a: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    return _matmul_packed(a, packed, n)


@register("int8_linear", "cpu")
def _int8_linear_cpu(
    x: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, act: int = 0,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    check_float_input("int8_linear", x)
    call = prepare_int8_linear(packed, w_scale, bias, x.shape[-1], act)
    check_residual("int8_linear", residual, (*x.shape[:-1], call.n), x.dtype)
    return call(x, residual)


@register("static_int8_linear", "cpu")
def _static_int8_linear_cpu(
    x: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
    x_scale: torch.Tensor, act: int = 0, residual: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    check_float_input("static_int8_linear", x)
    call = prepare_static_int8_linear(packed, w_scale, bias, x_scale, x.shape[-1], act)
    check_residual("static_int8_linear", residual, (*x.shape[:-1], call.n), x.dtype)
    return call(x, residual)


@register("weight_only_linear", "cpu")
def _weight_only_linear_cpu(
    x: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, act: int = 0
) -> torch.Tensor:
    check_float_input("weight_only_linear", x)
    return prepare_int8_linear(packed, w_scale, bias, x.shape[-1], act, "weight_only_linear")(x)


# -------------------------------------------------------------------------------------- public API


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 quantization of x [..., K] (float32 or bfloat16).

    Returns (q int8 [..., K], scale float32 [...]) with scale = max|row| / 127 and
    q = round_half_even(x * (127 / max|row|)), so x ~= q * scale. A row of zeros gets scale 0; a row
    holding NaN or Inf gets scale NaN and q = 0 (so a layer's output row becomes NaN, as in float).
    A row so tiny that 127 / max|row| overflows float32 (max|row| < 127 / FLT_MAX, about 3.7e-37)
    counts as a zero row (scale 0, q 0); above that, subnormal scales are kept, never flushed.
    """
    x = check_tensor("quantize_per_token", "x", x)
    check_device("quantize_per_token", x=x)
    return torch.ops.fastinfer.quantize_per_token(x)


def pack_int8_weight(w: torch.Tensor) -> torch.Tensor:
    """Packs int8 weights [N, K] once into the kernels' layout (1-D uint8 with a versioned header)."""
    w = check_tensor("pack_int8_weight", "w", w)
    check_device("pack_int8_weight", w=w)
    return torch.ops.fastinfer.pack_int8_weight(w)


def unpack_int8_weight(packed: torch.Tensor, n: int | None = None, k: int | None = None) -> torch.Tensor:
    """Inverse of pack_int8_weight: the int8 weights [N, K].

    The shape is read from the packed header; a meta or fake tensor has no header to read, so
    there (n, k) must be given (torch.compile tracing, `torch.device("meta")` construction)."""
    packed = check_tensor("unpack_int8_weight", "packed", packed)
    check_device("unpack_int8_weight", packed=packed)
    if n is None or k is None:
        if n is not None or k is not None:
            raise ValueError("fastinfer.unpack_int8_weight: give both n and k, or neither")
        if packed.device.type == "cuda":
            _, n, k, _, _ = _cuda_layout.rn128_header(packed)
        else:
            _, n, k = check_packed("unpack_int8_weight", packed)
    return torch.ops.fastinfer.unpack_int8_weight(packed, n, k)


def int8_matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact int32 [M, N] = a int8 [M, K] @ w int8 [N, K]^T, equal to (a.long() @ w.long().T).int()."""
    a = check_tensor("int8_matmul", "a", a)
    w = check_tensor("int8_matmul", "w", w)
    check_device("int8_matmul", a=a, w=w)
    return torch.ops.fastinfer.int8_matmul(a, w)


def int8_matmul_packed(a: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    """int8_matmul against weights packed once with pack_int8_weight (N given for shape inference)."""
    a = check_tensor("int8_matmul_packed", "a", a)
    packed = check_tensor("int8_matmul_packed", "packed", packed)
    check_device("int8_matmul_packed", a=a, packed=packed)
    return torch.ops.fastinfer.int8_matmul_packed(a, packed, n)


def int8_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dynamic int8 linear: quantize x [..., K] per token, int8 GEMM, fp32 epilogue
    act(acc * scale_x[m] * w_scale[n] + bias[n] + residual[..., n]), cast to x.dtype. Returns [..., N].

    activation: None, or "gelu" (erf GELU fused into the epilogue, computed in fp32 with Eigen's erf
    approximation: bit-identical on every ISA, within 4e-7 of the exact erf); the other names of
    ACTIVATION_CODE likewise. residual: None, or a tensor of the output's shape and dtype added in
    fp32 before the activation and rounded once with the rest (a transformer block's dense layer and
    the add of its input in one pass; in float32 the same bits as the output plus the residual in
    torch). CPU only."""
    return linear_entry("int8_linear", _int8_linear_cpu, x, packed, w_scale, bias, activation, residual=residual)


def static_int8_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    x_scale: torch.Tensor,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Static int8 linear: as int8_linear, but x [..., K] is quantized with one calibrated scale
    s = x_scale (float32, one element, finite and > 0) instead of a scale per token:
    q = clamp(round_half_even(x / s), -127, 127) computed as x * (1 / s) in float32, so values
    past the calibrated range saturate at +-127. One pass over x (no range to find first); the
    integer product and the epilogue act(acc * s * w_scale[n] + bias[n]) are int8_linear's, and
    a row holding NaN or Inf gives a NaN output row; residual as int8_linear's. CPU only."""
    if not isinstance(x_scale, torch.Tensor):
        check_input_scale("static_int8_linear", x_scale)  # None is not "no scale" here: a TypeError
    return linear_entry("static_int8_linear", _static_int8_linear_cpu, x, packed, w_scale, bias, activation, x_scale,
                        residual)  # fmt: skip


def weight_only_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """Weight-only int8 linear (W8A32): act(x @ (W * w_scale)^T + bias) with x [..., K] never
    quantized. The int8 weight (packed by pack_int8_weight) is widened to fp32 in registers and
    multiplied by fp32 FMA (a bfloat16 x is widened exactly), one chain per output in k order, so
    every ISA gives the same bits; the output has x's dtype. Same weight side and activations as
    int8_linear: the accurate choice where activation outliers hurt int8, and about as fast at one
    to a few rows (it streams the same int8 bytes); from ~8 rows up int8_linear is faster. CPU only."""
    return linear_entry("weight_only_linear", _weight_only_linear_cpu, x, packed, w_scale, bias, activation)
