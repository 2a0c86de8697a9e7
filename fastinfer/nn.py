"""Modules that replace float layers. Each is a plain nn.Module whose forward calls fastinfer ops."""

from __future__ import annotations

import weakref

import torch
from torch import nn

from fastinfer import _runtime, ops
from fastinfer.ops._common import DTYPE_CODE, aligned_empty, eager_fast_path
from fastinfer.ops.linear import prepare_int8_linear
from fastinfer.ops.sparse import formats_for, prepare_sparse_int8_linear, prepare_sparse_linear

__all__ = [
    "Int8Linear", "SparseInt8Linear", "SparseLinear", "linear_weight_and_bias", "quantize_weight_per_channel",
]  # fmt: skip


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


def linear_weight_and_bias(module: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(weight [out, in], bias or None) of a linear layer: nn.Linear itself, or a Hugging Face
    transformers `Conv1D` (GPT-2's attention and MLP layers: y = x @ W + b with W [in, out]).
    Returns (None, None) for anything else."""
    if type(module) is nn.Linear:
        return module.weight, module.bias
    if (
        type(module).__name__ == "Conv1D"
        and type(module).__module__.startswith("transformers.")
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and module.weight.dim() == 2
        and getattr(module, "nf", None) == module.weight.shape[1]
    ):
        return module.weight.t(), module.bias
    return None, None


def _check_layer_input(layer: nn.Module, x: object) -> None:
    """The input contract of every fastinfer linear layer: a float32/bfloat16 tensor [..., in]."""
    name = type(layer).__name__
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} expects a tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != layer.in_features:
        raise ValueError(
            f"{name}({layer.in_features} -> {layer.out_features}) got input of shape "
            f"{tuple(x.shape)}; the last dim must be {layer.in_features}"
        )
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"{name} supports float32 and bfloat16 inputs, got {x.dtype}")


class _FastCall:
    """An eager CPU call of a fastinfer linear layer without the op layer's per-call checks (~7 us of
    Python: a small layer goes from 10 to 3.5 us per call, as fast as nn.Linear; a 90%-sparse
    4096x4096 layer at M = 1 spends a quarter of its time there otherwise).

    It runs the prepared call (fastinfer/ops/_prepared.py) that the op's own CPU kernel runs, built
    for the layer's buffers after a call that ran the full checks (weight validated, shapes, dtypes,
    alignment), and is used only while the layer holds the same buffer objects at the same versions,
    addresses and sizes: an in-place write through torch bumps a version, a replaced buffer is
    another object, a storage moved by share_memory_() or `.data =` has another address (no version
    bump there, and the prepared call passes the old address). Inputs that are not plain CPU float
    tensors, or that autograd or the compiler would see, take the full path. Kept outside the
    module (see _FAST), so copies and pickles of a layer never carry it."""

    __slots__ = ("key", "run", "k")

    def __init__(self, layer: nn.Module, run) -> None:
        bufs = layer._buffers
        self.key = tuple((name, t, None if t is None else (t._version, t.data_ptr(), t.numel()))
                         for name in _FastCall.names(layer) for t in (bufs[name],))  # fmt: skip
        self.run, self.k = run, layer.in_features

    @staticmethod
    def names(layer: nn.Module) -> tuple[str, ...]:
        """The buffers the layer's kernel reads."""
        return (layer._WEIGHT, "weight_scale", "bias") if "weight_scale" in layer._buffers else (layer._WEIGHT, "bias")

    def valid_for(self, layer: nn.Module) -> bool:
        bufs = layer._buffers
        for name, t, state in self.key:
            if bufs.get(name) is not t or (t is not None and (t._version, t.data_ptr(), t.numel()) != state):
                return False
        return True

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        if (
            type(x) is not torch.Tensor
            or not x.is_cpu
            or x.dtype not in DTYPE_CODE
            or x.dim() == 0
            or x.shape[-1] != self.k
            or (x.requires_grad and torch.is_grad_enabled())
        ):
            return None
        return self.run(x)

    @staticmethod
    def usable(layer: nn.Module) -> bool:
        """Buffers the fast call can serve: plain, version-tracked CPU tensors (not inference tensors)."""
        for name in _FastCall.names(layer):
            t = layer._buffers.get(name)
            if t is None and name == "bias":
                continue
            if type(t) is not torch.Tensor or t.device.type != "cpu" or t.is_inference() or not t.is_contiguous():
                return False
        return True


