"""What the fastinfer linear layers share: the input contract, reading float linear layers, an
_apply that keeps the fp32 buffers fp32, and forward() with its eager fast path (a _FastCall that
runs the op's own prepared call while the layer's buffers stay unchanged)."""

from __future__ import annotations

import weakref

import torch
from torch import nn

from fastinfer import _runtime
from fastinfer.ops._common import ACTIVATION_CODE, DTYPE_CODE, activation_code, eager_fast_path


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


def check_scale(key: str, state_dict, error_msgs: list[str]) -> bool:
    """load_state_dict's check of a layer's weight scales: finite and >= 0 (a NaN or negative scale
    from a file would give NaN or sign-flipped outputs without a word). False (and an error
    message) when they are not."""
    scale = state_dict.get(key)
    if isinstance(scale, torch.Tensor) and scale.is_floating_point() and scale.device.type != "meta":
        if not (torch.isfinite(scale).all() and (scale >= 0).all()):
            error_msgs.append(f"{key}: scales must be finite and >= 0")
            return False
    return True


def layer_repr(layer: nn.Module, *parts: str) -> str:
    """extra_repr of a fastinfer linear layer: its sizes and bias, `parts`, the active ISA's kernel."""
    sizes = f"in_features={layer.in_features}, out_features={layer.out_features}, bias={layer.bias is not None}"
    return ", ".join((sizes, *parts, f"kernel={_runtime.active_isa()}"))


