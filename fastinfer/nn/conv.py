"""Int8Conv2d: the int8 convolution layer (fastinfer/ops/conv.py) and the conversion of a float
nn.Conv2d, with an optional BatchNorm2d folded in and an activation fused into the epilogue."""

from __future__ import annotations

import torch
from torch import nn

from fastinfer import _runtime
from fastinfer.nn._base import TORCH_ACT as _TORCH_ACT, _FusedActivation, apply_keeping_dtypes, check_scale
from fastinfer.nn.linear import quantize_weight_per_channel
from fastinfer.ops import conv as _conv
from fastinfer.ops._common import eager_fast_path

__all__ = ["DepthwiseConv2d", "Int8Conv1d", "Int8Conv2d", "conv_padding", "fold_batchnorm", "hands_uint8"]


def conv_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) zero padding of a float conv, "same" and "valid" included ("same"
    puts the odd pixel at the bottom/right, as torch does)."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return 0, 0, 0, 0
        th, tw = (d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size))
        return th // 2, tw // 2, th - th // 2, tw - tw // 2
    ph, pw = conv.padding
    return ph, pw, ph, pw


def fold_batchnorm(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of conv followed by bn in eval mode, as one conv: w * g / sqrt(var + eps) per
    output channel, (b - mean) * g / sqrt(var + eps) + beta. Computed in float64."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("fold_batchnorm: the BatchNorm2d tracks no running statistics (track_running_stats=False)")
    w = weight.detach().double()
    var, mean = bn.running_var.detach().double(), bn.running_mean.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(var)
    k = gamma / torch.sqrt(var + bn.eps)
    b = bias.detach().double() if bias is not None else torch.zeros_like(var)
    return (w * k[:, None, None, None]).float(), ((b - mean) * k + beta).float()


def _cast_dtype(fn) -> torch.dtype | None:
    """The floating dtype an nn.Module._apply function casts every floating tensor to (model.float(),
    .bfloat16(), .to(dtype)), or None when it keeps their dtypes (.to(device), share_memory(), ...):
    told by applying it to a float32 and a bfloat16 scalar."""
    try:
        a, b = fn(torch.zeros((), dtype=torch.float32)), fn(torch.zeros((), dtype=torch.bfloat16))
    except Exception:  # noqa: BLE001 (a function made for other tensors: a device move, say)
        return None
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.is_floating_point():
        return a.dtype
    return None


class _ConvLayer(_FusedActivation, nn.Module):
    """What Int8Conv2d and DepthwiseConv2d share: the fused activation, the input contract, the
    dtype-keeping _apply, and forward(): the eager call without the dispatcher, or the op.
    Subclasses give _kernel_weight() (the cached kernel layout), _eager(x, weight, act, out_dtype) and
    _op(x, weight, act, out_dtype)."""

    _packed: tuple | None = None
    # The output's dtype: None (the input's, the default) or float32 / bfloat16 / uint8. quantize()
    # sets it in a chain of convs that feed only each other (fastinfer.convert.fuse.handoff_chains):
    # the inner ones hand bf16 on (half the bytes of fp32), or uint8 after a fused relu6 (a quarter:
    # fastinfer.ops.conv.U8_SCALE), the last returns the model's dtype and follows the model's casts
    # (model.bfloat16(), model.float()).
    _output_dtype: torch.dtype | None = None
    _follows_model_dtype: bool = False
    # Takes uint8 (the conv before it hands relu6 outputs over as bytes): set by quantize() on the
    # receiving end of a uint8 link only, so a raw uint8 image is refused, never read as that code.
    _takes_u8: bool = False

    @property
    def output_dtype(self) -> torch.dtype | None:
        return self._output_dtype

    @output_dtype.setter
    def output_dtype(self, value: torch.dtype | None) -> None:
        if value not in (None, torch.float32, torch.bfloat16, torch.uint8):
            raise ValueError(f"{type(self).__name__}.output_dtype must be None, torch.float32, torch.bfloat16 or "
                             f"torch.uint8, got {value!r}")  # fmt: skip
        if value == torch.uint8 and self.activation != "relu6":
            raise ValueError(f"{type(self).__name__}.output_dtype=torch.uint8 holds relu6's range [0, 6]: it needs "
                             f"activation='relu6', this layer has {self.activation!r}")  # fmt: skip
        self._output_dtype = value

    def _apply(self, fn, recurse=True):
        if self._follows_model_dtype:
            cast = _cast_dtype(fn)
            if cast is not None:  # model.float() / .bfloat16() / .to(dtype): the chain returns that dtype
                self._output_dtype = cast if cast in (torch.float32, torch.bfloat16) else None
        apply_keeping_dtypes(self, super()._apply, fn, recurse)  # fp32 scales and bias stay fp32
        self._packed = None
        self._prepack()
        return self

    def _prepack(self) -> None:
        """Builds the kernel layout now (weights just set, loaded or moved) rather than on the first
        call, so torch.export and torch.compile of a model that never ran eagerly find it as a
        constant instead of packing inside the graph on every call."""
        w = self._buffers.get(self._WEIGHT)
        if w is not None and w.device.type == "cpu" and not w.is_inference() and not torch.compiler.is_compiling():
            self._kernel_weight()

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._prepack()

    def _check_input(self, x: object) -> torch.Tensor:
        name = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} expects a tensor, got {type(x).__name__}")
        if x.dim() not in (3, 4):
            raise ValueError(f"{name} expects [N, C, H, W] or [C, H, W] input, got shape {tuple(x.shape)}")
        if x.shape[-3] != self.in_channels:
            raise ValueError(f"{name}({self.in_channels} -> {self.out_channels}) got input of shape {tuple(x.shape)}: "
                             f"{x.shape[-3]} channels, expected {self.in_channels}")  # fmt: skip
        if x.dtype == torch.uint8 and not self._takes_u8:
            raise TypeError(f"{name} got a uint8 input: it takes uint8 only from the conv before it when quantize() "
                            "linked them (QuantConfig(conv_handoff='u8'): bytes q * 6/254); convert images to "
                            "float32 or bfloat16 first")  # fmt: skip
        if x.dtype not in _conv.CONV_DTYPE_CODE:
            raise TypeError(f"{name} supports float32 and bfloat16 inputs, got {x.dtype}")
        if x.device.type != "cpu":
            raise RuntimeError(f"{name} runs on the CPU; got an input on {x.device} (no CUDA conv kernel yet)")
        return x

    # Whether the kernel adds a residual in its epilogue (Int8Conv2d off the depthwise path).
    _adds_residual = False

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """act(conv(x) + b), or with residual act(conv(x) + b + residual): the residual (a tensor of
        the output's shape) is added before the activation, in the kernel's epilogue when it has the
        output's dtype (one pass, rounded once), else as torch would after the conv (the same result
        as the unfused conv -> add -> activation). fastinfer.quantize() passes it where it rewrote a
        residual block (conv -> add -> relu, fastinfer.convert.fuse.rewrite_residual_blocks)."""
        x = self._check_input(x)
        if residual is not None and not (isinstance(residual, torch.Tensor) and residual.dim() == x.dim()):
            # a number, or a tensor broadcast to another rank: torch's add after the conv decides
            return _TORCH_ACT[self._act_code()](self.forward_unfused(x) + residual)
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
            residual = None if residual is None else residual.unsqueeze(0)
        weight, act = self._kernel_weight(), self._act_code()
        out_dtype = _conv._out_dtype(x, self._output_dtype)
        grad = x.requires_grad and torch.is_grad_enabled()
        if out_dtype == torch.uint8 and (grad or act != 3 or residual is not None or self._forward_hooks
                                         or _global_forward_hooks()):  # fmt: skip
            if act != 3:  # the activation was changed after output_dtype was set
                raise ValueError(f"{type(self).__name__}: output_dtype=torch.uint8 needs activation='relu6', "
                                 f"this layer has {self.activation!r}")  # fmt: skip
            # hand bf16 on (the next conv takes either): integers carry no gradient, and a forward
            # hook registered since quantize() would be handed bytes instead of values
            out_dtype = torch.bfloat16
        if residual is not None:
            y = self._residual_forward(x, weight, act, out_dtype, residual, grad)
        else:
            y = self._run(x, weight, act, out_dtype, grad)
        return y.squeeze(0) if unbatched else y

    def _residual_forward(self, x, weight, act: int, out_dtype: torch.dtype, residual, grad: bool) -> torch.Tensor:
        in_kernel = (self._adds_residual and residual.dtype == out_dtype and residual.device.type == "cpu"
                     and tuple(residual.shape) == _fast_shape(self, x, (self.weight_scale, self.bias))
                     and not (out_dtype == torch.bfloat16 and x.dtype == torch.float32 and grad))  # fmt: skip
        if in_kernel:
            if eager_fast_path(x) and eager_fast_path(residual):
                return self._eager(x, weight, act, out_dtype, residual)
            return self._op(x, weight, act, None if out_dtype == x.dtype and x.is_floating_point() else out_dtype,
                            residual)  # fmt: skip
        # what the unfused block computes: the conv's output in its dtype, torch's add, the activation
        return _TORCH_ACT[act](self._run(x, weight, 0, out_dtype, grad) + residual)

    def forward_unfused(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's conv without its activation (what an unfused block's add receives)."""
        x = self._check_input(x)
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        out_dtype = _conv._out_dtype(x, self._output_dtype)
        if out_dtype == torch.uint8:
            out_dtype = torch.bfloat16  # values, not the relu6 handoff's bytes
        y = self._run(x, self._kernel_weight(), 0, out_dtype, x.requires_grad and torch.is_grad_enabled())
        return y.squeeze(0) if unbatched else y

    def _run(self, x, weight, act: int, out_dtype: torch.dtype, grad: bool) -> torch.Tensor:
        """act(conv(x)) in out_dtype: the eager call without the dispatcher, or the op."""
        if eager_fast_path(x):
            return self._eager(x, weight, act, out_dtype)
        if out_dtype == torch.bfloat16 and x.dtype == torch.float32 and grad:
            # autograd saves the op's output for relu / relu6's gradient mask: kept fp32 (a value
            # just below 6 rounds to 6.0 in bf16), the cast after it rounds as the kernel's store
            return self._op(x, weight, act).to(out_dtype)
        return self._op(x, weight, act, None if out_dtype == x.dtype and x.is_floating_point() else out_dtype)




class Int8Conv2d(_ConvLayer):
    """y = act(conv2d(x, W) + b) with int8 weights (per output channel) and int8 activations.

    Each output pixel's im2col row (its taps x channels) is quantized with its own scale, so the
    integer part is exact (int32 sums, the same result on every ISA) and the error is that of
    rounding x and W to 8 bits; a depthwise conv (groups = channels) mixes pixels within a channel
    and gets one scale per sample. Inputs float32 or bfloat16, [N, C, H, W] or unbatched [C, H, W], in
    NCHW or channels_last; the output keeps the input's dtype and memory format. Zero padding only
    (any amount, asymmetric included), any kernel size, stride, dilation and groups. The state_dict
    holds the portable form (weight_int8 [out, in/groups, kh, kw], weight_scale, bias); the kernel
    layout is a cache built from it. Gradients flow to the input (through the dequantized weight)
    for activation None, "relu" and "relu6".

    activation: None, "relu", "relu6", "silu", "hardswish" or "gelu", fused into the epilogue.
    """

    weight_int8: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None
    _WEIGHT = "weight_int8"

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, activation: str | None = None) -> None:  # fmt: skip
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"Int8Conv2d: {name} must be a positive int, got {v!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"Int8Conv2d: groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _conv._pair("kernel_size", kernel_size, 1)
        self.stride = _conv._pair("stride", stride, 1)
        self.dilation = _conv._pair("dilation", dilation, 1)
        self.padding = _conv._padding4(padding)
        self.activation = activation
        kh, kw = self.kernel_size
        with torch.inference_mode(False):  # version-tracked buffers even when built under inference_mode
            self.register_buffer("weight_int8", torch.zeros((out_channels, in_channels // groups, kh, kw), dtype=torch.int8))
            self.register_buffer("weight_scale", torch.zeros(out_channels, dtype=torch.float32))
            self.register_buffer("bias", torch.zeros(out_channels, dtype=torch.float32) if bias else None)
        self._packed: tuple | None = None

    # ---------------------------------------------------------------------------------- building

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None, activation: str | None = None) -> Int8Conv2d:
        """Quantizes a float nn.Conv2d (zero padding), with bn (eval statistics) folded in first when
        given; the float modules are left untouched."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_conv expects an nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"Int8Conv2d supports zero padding only, this conv has padding_mode={conv.padding_mode!r}")
        weight, bias = conv.weight, conv.bias
        if bn is not None:
            if bn.num_features != conv.out_channels:
                raise ValueError(f"fold: BatchNorm2d({bn.num_features}) after a conv with {conv.out_channels} outputs")
            weight, bias = fold_batchnorm(weight, bias, bn)
        q, scale = quantize_weight_per_channel(weight.detach().float().reshape(conv.out_channels, -1))
        mod = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv_padding(conv),
                  conv.dilation, conv.groups, bias=bias is not None, activation=activation)  # fmt: skip
        mod.set_weight(q.reshape(conv.weight.shape), scale)
        if bias is not None:
            mod.bias.copy_(bias.detach().float())
        mod.train(conv.training)
        return mod

    def set_weight(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        """Sets int8 weights [out, in/groups, kh, kw] and their per-channel float32 scales [out]."""
        shape = tuple(self.weight_int8.shape)
        if q.dtype != torch.int8 or tuple(q.shape) != shape:
            raise ValueError(f"weight must be int8 {list(shape)}, got {q.dtype} {list(q.shape)}")
        if tuple(scale.shape) != (self.out_channels,):
            raise ValueError(f"scale must have shape [{self.out_channels}], got {list(scale.shape)}")
        if not torch.isfinite(scale).all() or (scale < 0).any():
            raise ValueError("scale must be finite and >= 0")
        with torch.inference_mode(False):
            self.weight_int8 = q.detach().cpu().contiguous().clone()
            self.weight_scale = scale.detach().to(torch.float32).cpu().contiguous().clone()
        self._packed = None
        self._prepack()

    def dequantized_weight(self) -> torch.Tensor:
        """float32 [out, in/groups, kh, kw]: what this layer effectively convolves with."""
        return self.weight_int8.float() * self.weight_scale[:, None, None, None]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):  # fmt: skip
        key = prefix + "weight_int8"
        incoming = state_dict.get(key)
        if incoming is not None and (incoming.dtype != torch.int8 or incoming.shape != self.weight_int8.shape):
            error_msgs.append(f"{key}: holds {incoming.dtype} {list(incoming.shape)}, this layer needs int8 "
                              f"{list(self.weight_int8.shape)}")  # fmt: skip
            return
        if not check_scale(prefix + "weight_scale", state_dict, error_msgs):
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)  # fmt: skip

    # ----------------------------------------------------------------------------------- forward

    @property
    def _adds_residual(self) -> bool:  # the GEMM paths do; the int8 depthwise kernel does not
        return not _conv.is_depthwise(self.in_channels, self.out_channels, self.groups)

    def _kernel_weight(self) -> torch.Tensor:
        """The kernel layout of weight_int8, rebuilt when the buffer changed (a new tensor, or an
        in-place write: its version)."""
        return _cached_layout(self, self.weight_int8, lambda w: _conv.pack_conv_weight(w, self.groups))

    def _eager(self, x: torch.Tensor, weight: torch.Tensor, act: int, out_dtype: torch.dtype,
               residual: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        # the op's own checks and kernel, without the dispatcher (our packed cache is trusted: built
        # here from weight_int8; its headers are still checked by the kernel)
        shape = _fast_shape(self, x, (self.weight_scale, self.bias))
        if shape is None:  # something to say about the call: the op's full checks say it
            shape, k, s, p, d, _ = _conv._check_args(x, weight, self.weight_scale, self.bias, self.kernel_size,
                                                     self.stride, self.padding, self.dilation, self.groups, act)  # fmt: skip
        else:
            k, s, p, d = self.kernel_size, self.stride, self.padding, self.dilation
        if residual is not None:
            _conv.check_residual("int8_conv2d", residual, shape, out_dtype, not self._adds_residual)
        # the kernel reads scale and bias by pointer: a strided buffer (load_state_dict(assign=True)
        # of a view, a plain assignment) must be made dense first, as the op does
        bias = None if self.bias is None else self.bias.contiguous()
        return _conv.run_conv2d(x, weight, self.weight_scale.contiguous(), bias, k, s, p, d, self.groups, act, shape,
                                out_dtype, residual)  # fmt: skip

    def _op(self, x: torch.Tensor, weight: torch.Tensor, act: int, out_dtype: torch.dtype | None = None,
            residual: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        return torch.ops.fastinfer.int8_conv2d(x, weight, self.weight_scale, self.bias, list(self.kernel_size),
                                               list(self.stride), list(self.padding), list(self.dilation),
                                               self.groups, act, out_dtype, residual)  # fmt: skip

    def extra_repr(self) -> str:
        return _conv_repr(self, "weight=int8 per-channel, act=int8 per-pixel" + (
            " (depthwise: per-sample)" if _conv.is_depthwise(self.in_channels, self.out_channels, self.groups) else ""))


def hands_uint8(model: nn.Module) -> bool:
    """Whether some conv of the model hands uint8 to the next (QuantConfig(conv_handoff="u8"))."""
    return any(isinstance(m, _ConvLayer) and m.output_dtype == torch.uint8 for m in model.modules())


def _global_forward_hooks() -> bool:
    """Whether forward hooks are registered for every module (nn.modules.module.register_module_forward_hook)."""
    return bool(nn.modules.module._global_forward_hooks)


def _fast_shape(layer: nn.Module, x: torch.Tensor, vectors: tuple) -> tuple[int, int, int, int] | None:
    """The output size of an eager call whose arguments need no checking beyond these: x checked by
    _check_input (4-D here), the layer's geometry normalized at construction, its float32 [out]
    vectors (scale, bias) as the kernel reads them. None when anything else holds: the op's
    checks then run and raise (half of a small conv's Python time went to re-parsing the geometry)."""
    k, st, p, d = layer.kernel_size, layer.stride, layer.padding, layer.dilation
    if not (type(k) is tuple and type(st) is tuple and type(p) is tuple and type(d) is tuple
            and len(k) == len(st) == len(d) == 2 and len(p) == 4
            and min(k) >= 1 and min(st) >= 1 and min(d) >= 1 and min(p) >= 0):  # fmt: skip
        return None  # reassigned by hand: parsed and checked by the op's checks
    cout = layer.out_channels
    for v in vectors:
        if v is not None and (v.dtype != torch.float32 or v.shape != (cout,)):
            return None
    n, _, h, w = x.shape
    oh, ow = _conv.conv2d_output_size(h, w, k, st, p, d)
    return (n, cout, oh, ow) if oh >= 1 and ow >= 1 else None


def _cached_layout(layer: nn.Module, w: torch.Tensor, pack) -> torch.Tensor:
    """pack(w), kept on the layer while w is the same tensor at the same version and address. An
    inference tensor (a layer moved or loaded under torch.inference_mode) has no version counter:
    its layout is rebuilt on every call. Under torch.compile the layout built by the last eager
    call is used as a constant (run the model once eagerly first, or it is packed inside the graph)."""
    if torch.compiler.is_compiling():
        return layer._packed[1] if layer._packed is not None else pack(w)
    try:
        key = (id(w), w._version, w.data_ptr())
    except RuntimeError:
        return pack(w)
    if layer._packed is None or layer._packed[0] != key:
        layer._packed = (key, pack(w))
    return layer._packed[1]


def _conv_repr(layer: nn.Module, what: str) -> str:
    pt, pl, pb, pr = layer.padding
    pad = f"({pt}, {pl})" if (pt, pl) == (pb, pr) else f"(top={pt}, left={pl}, bottom={pb}, right={pr})"
    parts = [f"{layer.in_channels}, {layer.out_channels}, kernel_size={layer.kernel_size}, stride={layer.stride}",
             f"padding={pad}"]  # fmt: skip
    if layer.dilation != (1, 1):
        parts.append(f"dilation={layer.dilation}")
    if layer.groups != 1:
        parts.append(f"groups={layer.groups}")
    parts.append(f"bias={layer.bias is not None}")
    if layer._activation is not None:
        parts.append(f"activation={layer._activation}")
    if layer._output_dtype is not None:
        parts.append(f"output_dtype={str(layer._output_dtype).replace('torch.', '')}")
    parts.append(f"{what}, kernel={_runtime.active_isa()}")
    return ", ".join(parts)


class DepthwiseConv2d(_ConvLayer):
    """A depthwise nn.Conv2d (groups = in = out channels) in fp32 on fastinfer's NHWC kernel, with
    a BatchNorm2d folded in and an activation fused into it: what fastinfer.quantize() puts in place
    of depthwise convs. Their few multiply-adds per byte make them memory-bound, so int8 would only
    add a quantization pass; this layer reads the input once and writes the output once (torch runs
    conv, BatchNorm and activation as three passes). Exact fp32 arithmetic (fma over the taps in
    order), the same on every ISA. Inputs float32 or bfloat16, NCHW or channels_last; the output
    keeps the input's dtype and memory format. Gradients flow to the input for activation None,
    "relu" and "relu6". State: weight (float32 [c, 1, kh, kw]) and bias."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    _WEIGHT = "weight"

    def __init__(self, channels: int, kernel_size, stride=1, padding=0, dilation=1, bias: bool = True,
                 activation: str | None = None) -> None:  # fmt: skip
        super().__init__()
        if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
            raise ValueError(f"DepthwiseConv2d: channels must be a positive int, got {channels!r}")
        self.in_channels = self.out_channels = self.groups = channels
        self.kernel_size = _conv._pair("kernel_size", kernel_size, 1)
        self.stride = _conv._pair("stride", stride, 1)
        self.dilation = _conv._pair("dilation", dilation, 1)
        self.padding = _conv._padding4(padding)
        self.activation = activation
        with torch.inference_mode(False):
            self.register_buffer("weight", torch.zeros((channels, 1, *self.kernel_size), dtype=torch.float32))
            self.register_buffer("bias", torch.zeros(channels, dtype=torch.float32) if bias else None)
        self._packed: tuple | None = None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None, activation: str | None = None) -> DepthwiseConv2d:
        if not isinstance(conv, nn.Conv2d) or not _conv.is_depthwise(conv.in_channels, conv.out_channels, conv.groups):
            raise TypeError("DepthwiseConv2d.from_conv expects a depthwise nn.Conv2d (groups = in = out channels)")
        if conv.padding_mode != "zeros":
            raise ValueError(f"DepthwiseConv2d supports zero padding only, this conv has padding_mode={conv.padding_mode!r}")
        weight, bias = conv.weight.detach().float(), conv.bias
        if bn is not None:
            weight, bias = fold_batchnorm(weight, bias, bn)
        if not torch.isfinite(weight).all():
            raise ValueError("DepthwiseConv2d.from_conv: the weight has NaN or Inf")
        mod = cls(conv.in_channels, conv.kernel_size, conv.stride, conv_padding(conv), conv.dilation,
                  bias=bias is not None, activation=activation)  # fmt: skip
        with torch.no_grad():
            mod.weight.copy_(weight)
            if bias is not None:
                mod.bias.copy_(bias.detach().float())
        mod.train(conv.training)
        mod._prepack()
        return mod

    def _kernel_weight(self) -> torch.Tensor:
        return _cached_layout(self, self.weight, _conv.pack_depthwise_weight)

    def _eager(self, x: torch.Tensor, weight: torch.Tensor, act: int, out_dtype: torch.dtype) -> torch.Tensor:
        shape = _fast_shape(self, x, (self.bias,))
        if shape is None:
            shape, k, s, p, d = _conv._check_dw_args(x, weight, self.bias, self.kernel_size, self.stride,
                                                     self.padding, self.dilation, act)  # fmt: skip
        else:
            k, s, p, d = self.kernel_size, self.stride, self.padding, self.dilation
        return _conv.run_depthwise(x, weight, None if self.bias is None else self.bias.contiguous(), k, s, p, d, act, shape,
                                   out_dtype)  # fmt: skip

    def _op(self, x: torch.Tensor, weight: torch.Tensor, act: int, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.ops.fastinfer.depthwise_conv2d(x, weight, self.bias, list(self.kernel_size), list(self.stride),
                                                    list(self.padding), list(self.dilation), act, out_dtype)  # fmt: skip

    def extra_repr(self) -> str:
        return _conv_repr(self, "weight=fp32 (depthwise kernel)")


class Int8Conv1d(nn.Module):
    """nn.Conv1d in int8 (audio and sequence models): the same kernels as Int8Conv2d on a [N, C, 1,
    L] view, so the same numerics (each output position's im2col row quantized on its own; a
    depthwise Conv1d gets one scale per sample). Inputs [N, C, L] or unbatched [C, L]."""

    def __init__(self, conv2d: Int8Conv2d) -> None:
        super().__init__()
        self.conv2d = conv2d

    @classmethod
    def from_conv(cls, conv: nn.Conv1d, activation: str | None = None) -> Int8Conv1d:
        if not isinstance(conv, nn.Conv1d):
            raise TypeError(f"Int8Conv1d.from_conv expects an nn.Conv1d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"Int8Conv1d supports zero padding only, this conv has padding_mode={conv.padding_mode!r}")
        if isinstance(conv.padding, str):
            if conv.padding == "valid":
                pad = (0, 0)
            else:
                total = conv.dilation[0] * (conv.kernel_size[0] - 1)
                pad = (total // 2, total - total // 2)
        else:
            pad = (conv.padding[0], conv.padding[0])
        c2 = nn.Conv2d(conv.in_channels, conv.out_channels, (1, conv.kernel_size[0]), (1, conv.stride[0]), 0,
                       (1, conv.dilation[0]), conv.groups, bias=conv.bias is not None)  # fmt: skip
        with torch.no_grad():
            c2.weight.copy_(conv.weight.detach().unsqueeze(2))
            if conv.bias is not None:
                c2.bias.copy_(conv.bias.detach())
        inner = Int8Conv2d.from_conv(c2, activation=activation)
        inner.padding = (0, pad[0], 0, pad[1])
        mod = cls(inner)
        mod.train(conv.training)
        return mod

    @property
    def in_channels(self) -> int:
        return self.conv2d.in_channels

    @property
    def out_channels(self) -> int:
        return self.conv2d.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"Int8Conv1d expects [N, C, L] or [C, L] input, got {shape}")
        return self.conv2d(x.unsqueeze(-2)).squeeze(-2)

    def extra_repr(self) -> str:
        k, s, d, (_, pl, _, pr) = self.conv2d.kernel_size[1], self.conv2d.stride[1], self.conv2d.dilation[1], self.conv2d.padding
        act = f", activation={self.conv2d.activation}" if self.conv2d.activation else ""
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={k}, stride={s}, padding=({pl}, {pr}), "
                f"dilation={d}, groups={self.conv2d.groups}{act}, weight=int8 per-channel, act=int8 per-position")  # fmt: skip