# layer -> its _FastCall. Weak keys: an entry lives as long as its layer and is never copied with it.
_FAST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _FastForward:
    """forward() of the fastinfer linear layers: the layer's _FastCall when it is valid and takes the
    input, else the checked op; an eager checked call that found no valid _FastCall builds one (an
    input the fast call declines, e.g. one autograd would see, does not rebuild it). Subclasses give
    _WEIGHT (the weight buffer's name), _op(x) (the checked op) and _prepare() (the op's prepared
    call for the layer's buffers)."""

    _WEIGHT: str

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the compiler and torch.jit.trace see only dispatcher calls: they always take the op
        traced = torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None
        fast = None if traced else _FAST.get(self)
        if fast is not None and fast.valid_for(self):
            y = fast(x)
            if y is not None:
                return y
        else:
            fast = None
        _check_layer_input(self, x)
        y = self._op(x)
        if fast is None and not traced and eager_fast_path(x) and _FastCall.usable(self):
            _FAST[self] = _FastCall(self, self._prepare())  # the checks above passed
        return y


def _apply_keeping_dtypes(module: nn.Module, apply, fn, recurse) -> dict[str, torch.Tensor]:
    """Runs nn.Module._apply but undoes dtype changes of the module's own buffers (fp32 scales and
    bias by contract: model.bfloat16() would lose bits); device moves still apply. Returns the
    buffers as they were before."""
    before = {name: b for name, b in module._buffers.items() if b is not None}
    apply(fn, recurse)
    for name, old in before.items():
        new = module._buffers[name]
        if new is not None and new.dtype != old.dtype:
            module._buffers[name] = old.to(new.device)
    return before