def check_features(in_features: int, out_features: int) -> None:
    for name, v in (("in_features", in_features), ("out_features", out_features)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")


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
    if x.dtype not in DTYPE_CODE:
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

    def __init__(self, layer: nn.Module, run, key: tuple) -> None:
        self.key, self.run, self.k = key, run, layer.in_features

    @staticmethod
    def snapshot(layer: nn.Module) -> tuple:
        """The buffers' state, taken before the checked call whose checks the fast call relies on (a
        write during that call then makes the fast call stale, never trusted)."""
        bufs = layer._buffers
        return tuple((name, t, None if t is None else (t._version, t.data_ptr(), t.numel()))
                     for name in _FastCall.names(layer) for t in (bufs[name],))  # fmt: skip

    @staticmethod
    def names(layer: nn.Module) -> tuple[str, ...]:
        """The buffers the layer's kernel reads."""
        extra = getattr(layer, "_EXTRA", ())  # more buffers the kernel reads (StaticInt8Linear's x_scale)
        return (layer._WEIGHT, "weight_scale", "bias", *extra) if "weight_scale" in layer._buffers else (layer._WEIGHT, "bias")

    def valid_for(self, layer: nn.Module) -> bool:
        bufs = layer._buffers
        for name, t, state in self.key:
            if bufs.get(name) is not t or (t is not None and (t._version, t.data_ptr(), t.numel()) != state):
                return False
        return True

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor | None:
        """The layer's output, or None where the call must take the checked op (a residual here has
        passed _residual_in_kernel)."""
        if (
            type(x) is not torch.Tensor
            or not x.is_cpu
            or x.dtype not in DTYPE_CODE
            or x.dim() == 0
            or x.shape[-1] != self.k
            or (x.requires_grad and torch.is_grad_enabled())
        ):
            return None
        if residual is None:
            return self.run(x)
        if type(residual) is not torch.Tensor or (residual.requires_grad and torch.is_grad_enabled()):
            return None
        return self.run(x, residual)

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
    _WEIGHT (the weight buffer's name), _op(x, activation) (the checked op with that activation),
    _prepare() (the op's prepared call for the layer's buffers) and, where the kernel adds a
    residual in its epilogue (_ADDS_RESIDUAL), _op_residual(x, residual)."""

    _WEIGHT: str
    _ADDS_RESIDUAL = False

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """act(x @ W^T + b), or with residual act(x @ W^T + b + residual): the residual is added before
        the activation, in the kernel's epilogue where the layer's kernel takes one (Int8Linear,
        StaticInt8Linear) and it has the output's shape, dtype and device (rounded once with the
        rest: in float32 the same bits as the layer's output plus the residual), else by torch's add
        between the layer and its activation (the unfused result, torch's broadcasting included).
        fastinfer.quantize() passes it where a transformers block adds its input to the layer's
        output (fastinfer.convert.hf_blocks)."""
        scale = self._buffers.get("input_scale")
        if scale is not None:  # SmoothQuant's per-channel input scaling (Int8Linear.input_scale)
            _check_layer_input(self, x)
            x = x * scale.to(x.dtype)
        if residual is not None and not self._residual_in_kernel(x, residual):
            act = getattr(self, "_activation", None)
            return TORCH_ACT[ACTIVATION_CODE[act]](self._run(x, None, None) + residual)
        return self._run(x, getattr(self, "_activation", None), residual)

    def _residual_in_kernel(self, x: object, residual: object) -> bool:
        return (
            self._ADDS_RESIDUAL
            and isinstance(x, torch.Tensor)
            and isinstance(residual, torch.Tensor)
            and x.device.type == "cpu"
            and residual.device == x.device
            and residual.dtype == x.dtype
            and x.dim() > 0
            and tuple(residual.shape) == (*x.shape[:-1], self.out_features)
        )

    def _run(self, x: torch.Tensor, activation: str | None, residual: torch.Tensor | None) -> torch.Tensor:
        """The fast call where it is valid and takes the call (the layer's own activation), else the
        checked op, building the fast call after an eager one."""
        own = activation == getattr(self, "_activation", None)
        # the compiler and torch.jit.trace see only dispatcher calls: they always take the op
        traced = torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None
        fast = None if traced or not own else _FAST.get(self)
        if fast is not None and fast.valid_for(self):
            y = fast(x, residual)
            if y is not None:
                return y
        else:
            fast = None
        _check_layer_input(self, x)
        build = own and fast is None and not traced and eager_fast_path(x) and _FastCall.usable(self)
        key = _FastCall.snapshot(self) if build else None
        y = self._op(x, activation) if residual is None else self._op_residual(x, residual)
        if build:
            _FAST[self] = _FastCall(self, self._prepare(), key)  # the checks above passed
        return y


# The fused activations in torch, by engine code (a residual added outside a kernel goes before them).
TORCH_ACT = {
    0: lambda t: t,
    1: lambda t: torch.nn.functional.gelu(t),
    2: torch.relu,
    3: lambda t: torch.nn.functional.hardtanh(t, 0.0, 6.0),
    4: torch.nn.functional.silu,
    5: torch.nn.functional.hardswish,
    6: lambda t: torch.nn.functional.gelu(t, approximate="tanh"),
}


class _FusedActivation:
    """The activation a fastinfer layer fuses into its epilogue: None or a name of ACTIVATION_CODE
    ("gelu", "relu", "relu6", "silu", "hardswish"; the int8 linear and conv layers). A plain
    attribute, not a tensor (deepcopy and pickle keep it; the state_dict holds tensors only);
    setting it checks the name and drops the layer's prepared fast call."""

    _activation: str | None = None

    @property
    def activation(self) -> str | None:
        return self._activation

    @activation.setter
    def activation(self, value: str | None) -> None:
        activation_code(type(self).__name__, value)
        self._activation = value
        _FAST.pop(self, None)

    def _act_code(self) -> int:
        return ACTIVATION_CODE[self._activation]

    def _act_repr(self) -> tuple[str, ...]:
        """The activation's part of extra_repr: nothing when there is none."""
        return () if self._activation is None else (f"activation={self._activation}",)


class Fused(nn.Identity):
    """What a conversion leaves where a module now runs inside the layer before it: a BatchNorm2d
    folded into a conv's weights, an activation fused into a layer's epilogue. It passes its input
    through (an nn.Identity) and says what it replaced (`was`, the class name) and where that went
    (`into`, the layer's qualified name); fastinfer.save records it, so fastinfer.load can make the
    same replacement in a float model."""

    def __init__(self, was: str, into: str) -> None:
        super().__init__()
        if not isinstance(was, str) or not isinstance(into, str):
            raise TypeError("Fused(was, into) takes two strings: the replaced class name and the layer's name")
        self.was, self.into = was, into

    def extra_repr(self) -> str:
        return f"{self.was} -> {self.into or '<model>'}"


def apply_keeping_dtypes(module: nn.Module, apply, fn, recurse) -> dict[str, torch.Tensor]:
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
