"""Int8Linear (dynamic), StaticInt8Linear and WeightOnlyInt8Linear: the dense int8 layers, and the
per-channel weight quantization they store."""

from __future__ import annotations

import torch
from torch import nn

from fastinfer import ops
from fastinfer.nn._base import (
    _FastForward,
    _FusedActivation,
    apply_keeping_dtypes,
    check_features,
    check_scale,
    layer_repr,
    linear_weight_and_bias,
)
from fastinfer.ops.linear import check_packed, prepare_int8_linear, prepare_static_int8_linear


def quantize_weight_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: scale = max|w_row| / 127, q = round_half_even(w / scale).

    Returns (q int8 [N, K] in [-127, 127], scale float32 [N]); an all-zero row gets scale 0.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    w = weight.detach().to(torch.float32)
    if not torch.isfinite(w).all():
        bad = (~torch.isfinite(w)).any(dim=1).nonzero().flatten()[:5].tolist()
        raise ValueError(f"weight has NaN or Inf (rows {bad}...); cannot quantize it")
    amax = w.abs().amax(dim=1) if w.shape[1] > 0 else w.new_zeros(w.shape[0])
    scale = amax / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale.contiguous()


class Int8Linear(_FusedActivation, _FastForward, nn.Module):
    """y = x @ W^T + b with int8 weights (per output channel) and int8 activations (per token).

    The integer product is exact (int32 accumulation); the error is that of rounding x and W to
    8 bits. Inputs float32 or bfloat16 with any leading dims [..., in_features]; the output has the
    input's dtype. The weights are buffers (no gradient); backward() gives the input's gradient
    through the dequantized weights (fastinfer/ops/autograd.py), for activation None, "gelu",
    "relu" and "relu6".

    activation: None, or "gelu" to return gelu(y) (erf GELU, fused into the kernel's fp32 epilogue).
    input_scale: None, or float32 [in_features] multiplying x before the layer (SmoothQuant's
    smoothing where no norm before the layer can take it: quantize(..., QuantConfig(smoothquant=a))).
    """

    packed_weight: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None
    input_scale: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str | None = None) -> None:
        super().__init__()
        check_features(in_features, out_features)
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        zero = torch.zeros((out_features, in_features), dtype=torch.int8)
        self.register_buffer("packed_weight", ops.pack_int8_weight(zero), persistent=False)
        self.register_buffer("weight_scale", torch.zeros(out_features, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32) if bias else None)
        # SmoothQuant where no norm before the layer can take the smoothing: x * input_scale runs
        # before the layer (float32 [in_features]; None: no scaling, the default)
        self.register_buffer("input_scale", None)

    @classmethod
    def from_linear(cls, linear: nn.Module, activation: str | None = None) -> Int8Linear:
        """Quantizes the weights of an nn.Linear, or of a Hugging Face `Conv1D` (GPT-2 style,
        weight stored [in, out]); the float module is left untouched. activation: fused after
        the linear (None or "gelu")."""
        weight, bias = linear_weight_and_bias(linear)
        if weight is None:
            raise TypeError(
                f"from_linear expects an nn.Linear (or a transformers Conv1D), got {type(linear).__name__}"
            )
        q, scale = quantize_weight_per_channel(weight)
        mod = cls(weight.shape[1], weight.shape[0], bias=bias is not None, activation=activation)
        mod.set_weight(q.cpu(), scale.cpu())
        if bias is not None:
            mod.bias.copy_(bias.detach().float())
        mod.train(linear.training)  # swapping a layer must not flip an eval() model to training
        return mod.to(weight.device) if weight.device.type != "cpu" else mod

    def set_weight(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        """Sets int8 weights [out, in] and their per-channel float32 scales [out] (re-packs)."""
        if q.dtype != torch.int8 or tuple(q.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"weight must be int8 [{self.out_features}, {self.in_features}], got {q.dtype} {tuple(q.shape)}"
            )
        if tuple(scale.shape) != (self.out_features,):
            raise ValueError(f"scale must have shape [{self.out_features}], got {tuple(scale.shape)}")
        dev = self.packed_weight.device  # pack in the layout of the device the layer is on
        self.packed_weight = ops.pack_int8_weight(q.detach().to(dev))
        self.weight_scale = scale.detach().to(device=dev, dtype=torch.float32).contiguous()

    # ------------------------------------------------------------------------- state_dict (files)
    # The state_dict holds the portable form, int8 [out, in] under "weight_int8" with weight_scale
    # and bias; packed_weight is this device's kernel layout (K4N16 on CPU, RN128 on CUDA), a
    # non-persistent buffer built from it. One copy of the weight lives in memory: the int8 form is
    # unpacked when a state_dict is taken and packed again when one is loaded. Files written before
    # state format 2 hold the CPU packed layout under "packed_weight": they load (fully validated).

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight_int8"] = self.weight_int8
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):  # fmt: skip
        key, legacy = prefix + "weight_int8", prefix + "packed_weight"
        shape = [self.out_features, self.in_features]
        errors_before = len(error_msgs)
        self._take_input_scale(prefix + "input_scale", state_dict, error_msgs)
        q = None
        if key in state_dict:
            w = state_dict[key]
            if not isinstance(w, torch.Tensor) or w.dtype != torch.int8 or list(w.shape) != shape:
                what = f"{w.dtype} {list(w.shape)}" if isinstance(w, torch.Tensor) else type(w).__name__
                error_msgs.append(f"{key}: holds {what}, this layer needs int8 {shape}")
            else:
                q = w.detach()
        elif legacy in state_dict:
            q = self._legacy_weight(legacy, state_dict[legacy], shape, error_msgs)
        else:
            missing_keys.append(key)
        check_scale(prefix + "weight_scale", state_dict, error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)  # fmt: skip
        for k in (key, legacy):  # ours, though not a registered persistent buffer
            while k in unexpected_keys:
                unexpected_keys.remove(k)
        if q is None or len(error_msgs) != errors_before:
            return
        dev = self.packed_weight.device
        if dev.type == "meta" and local_metadata.get("assign_to_params_buffers", False):
            dev = q.device  # load_state_dict(assign=True) into a layer built on meta
        if q.device.type == "meta" or dev.type == "meta":
            self._buffers["packed_weight"] = torch.empty_like(self.packed_weight, device="meta")
            return
        with torch.inference_mode(False):  # a version-tracked buffer even when loaded under inference_mode
            packed = ops.pack_int8_weight(q.to(dev).contiguous())
        self._buffers["packed_weight"] = packed  # a new object: a prepared fast call no longer matches

    def _take_input_scale(self, key: str, state_dict, error_msgs: list[str]) -> None:
        """A state_dict with an input_scale gives the layer one to load into (and checks it: finite,
        > 0, [in_features]); one without it leaves the layer's as it is (a missing key if it has one)."""
        incoming = state_dict.get(key)
        if incoming is None:
            return
        if not isinstance(incoming, torch.Tensor) or incoming.dim() != 1 or incoming.shape[0] != self.in_features:
            what = f"{incoming.dtype} {list(incoming.shape)}" if isinstance(incoming, torch.Tensor) else type(incoming).__name__
            error_msgs.append(f"{key}: holds {what}, this layer needs float32 [{self.in_features}]")
            return
        if incoming.device.type != "meta" and not (torch.isfinite(incoming).all() and (incoming > 0).all()):
            error_msgs.append(f"{key}: input scales must be finite and > 0")
            return
        if self.input_scale is None:
            self.input_scale = torch.empty(self.in_features, dtype=torch.float32, device=self.weight_scale.device)

    @staticmethod
    def _legacy_weight(key: str, incoming, shape: list[int], error_msgs: list[str]) -> torch.Tensor | None:
        """The int8 weight of a state format 1 entry (the CPU packed layout), checked in full
        (header, padding, column sums) before it is read: a tampered one is an error naming the key."""
        if not isinstance(incoming, torch.Tensor) or incoming.device.type != "cpu":
            error_msgs.append(f"{key}: a packed weight from an older file must be a CPU tensor "
                              "(re-save the model from the CPU)")  # fmt: skip
            return None
        try:
            packed, n, k = check_packed("load_state_dict", incoming.detach().contiguous(), force=True)
        except (TypeError, ValueError) as e:
            error_msgs.append(f"{key}: not a valid fastinfer packed int8 weight ({e})")
            return None
        if [n, k] != shape:
            error_msgs.append(f"{key}: holds an int8 {[n, k]} weight, this layer is {shape}")
            return None
        return ops.unpack_int8_weight(packed, n, k)

    def _apply(self, fn, recurse=True):
        # model.bfloat16() / .half() / .to(dtype) cast every floating buffer. Ours are fp32 by
        # contract (the kernel's epilogue reads fp32 scales and bias) and a round trip through
        # bf16 would lose bits, so keep the originals; device moves still apply.
        before = apply_keeping_dtypes(self, super()._apply, fn, recurse)
        # A move between CPU and CUDA re-packs: each device's kernels have their own weight layout.
        old_p, new_p = before["packed_weight"], self._buffers["packed_weight"]
        if old_p.device.type != new_p.device.type:
            w = ops.unpack_int8_weight(old_p, self.out_features, self.in_features).cpu()
            self._buffers["packed_weight"] = ops.pack_int8_weight(w.to(new_p.device))
        return self

    @property
    def weight_int8(self) -> torch.Tensor:
        """The int8 weights [out, in], unpacked from the packed buffer."""
        return ops.unpack_int8_weight(self.packed_weight, self.out_features, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        """float32 [out, in]: what this layer effectively multiplies x by (input_scale included)."""
        w = self.weight_int8.float() * self.weight_scale[:, None]
        return w if self.input_scale is None else w * self.input_scale[None, :]

    _WEIGHT = "packed_weight"

    _ADDS_RESIDUAL = True

    def _op(self, x: torch.Tensor, activation: str | None) -> torch.Tensor:
        return ops.int8_linear(x, self.packed_weight, self.weight_scale, self.bias, activation)

    def _op_residual(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return ops.int8_linear(x, self.packed_weight, self.weight_scale, self.bias, self.activation, residual)

    def _prepare(self):
        return prepare_int8_linear(self.packed_weight, self.weight_scale, self.bias, self.in_features, self._act_code())

    def _smooth_repr(self) -> tuple[str, ...]:
        return () if self.input_scale is None else ("input_scale=SmoothQuant",)

    def extra_repr(self) -> str:
        return layer_repr(self, "weight=int8 per-channel", "act=int8 per-token", *self._act_repr(), *self._smooth_repr())


class WeightOnlyInt8Linear(Int8Linear):
    """y = x @ W^T + b with int8 weights (per output channel) and the activations left as they are
    (W8A32: fastinfer.ops.weight_only_linear). The weight is stored and streamed as int8 (a quarter
    of fp32's bytes) and widened to fp32 in registers; x is never quantized, so the only error is the
    weight's rounding, whatever outliers the activations have. As fast as Int8Linear at one to a few
    rows (decoding, small batches: the weight bytes are the limit), slower from ~8 rows on (fp32
    FMA instead of int8 dot products); bit-identical on every ISA. CPU only.

    Same weights, state_dict and conversions as Int8Linear (from_linear, set_weight, activation,
    backward); QuantConfig(activations="none") makes quantize() build these.
    """

    _ADDS_RESIDUAL = False

    def _op(self, x: torch.Tensor, activation: str | None) -> torch.Tensor:
        return ops.weight_only_linear(x, self.packed_weight, self.weight_scale, self.bias, activation)

    def _prepare(self):
        return prepare_int8_linear(self.packed_weight, self.weight_scale, self.bias, self.in_features,
                                   self._act_code(), "weight_only_linear")  # fmt: skip

    def extra_repr(self) -> str:
        return layer_repr(self, "weight=int8 per-channel", "act=float (weight-only)", *self._act_repr(), *self._smooth_repr())


class StaticInt8Linear(Int8Linear):
    """y = x @ W^T + b with int8 weights (per output channel) and int8 activations quantized with one
    calibrated scale (fastinfer.ops.static_int8_linear): x_scale, a float32 buffer of one element,
    is max|x| over the calibration inputs / 127. One pass over x instead of per-token quantization's
    two; values past the calibrated range saturate at +-127 (a per-token scale would follow them),
    so the error depends on how well the calibration data covers the inputs; a row holding NaN or
    Inf gives a NaN row. QuantConfig(activations="static") with calibration_data makes quantize()
    build these (fastinfer.optimize keeps one only where its output's SQNR stays within budget).

    Same weights, state_dict (plus x_scale), conversions and backward as Int8Linear.
    """

    x_scale: torch.Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str | None = None,
                 x_scale: float = 1.0) -> None:  # fmt: skip
        super().__init__(in_features, out_features, bias=bias, activation=activation)
        self.register_buffer("x_scale", torch.tensor([_check_x_scale(x_scale)], dtype=torch.float32))

    @classmethod
    def from_linear(cls, linear: nn.Module, activation: str | None = None, x_scale: float = 1.0) -> StaticInt8Linear:
        """Quantizes the weights of an nn.Linear (or transformers Conv1D) as Int8Linear.from_linear
        does; x_scale: the input's scale (max|x| / 127 over calibration inputs, finite and > 0)."""
        _check_x_scale(x_scale)
        mod = super().from_linear(linear, activation=activation)
        mod.x_scale.fill_(x_scale)
        return mod

    @classmethod
    def from_int8linear(cls, layer: Int8Linear, x_scale: float) -> StaticInt8Linear:
        """The same weights, bias, activation and input_scale as `layer` (copies), activations
        quantized with x_scale."""
        new = cls(layer.in_features, layer.out_features, bias=layer.bias is not None, activation=layer.activation,
                  x_scale=x_scale)  # fmt: skip
        new.set_weight(layer.weight_int8, layer.weight_scale.clone())
        if layer.bias is not None:
            new.bias.copy_(layer.bias)
        if layer.input_scale is not None:
            new.input_scale = layer.input_scale.clone()
        new.train(layer.training)
        return new.to(layer.weight_scale.device)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):  # fmt: skip
        xs = state_dict.get(prefix + "x_scale")
        if isinstance(xs, torch.Tensor) and xs.device.type != "meta":
            if xs.dtype != torch.float32 or xs.numel() != 1:
                error_msgs.append(f"{prefix}x_scale: holds {xs.dtype} {list(xs.shape)}, this layer needs float32 [1]")
            elif not (torch.isfinite(xs).all() and (xs > 0).all() and torch.isfinite(1.0 / xs).all()):
                error_msgs.append(f"{prefix}x_scale: the input scale must be finite and > 0")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)  # fmt: skip

    _EXTRA = ("x_scale",)

    def _op(self, x: torch.Tensor, activation: str | None) -> torch.Tensor:
        return ops.static_int8_linear(x, self.packed_weight, self.weight_scale, self.bias, self.x_scale, activation)

    def _op_residual(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return ops.static_int8_linear(x, self.packed_weight, self.weight_scale, self.bias, self.x_scale,
                                      self.activation, residual)  # fmt: skip

    def _prepare(self):
        return prepare_static_int8_linear(self.packed_weight, self.weight_scale, self.bias, self.x_scale,
                                          self.in_features, self._act_code())  # fmt: skip

    def extra_repr(self) -> str:
        return layer_repr(self, "weight=int8 per-channel", f"act=int8 static (scale {float(self.x_scale):.4g})",
                          *self._act_repr(), *self._smooth_repr())  # fmt: skip


def _check_x_scale(x_scale: object) -> float:
    if isinstance(x_scale, torch.Tensor):
        x_scale = float(x_scale.reshape(-1)[0]) if x_scale.numel() == 1 else x_scale
    if not isinstance(x_scale, (int, float)) or isinstance(x_scale, bool):
        raise TypeError(f"x_scale must be a float, got {type(x_scale).__name__}")
    v = float(x_scale)
    if not 1e-30 <= v <= 1e30:  # inside float32's range, and so is 1 / v
        raise ValueError(f"x_scale must be in [1e-30, 1e30] (finite and > 0), got {x_scale!r}")
    return v