class Int8Linear(_FastForward, nn.Module):
    """y = x @ W^T + b with int8 weights (per output channel) and int8 activations (per token).

    The integer product is exact (int32 accumulation); the error is that of rounding x and W to
    8 bits. Inputs float32 or bfloat16 with any leading dims [..., in_features]; the output has the
    input's dtype. Inference only (no autograd through the int8 kernel).
    """

    packed_weight: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        self.in_features = in_features
        self.out_features = out_features
        zero = torch.zeros((out_features, in_features), dtype=torch.int8)
        self.register_buffer("packed_weight", ops.pack_int8_weight(zero))
        self.register_buffer("weight_scale", torch.zeros(out_features, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Module) -> Int8Linear:
        """Quantizes the weights of an nn.Linear, or of a Hugging Face `Conv1D` (GPT-2 style,
        weight stored [in, out]); the float module is left untouched."""
        weight, bias = linear_weight_and_bias(linear)
        if weight is None:
            raise TypeError(
                f"from_linear expects an nn.Linear (or a transformers Conv1D), got {type(linear).__name__}"
            )
        q, scale = quantize_weight_per_channel(weight)
        mod = cls(weight.shape[1], weight.shape[0], bias=bias is not None)
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

    def _apply(self, fn, recurse=True):
        # model.bfloat16() / .half() / .to(dtype) cast every floating buffer. Ours are fp32 by
        # contract (the kernel's epilogue reads fp32 scales and bias) and a round trip through
        # bf16 would lose bits, so keep the originals; device moves still apply.
        before = _apply_keeping_dtypes(self, super()._apply, fn, recurse)
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
        """float32 [out, in]: what this layer effectively multiplies by."""
        return self.weight_int8.float() * self.weight_scale[:, None]

    _WEIGHT = "packed_weight"

    def _op(self, x: torch.Tensor) -> torch.Tensor:
        return ops.int8_linear(x, self.packed_weight, self.weight_scale, self.bias)

    def _prepare(self):
        return prepare_int8_linear(self.packed_weight, self.weight_scale, self.bias, self.in_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, weight=int8 per-channel, act=int8 per-token, "
            f"kernel={_runtime.active_isa()}"
        )


# ------------------------------------------------------------------------------------ sparse layers


class _SparseBase(_FastForward, nn.Module):
    """Shared by the sparse layers: the packed buffer's size depends on the weights (nonzeros), so
    load_state_dict replaces it instead of copying into it; fp32 scales/bias survive dtype casts."""

    sparse_weight: torch.Tensor
    bias: torch.Tensor | None
    _WEIGHT = "sparse_weight"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):  # fmt: skip
        key = prefix + "sparse_weight"
        if key in state_dict:
            incoming = state_dict[key].detach().cpu().contiguous()
            try:
                info = ops.sparse_info(incoming)  # validates the whole buffer
            except (TypeError, ValueError) as e:
                error_msgs.append(f"{key}: not a valid fastinfer sparse weight ({e})")
                return
            if (info["n"], info["k"], info["dtype"]) != (self.out_features, self.in_features, self._weight_dtype):
                error_msgs.append(
                    f"{key}: holds a {info['dtype']} [{info['n']}, {info['k']}] weight, this layer is "
                    f"{self._weight_dtype} [{self.out_features}, {self.in_features}]"
                )
                return
            with torch.inference_mode(False):  # a normal tensor (version-tracked), 64-byte aligned
                self.sparse_weight = aligned_empty(incoming.numel())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)  # fmt: skip

    def _apply(self, fn, recurse=True):
        probe = fn(torch.empty(0))
        if probe.device.type not in ("cpu", "meta"):
            raise RuntimeError(
                f"{type(self).__name__} runs on the CPU only in this build (the CUDA sparse kernels are not "
                "built yet); convert with .to_int8linear() / keep sparse layers on the CPU"
            )
        _apply_keeping_dtypes(self, super()._apply, fn, recurse)
        return self

    @property
    def format(self) -> str:
        return ops.sparse_info(self.sparse_weight)["format"]

    def sparsity_stats(self) -> tuple[int, int]:
        """(nonzero weights, all weights) of the layer."""
        numel = self.out_features * self.in_features
        return int(torch.count_nonzero(ops.unpack_sparse(self.sparse_weight))), numel

    def _repr_sparsity(self) -> str:
        nnz, numel = self.sparsity_stats()
        return f"{100.0 * (1 - nnz / numel):.1f}%" if numel else "n/a"


def _check_features(in_features: int, out_features: int) -> None:
    for name, v in (("in_features", in_features), ("out_features", out_features)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")


class SparseLinear(_SparseBase):
    """y = x @ W^T + b with a pruned float weight stored sparse: "csr" (fp32 values and column
    indices, rows compressed) or "ell" (16-channel steps of one nonzero per channel, activations
    gathered in registers; AVX-512). The kernel touches only the nonzeros. Inputs float32 or
    bfloat16 [..., in]; fp32 accumulation, output in the input dtype. Built with
    SparseLinear.from_linear(linear, format)."""

    _weight_dtype = torch.float32  # what sparse_weight must hold

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        _check_features(in_features, out_features)
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("sparse_weight", ops.pack_sparse(torch.zeros(out_features, in_features), "csr"))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Module, format: str = "csr") -> SparseLinear:
        """From an nn.Linear (or transformers Conv1D) whose zeros should be skipped; format "csr" or
        "ell" (fastinfer.sparsify picks the faster one for the CPU)."""
        if format not in formats_for(torch.float32):
            valid = " or ".join(repr(f) for f in formats_for(torch.float32))
            raise ValueError(f"SparseLinear format must be {valid}, got {format!r}")
        weight, bias = linear_weight_and_bias(linear)
        if weight is None:
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        if weight.device.type != "cpu":
            raise RuntimeError(f"SparseLinear.from_linear: the layer is on {weight.device}; only CPU is supported")
        mod = cls(weight.shape[1], weight.shape[0], bias=bias is not None)
        mod.sparse_weight = ops.pack_sparse(weight.detach().float().contiguous(), format)
        if bias is not None:
            mod.bias.copy_(bias.detach().float())
        mod.train(linear.training)
        return mod

    def dense_weight(self) -> torch.Tensor:
        """float32 [out, in] with the zeros in place."""
        return ops.unpack_sparse(self.sparse_weight)

    def _op(self, x: torch.Tensor) -> torch.Tensor:
        return ops.sparse_linear(x, self.sparse_weight, self.bias, self.out_features)

    def _prepare(self):  # validation cached by the op just run
        return prepare_sparse_linear(self.sparse_weight, self.bias, self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"format={self.format} fp32, sparsity={self._repr_sparsity()}, kernel={_runtime.active_isa()}"
        )


