"""int8 Conv2d on the CPU: the weight layout of each path (pack_conv_weight) and the int8_conv2d
op (schema and fake with the others' style, here because the op is conv's alone).

Paths (chosen in csrc/cpu/api/conv.cpp, FBGEMM's ConvFastPath idea): everything but depthwise
as implicit GEMM on NHWC data, each im2col row (one output pixel, one group) gathered from the
float input and quantized with its own scale, the weight one pack_int8_weight buffer per group of
the [out/groups, kh * kw * in/groups] matrix with k ordered (ky, kx, channel); depthwise (groups =
in = out channels) on its own int8 kernel with one scale per sample (uint8 max/255 when the whole
input is >= 0), weight int8 [kh * kw, channels]. depthwise_conv2d: the same depthwise convolution
in fp32 (what quantize() uses: memory-bound, so int8 has nothing to gain there).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastinfer._runtime import _C
from fastinfer.ops._common import (
    DTYPE_CODE,
    ValidatedBuffers,
    activation_grad,
    activation_name,
    check_device,
    check_residual,
    check_tensor,
    has_data,
    new_output,
    register,
)
from fastinfer.ops.linear import pack_int8_weight

__all__ = ["U8_NAN", "U8_SCALE", "conv2d_output_size", "dequantize_u8", "int8_conv2d", "is_depthwise",
           "pack_conv_weight", "pack_depthwise_weight", "quantize_u8", "unpack_conv_weight"]

# The conv ops also take and give uint8: a ReLU6 output handed from one conv to the next
# (QuantConfig.conv_handoff; kU8 in csrc/cpu/common.h). Byte q in [0, 254] stands for the float32
# q * U8_SCALE (ReLU6's range [0, 6] in 254 steps), U8_NAN for NaN, so a NaN pixel stays NaN down
# the chain. The depthwise kernel computes with those float values; the int8 conv sums the bytes
# themselves (they are quantized already: no second rounding).
CONV_DTYPE_CODE = {**DTYPE_CODE, torch.uint8: 3}
U8_SCALE = 6.0 / 254.0
U8_NAN = 255
_U8_SCALE32 = torch.tensor(U8_SCALE, dtype=torch.float32)  # the kernels' float kU8Scale
_U8_INV32 = torch.tensor(254.0 / 6.0, dtype=torch.float32)


def dequantize_u8(x: torch.Tensor) -> torch.Tensor:
    """float32 values of a uint8 conv output (see U8_SCALE): float32(q) * U8_SCALE, NaN for U8_NAN.
    (The kernels compute with these values up to rounding: the depthwise kernel multiplies float(q)
    by its weight times U8_SCALE, the int8 conv sums the bytes and scales the sums.)"""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8:
        raise TypeError(f"fastinfer.ops.conv.dequantize_u8: expects a uint8 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    return (x.float() * _U8_SCALE32).masked_fill(x == U8_NAN, float("nan"))


def quantize_u8(y: torch.Tensor) -> torch.Tensor:
    """The uint8 form of float values y (after ReLU6, in [0, 6]), as the kernels store it:
    round(clamp(y * 254 / 6, 0, 254)) to nearest even in float32, NaN -> U8_NAN."""
    t = (y.float() * _U8_INV32).clamp(0.0, 254.0).round()
    return t.masked_fill(torch.isnan(y), U8_NAN).to(torch.uint8)

torch.library.define(
    "fastinfer::int8_conv2d",
    "(Tensor x, Tensor weight, Tensor w_scale, Tensor? bias, int[] kernel_size, int[] stride, int[] padding, "
    "int[] dilation, int groups, int act=0, ScalarType? out_dtype=None, Tensor? residual=None) -> Tensor",
)

_VALID = ValidatedBuffers()  # packed conv weights whose every group passed _C.validate_packed


def is_depthwise(in_channels: int, out_channels: int, groups: int) -> bool:
    """Whether the conv runs on the depthwise kernel (one filter per channel, no channel mixing)."""
    return groups > 1 and groups == in_channels == out_channels


def _pair(name: str, v: object, minimum: int) -> tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v, v)
    if not isinstance(v, Sequence) or len(v) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
        raise TypeError(f"fastinfer.int8_conv2d: {name} must be an int or two ints, got {v!r}")
    if min(v) < minimum:
        raise ValueError(f"fastinfer.int8_conv2d: {name} must be >= {minimum}, got {tuple(v)}")
    return int(v[0]), int(v[1])


def _padding4(padding: object) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) from an int, (h, w) or (top, left, bottom, right)."""
    if isinstance(padding, Sequence) and len(padding) == 4:
        p = tuple(padding)
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in p):
            raise ValueError(f"fastinfer.int8_conv2d: padding must be non-negative ints, got {p!r}")
        return p  # type: ignore[return-value]
    ph, pw = _pair("padding", padding, 0)
    return ph, pw, ph, pw