class SparseInt8Linear(_SparseBase):
    """Int8Linear with a pruned int8 weight in a sparse format ("csr", "2:4" or "block"): the same
    per-channel weight scales, per-token activation quantization and fp32 epilogue, and exactly the
    same output as the dense Int8Linear of the same weights. Built with from_int8linear / from_linear."""

    _weight_dtype = torch.int8  # what sparse_weight must hold

    def __init__(self, in_features: int, out_features: int, bias: bool = True, format: str = "csr") -> None:
        super().__init__()
        _check_features(in_features, out_features)
        self.in_features = in_features
        self.out_features = out_features
        zero = torch.zeros((out_features, in_features), dtype=torch.int8)
        self.register_buffer("sparse_weight", ops.pack_sparse(zero, format))
        self.register_buffer("weight_scale", torch.zeros(out_features, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32) if bias else None)

    @classmethod
    def from_int8linear(cls, layer: Int8Linear, format: str = "csr") -> SparseInt8Linear:
        """The same layer with its int8 weight in `format` (its zeros skipped)."""
        if not isinstance(layer, Int8Linear):
            raise TypeError(f"from_int8linear expects an Int8Linear, got {type(layer).__name__}")
        mod = cls(layer.in_features, layer.out_features, bias=layer.bias is not None, format=format)
        mod.sparse_weight = ops.pack_sparse(layer.weight_int8, format)
        mod.weight_scale = layer.weight_scale.detach().clone()
        if layer.bias is not None:
            mod.bias.copy_(layer.bias)
        mod.train(layer.training)
        return mod

    @classmethod
    def from_linear(cls, linear: nn.Module, format: str = "csr") -> SparseInt8Linear:
        """Quantizes like Int8Linear.from_linear (zeros stay zero), then stores the weight sparse."""
        return cls.from_int8linear(Int8Linear.from_linear(linear), format)

    @property
    def weight_int8(self) -> torch.Tensor:
        """int8 [out, in] with the zeros in place."""
        return ops.unpack_sparse(self.sparse_weight)

    def to_int8linear(self) -> Int8Linear:
        dense = Int8Linear(self.in_features, self.out_features, bias=self.bias is not None)
        dense.set_weight(self.weight_int8, self.weight_scale.clone())
        if self.bias is not None:
            dense.bias.copy_(self.bias)
        dense.train(self.training)
        return dense

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.weight_scale[:, None]

    def _op(self, x: torch.Tensor) -> torch.Tensor:
        return ops.sparse_int8_linear(x, self.sparse_weight, self.weight_scale, self.bias)

    def _prepare(self):  # validation cached by the op just run
        return prepare_sparse_int8_linear(self.sparse_weight, self.weight_scale, self.bias, self.in_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"format={self.format} int8, sparsity={self._repr_sparsity()}, act=int8 per-token, "
            f"kernel={_runtime.active_isa()}"
        )