def conv2d_output_size(h: int, w: int, kernel_size, stride, padding, dilation) -> tuple[int, int]:
    """(oh, ow) of a convolution; padding is (top, left, bottom, right)."""
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, stride, dilation
    pt, pl, pb, pr = padding
    return (h + pt + pb - dh * (kh - 1) - 1) // sh + 1, (w + pl + pr - dw * (kw - 1) - 1) // sw + 1


def pack_conv_weight(q: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """The kernel layout of an int8 conv weight q [out, in/groups, kh, kw] (CPU): int8
    [kh * kw * channels] for a depthwise conv, else a uint8 buffer of one pack_int8_weight per group."""
    q = check_tensor("pack_conv_weight", "q", q)
    if q.dtype != torch.int8 or q.dim() != 4:
        raise TypeError(f"fastinfer.pack_conv_weight: q must be int8 [out, in/groups, kh, kw], got {q.dtype} {tuple(q.shape)}")
    if not isinstance(groups, int) or groups < 1 or q.shape[0] % groups:
        raise ValueError(f"fastinfer.pack_conv_weight: groups={groups!r} must be >= 1 and divide out={q.shape[0]}")
    cout, cg, kh, kw = q.shape
    q = q.detach().cpu()
    with torch.inference_mode(False):  # version-tracked (see ValidatedBuffers)
        if is_depthwise(cg * groups, cout, groups):
            return q.reshape(cout, kh * kw).t().contiguous().reshape(-1).clone()
        coutg = cout // groups
        parts = [pack_int8_weight(q[g * coutg:(g + 1) * coutg].permute(0, 2, 3, 1).reshape(coutg, kh * kw * cg))
                 for g in range(groups)]  # fmt: skip
        return parts[0] if groups == 1 else torch.cat(parts)


def unpack_conv_weight(packed: torch.Tensor, out_channels: int, in_per_group: int, kernel_size, groups: int) -> torch.Tensor:
    """Inverse of pack_conv_weight: int8 [out, in/groups, kh, kw]."""
    from fastinfer.ops.linear import unpack_int8_weight

    kh, kw = kernel_size
    if is_depthwise(in_per_group * groups, out_channels, groups):
        return packed.view(torch.int8).reshape(kh * kw, out_channels).t().reshape(out_channels, 1, kh, kw).clone()
    coutg = out_channels // groups
    blob = packed.numel() // groups
    parts = [unpack_int8_weight(packed[g * blob:(g + 1) * blob], coutg, kh * kw * in_per_group)
             .reshape(coutg, kh, kw, in_per_group).permute(0, 3, 1, 2) for g in range(groups)]  # fmt: skip
    return torch.cat(parts).contiguous()


def _validate_groups(groups: int):
    def validate(ptr: int, nbytes: int) -> None:
        blob = nbytes // groups
        if blob * groups != nbytes:
            raise ValueError("fastinfer.int8_conv2d: weight size is not a multiple of groups")
        for g in range(groups):
            _C.validate_packed(ptr + g * blob, blob)

    return validate


def _check_args(x, weight, w_scale, bias, kernel_size, stride, padding, dilation, groups, act):
    """Checks shared by the CPU kernel and the fake; returns the output size [n, out, oh, ow]."""
    name = "int8_conv2d"
    for arg, t in (("x", x), ("weight", weight), ("w_scale", w_scale)):
        check_tensor(name, arg, t)
    check_device(name, x=x, weight=weight, w_scale=w_scale, bias=bias)
    _check_x_dtype(name, x)
    if x.dim() != 4:
        raise ValueError(f"fastinfer.{name}: x must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
    if w_scale.dtype != torch.float32 or w_scale.dim() != 1:
        raise TypeError(f"fastinfer.{name}: w_scale must be a 1-D float32 tensor [out_channels]")
    cout = w_scale.shape[0]
    if bias is not None and (bias.dtype != torch.float32 or tuple(bias.shape) != (cout,)):
        raise TypeError(f"fastinfer.{name}: bias must be float32 [{cout}], got {bias.dtype} {tuple(bias.shape)}")
    activation_name(name, act)
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"fastinfer.{name}: groups must be an int >= 1, got {groups!r}")
    n, c, h, w = x.shape
    if c % groups or cout % groups:
        raise ValueError(f"fastinfer.{name}: groups={groups} must divide in_channels={c} and out_channels={cout}")
    k, s, d, p = _pair("kernel_size", kernel_size, 1), _pair("stride", stride, 1), _pair("dilation", dilation, 1), _padding4(padding)
    oh, ow = conv2d_output_size(h, w, k, s, p, d)
    if oh < 1 or ow < 1:
        raise ValueError(
            f"fastinfer.{name}: input {h}x{w} (padded {h + p[0] + p[2]}x{w + p[1] + p[3]}) is smaller than the "
            f"dilated kernel {d[0] * (k[0] - 1) + 1}x{d[1] * (k[1] - 1) + 1}"
        )
    dw = is_depthwise(c, cout, groups)
    want = torch.int8 if dw else torch.uint8
    if weight.dtype != want or weight.dim() != 1:
        raise TypeError(
            f"fastinfer.{name}: weight must be the 1-D {want} buffer of pack_conv_weight for this conv "
            f"({'depthwise' if dw else f'{groups} group(s)'}), got {weight.dtype} {tuple(weight.shape)}"
        )
    return (n, cout, oh, ow), k, s, p, d, dw


@torch.library.register_fake("fastinfer::int8_conv2d")
def _int8_conv2d_fake(x, weight, w_scale, bias, kernel_size, stride, padding, dilation, groups, act=0, out_dtype=None,
                      residual=None):  # fmt: skip
    shape, *_, dw = _check_args(x, weight, w_scale, bias, kernel_size, stride, padding, dilation, groups, act)
    _check_out_dtype("int8_conv2d", out_dtype, act)
    check_residual("int8_conv2d", residual, shape, _out_dtype(x, out_dtype), dw)
    return x.new_empty(shape, dtype=_out_dtype(x, out_dtype)).contiguous(memory_format=_memory_format(x))


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """The input's memory format, which the output keeps: channels_last when x is (and not also
    plain contiguous, as a 1x1 image or one channel can be)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _check_x_dtype(name: str, x: torch.Tensor) -> None:
    if x.dtype not in CONV_DTYPE_CODE:
        raise TypeError(f"fastinfer.{name}: x must be float32, bfloat16 or uint8 (a relu6 output handed on), got {x.dtype}")


def _check_out_dtype(name: str, out_dtype, act: int) -> None:
    if out_dtype is not None and out_dtype not in CONV_DTYPE_CODE:
        raise TypeError(f"fastinfer.{name}: out_dtype must be None, float32, bfloat16 or uint8, got {out_dtype}")
    if out_dtype == torch.uint8 and act != 3:
        raise ValueError(f"fastinfer.{name}: a uint8 output holds relu6's range [0, 6]: it needs act=3 (relu6), got {act}")


def _out_dtype(x: torch.Tensor, out_dtype) -> torch.dtype:
    """The output's dtype: out_dtype, or x's (float32 for a uint8 x: its values, not its bytes)."""
    if out_dtype is not None:
        return out_dtype
    return torch.float32 if x.dtype == torch.uint8 else x.dtype


def run_conv2d(x, weight, w_scale, bias, k, s, p, d, groups, act, shape, out_dtype=None,
               residual: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The marshalling of _C.int8_conv2d on checked arguments (weight validated, aligned; residual
    checked by check_residual); the output in out_dtype (float32, bfloat16 or uint8; None: x's,
    float32 for uint8 x), rounded once from the fp32 epilogue (residual included)."""
    n, cout, oh, ow = shape
    fmt = _memory_format(x)
    out_dtype = _out_dtype(x, out_dtype)
    out = new_output((n, cout, oh, ow), out_dtype, channels_last=True)  # NHWC storage, NCHW sizes
    if out.numel() == 0:
        return out.contiguous(memory_format=fmt)
    xn = x.contiguous(memory_format=torch.channels_last)
    rn = None if residual is None else residual.contiguous(memory_format=torch.channels_last)  # NHWC storage
    c, h, w = x.shape[1:]
    code = CONV_DTYPE_CODE[x.dtype]
    _C.int8_conv2d(xn.data_ptr(), code, [n, h, w, c, cout, k[0], k[1], s[0], s[1], p[0], p[1], d[0], d[1], groups, oh, ow],
                   weight.data_ptr(), weight.numel(), w_scale.data_ptr(), 0 if bias is None else bias.data_ptr(),
                   out.data_ptr(), CONV_DTYPE_CODE[out_dtype], act, 0 if rn is None else rn.data_ptr())  # fmt: skip
    return out if fmt == torch.channels_last else out.contiguous()


def checked_weight(weight: torch.Tensor, depthwise: bool, groups: int) -> torch.Tensor:
    """The weight, validated (once per version) and 64-byte aligned."""
    if not has_data(weight):
        raise ValueError("fastinfer.int8_conv2d: weight has no data (meta or fake tensor)")
    if not weight.is_contiguous():
        weight = weight.contiguous()
    if depthwise:  # any int8 values are a valid depthwise weight; the kernel checks its size
        return weight
    return _VALID.checked(weight, _validate_groups(groups))


@register("int8_conv2d", "CPU")
def _int8_conv2d_cpu(x, weight, w_scale, bias, kernel_size, stride, padding, dilation, groups, act=0, out_dtype=None,
                     residual=None):  # fmt: skip
    shape, k, s, p, d, dw = _check_args(x, weight, w_scale, bias, kernel_size, stride, padding, dilation, groups, act)
    _check_out_dtype("int8_conv2d", out_dtype, act)
    check_residual("int8_conv2d", residual, shape, _out_dtype(x, out_dtype), dw)
    weight = checked_weight(weight, dw, groups)
    return run_conv2d(x, weight, w_scale.contiguous(), None if bias is None else bias.contiguous(), k, s, p, d,
                      groups, act, shape, out_dtype, residual)  # fmt: skip


def int8_conv2d(x: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                kernel_size, stride=1, padding=0, dilation=1, groups: int = 1, activation: str | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """y = act(conv2d(x, W) * w_scale + bias + residual) with W int8 (pack_conv_weight's layout) and x
    (float32 / bfloat16, NCHW or channels_last) quantized per pixel (depthwise: per sample); the output
    has x's dtype and memory format. padding: an int, (h, w) or (top, left, bottom, right). residual
    (optional, not for a depthwise conv): a tensor of the output's shape and dtype, added in fp32
    before the activation (a ResNet block's conv -> add -> relu as one pass)."""
    from fastinfer.ops._common import activation_code

    act = activation_code("int8_conv2d", activation)
    p = _padding4(padding)
    return torch.ops.fastinfer.int8_conv2d(x, weight, w_scale, bias, list(_pair("kernel_size", kernel_size, 1)),
                                           list(_pair("stride", stride, 1)), list(p),
                                           list(_pair("dilation", dilation, 1)), groups, act, None, residual)  # fmt: skip


# ------------------------------------------------------------------------------------- autograd
# The gradient with respect to x, through the dequantized weight (the straight-through view of the
# activation rounding); none for the weight side (int8 buffers, not parameters). A fused activation
# other than relu / relu6 has no gradient here: a clear error at backward, never a silent None.


def _setup_context(ctx, inputs, output):
    x, weight, w_scale, bias, kernel_size, stride, padding, dilation, groups, act = inputs[:10]
    residual = inputs[11] if len(inputs) > 11 else None
    ctx.residual_dtype = None if residual is None else residual.dtype
    ctx.save_for_backward(weight, w_scale, output if act in (2, 3) else None)
    ctx.meta = (tuple(x.shape), x.dtype, tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation), groups, act)


def _input_gradient(name: str, grad: torch.Tensor, out: torch.Tensor | None, act: int, wf: torch.Tensor,
                   x_shape, dtype, stride, padding, dilation, groups: int) -> torch.Tensor:
    """d loss / d x of act(conv2d(x, wf)) from the output's gradient (relu / relu6 masked by the
    saved output), with (top, left, bottom, right) zero padding: the gradient of the padded input,
    cropped. Any other fused activation raises."""
    grad = activation_grad(name, grad, act, out)
    n, c, h, w = x_shape
    pt, pl, pb, pr = padding
    gx = torch.nn.grad.conv2d_input((n, c, h + pt + pb, w + pl + pr), wf, grad.to(wf.dtype), stride, 0, dilation, groups)
    return gx[:, :, pt:pt + h, pl:pl + w].to(dtype)


def _backward(ctx, grad):
    weight, w_scale, out = ctx.saved_tensors
    shape, dtype, k, s, p, d, groups, act = ctx.meta
    wf = unpack_conv_weight(weight, w_scale.shape[0], shape[1] // groups, k, groups).float() * w_scale[:, None, None, None]
    g = activation_grad("int8_conv2d", grad, act, out)  # through act', once for x and the residual
    gx = _input_gradient("int8_conv2d", g, None, 0, wf, shape, dtype, s, p, d, groups)
    # the residual is added before the activation: its gradient is the output's, through act'
    gr = g.to(ctx.residual_dtype) if ctx.residual_dtype is not None and ctx.needs_input_grad[11] else None
    return gx, None, None, None, None, None, None, None, None, None, None, gr


torch.library.register_autograd("fastinfer::int8_conv2d", _backward, setup_context=_setup_context)


# ------------------------------------------------------------------------- depthwise in fp32

torch.library.define(
    "fastinfer::depthwise_conv2d",
    "(Tensor x, Tensor weight, Tensor? bias, int[] kernel_size, int[] stride, int[] padding, int[] dilation, "
    "int act=0, ScalarType? out_dtype=None) -> Tensor",
)


def pack_depthwise_weight(w: torch.Tensor) -> torch.Tensor:
    """The fp32 depthwise kernel's layout of a float weight [c, 1, kh, kw]: float32
    [kh * kw, round_up(c, 16)], zero padded."""
    if not isinstance(w, torch.Tensor) or w.dim() != 4 or w.shape[1] != 1 or not w.is_floating_point():
        raise TypeError(f"fastinfer.pack_depthwise_weight: w must be a float [channels, 1, kh, kw] tensor, got {getattr(w, 'shape', w)}")
    c, _, kh, kw = w.shape
    cp = (c + 15) // 16 * 16
    with torch.inference_mode(False):
        out = torch.zeros((kh * kw, cp), dtype=torch.float32)
        out[:, :c] = w.detach().float().cpu().reshape(c, kh * kw).t()
    return out


def _check_dw_args(x, weight, bias, kernel_size, stride, padding, dilation, act):
    name = "depthwise_conv2d"
    check_tensor(name, "x", x)
    check_tensor(name, "weight", weight)
    check_device(name, x=x, weight=weight, bias=bias)
    _check_x_dtype(name, x)
    if x.dim() != 4:
        raise ValueError(f"fastinfer.{name}: x must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    k, s, d, p = _pair("kernel_size", kernel_size, 1), _pair("stride", stride, 1), _pair("dilation", dilation, 1), _padding4(padding)
    cp = (c + 15) // 16 * 16
    if weight.dtype != torch.float32 or tuple(weight.shape) != (k[0] * k[1], cp):
        raise TypeError(f"fastinfer.{name}: weight must be pack_depthwise_weight's float32 [{k[0] * k[1]}, {cp}], "
                        f"got {weight.dtype} {tuple(weight.shape)}")  # fmt: skip
    if bias is not None and (bias.dtype != torch.float32 or tuple(bias.shape) != (c,)):
        raise TypeError(f"fastinfer.{name}: bias must be float32 [{c}], got {bias.dtype} {tuple(bias.shape)}")
    activation_name(name, act)
    oh, ow = conv2d_output_size(h, w, k, s, p, d)
    if oh < 1 or ow < 1:
        raise ValueError(f"fastinfer.{name}: input {h}x{w} is smaller than the dilated kernel")
    return (n, c, oh, ow), k, s, p, d


@torch.library.register_fake("fastinfer::depthwise_conv2d")
def _depthwise_fake(x, weight, bias, kernel_size, stride, padding, dilation, act=0, out_dtype=None):
    shape, *_ = _check_dw_args(x, weight, bias, kernel_size, stride, padding, dilation, act)
    _check_out_dtype("depthwise_conv2d", out_dtype, act)
    return x.new_empty(shape, dtype=_out_dtype(x, out_dtype)).contiguous(memory_format=_memory_format(x))


def run_depthwise(x, weight, bias, k, s, p, d, act, shape, out_dtype=None) -> torch.Tensor:
    """The marshalling of _C.depthwise_conv2d_f32 on checked arguments; the output in out_dtype (None:
    x's), as run_conv2d."""
    n, c, oh, ow = shape
    fmt = _memory_format(x)
    out_dtype = _out_dtype(x, out_dtype)
    out = new_output((n, c, oh, ow), out_dtype, channels_last=True)
    if out.numel() == 0:
        return out.contiguous(memory_format=fmt)
    xn = x.contiguous(memory_format=torch.channels_last)
    h, w = x.shape[2:]
    code = CONV_DTYPE_CODE[x.dtype]
    _C.depthwise_conv2d_f32(xn.data_ptr(), code, [n, h, w, c, c, k[0], k[1], s[0], s[1], p[0], p[1], d[0], d[1], c, oh, ow],
                            weight.data_ptr(), weight.numel(), 0 if bias is None else bias.data_ptr(), out.data_ptr(),
                            CONV_DTYPE_CODE[out_dtype], act)  # fmt: skip
    return out if fmt == torch.channels_last else out.contiguous()


@register("depthwise_conv2d", "CPU")
def _depthwise_cpu(x, weight, bias, kernel_size, stride, padding, dilation, act=0, out_dtype=None):
    shape, k, s, p, d = _check_dw_args(x, weight, bias, kernel_size, stride, padding, dilation, act)
    _check_out_dtype("depthwise_conv2d", out_dtype, act)
    return run_depthwise(x, weight.contiguous(), None if bias is None else bias.contiguous(), k, s, p, d, act, shape,
                         out_dtype)  # fmt: skip


def _dw_setup_context(ctx, inputs, output):
    x, weight, bias, kernel_size, stride, padding, dilation, act = inputs[:8]
    ctx.save_for_backward(weight, output if act in (2, 3) else None)
    ctx.meta = (tuple(x.shape), x.dtype, tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation), act)


def _dw_backward(ctx, grad):
    weight, out = ctx.saved_tensors
    shape, dtype, k, s, p, d, act = ctx.meta
    c = shape[1]
    wf = weight[:, :c].t().reshape(c, 1, k[0], k[1])
    gx = _input_gradient("depthwise_conv2d", grad, out, act, wf, shape, dtype, s, p, d, c)
    return gx, None, None, None, None, None, None, None, None


torch.library.register_autograd("fastinfer::depthwise_conv2d", _dw_backward, setup_context=_dw_setup_context)
