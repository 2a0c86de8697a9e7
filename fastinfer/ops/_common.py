"""What the fastinfer ops share: argument checks (run by the CPU and CUDA kernels and by the fakes
alike), the row layout the kernels read, output allocation, and kernel registration."""

from __future__ import annotations

import math
import weakref

import torch

from fastinfer._runtime import _C

# Activation and output dtypes of the kernels, as the engine's dtype codes.
DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1}

# Activations the int8 linear kernels can fuse into their fp32 epilogue, as the engine's codes
# (csrc/cpu/common.h): "gelu" is the erf GELU (Eigen's fp32 erf approximation, within 4e-7),
# "gelu_tanh" GELU's tanh form (GPT-2's gelu_new) as y * sigmoid(2u) through the epilogue's exp.
ACTIVATION_CODE = {None: 0, "gelu": 1, "relu": 2, "relu6": 3, "silu": 4, "hardswish": 5, "gelu_tanh": 6}
ACTIVATION_NAME = {code: name for name, code in ACTIVATION_CODE.items()}


def activation_code(name: str, activation: object) -> int:
    """The engine code of an activation name (None, "gelu", "relu", "relu6", "silu", "hardswish");
    ValueError for anything else."""
    if isinstance(activation, str) or activation is None:
        code = ACTIVATION_CODE.get(activation)
        if code is not None:
            return code
    names = ", ".join(repr(a) for a in ACTIVATION_CODE if a is not None)
    raise ValueError(f"fastinfer.{name}: activation must be None or one of {names}, got {activation!r}")


def activation_name(name: str, act: int) -> str | None:
    """Inverse of activation_code for an op's int act argument; ValueError for an unknown code."""
    if act not in ACTIVATION_NAME:
        codes = ", ".join(f"{c} {n}" for n, c in ACTIVATION_CODE.items())
        raise ValueError(f"fastinfer.{name}: unknown activation code {act} ({codes})")
    return ACTIVATION_NAME[act]


# Outputs at least this large get their own huge-page mapping (see csrc/cpu/large_buffer.h): a
# fresh 32 MiB tensor costs ~8 ms of page faults with 4 KiB pages, ~1-2 ms with 2 MiB pages.
# Such a tensor behaves like any other (views, pickling, share_memory_) except that its storage
# cannot be resized: resize_() to a larger size, or passing it as out= to an op that must grow it,
# raises "Trying to resize storage that is not resizable".
LARGE_OUTPUT_BYTES = 8 << 20


def register(opname: str, device: str):
    """Registers fn as the `device` kernel of fastinfer::opname and keeps it callable from Python."""

    def wrap(fn):
        torch.library.register_kernel(f"fastinfer::{opname}", device, fn)
        return fn

    return wrap


def eager_fast_path(x: torch.Tensor) -> bool:
    """Plain eager CPU call with no autograd to record: nothing the dispatcher would add."""
    return (
        type(x) is torch.Tensor
        and x.device.type == "cpu"
        and not (x.requires_grad and torch.is_grad_enabled())
        and not torch.compiler.is_compiling()
        and torch._C._get_tracing_state() is None  # torch.jit.trace records dispatcher calls only
    )


def linear_entry(name: str, cpu_kernel, x, packed, w_scale, bias, activation: str | None,
                 x_scale: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The public function of an int8 linear op (int8_linear, weight_only_linear, sparse_int8_linear:
    one signature; static_int8_linear with its x_scale, passed after bias; the dense two with a
    residual): argument checks, then in a plain eager CPU call the op's own CPU kernel directly
    (skips ~5 us of dispatcher overhead per call, 5% of a 4096x4096 layer at M=1), else the op."""
    x = check_tensor(name, "x", x)
    act = activation_code(name, activation)
    kw = {} if residual is None else {"residual": check_tensor(name, "residual", residual)}
    check_device(name, x=x, packed=packed, w_scale=w_scale, bias=bias, x_scale=x_scale, residual=residual)
    extra = () if x_scale is None else (x_scale,)
    if eager_fast_path(x) and (residual is None or eager_fast_path(residual)):
        return cpu_kernel(x, packed, w_scale, bias, *extra, act, **kw)
    return getattr(torch.ops.fastinfer, name)(x, packed, w_scale, bias, *extra, act, **kw)


def check_residual(name: str, residual, shape, out_dtype: torch.dtype, depthwise: bool = False) -> None:
    """A residual added before the activation (int8_conv2d, the dense int8 linears): the output's
    shape and dtype (float32 or bfloat16), on the CPU; not on the conv's depthwise path."""
    if residual is None:
        return
    check_tensor(name, "residual", residual)
    check_device(name, residual=residual)
    if depthwise:
        raise ValueError(f"fastinfer.{name}: a residual is added by the GEMM paths only, not the depthwise one")
    if out_dtype not in (torch.float32, torch.bfloat16) or residual.dtype != out_dtype:
        raise TypeError(f"fastinfer.{name}: residual must have the output's dtype (float32 or bfloat16: "
                        f"{out_dtype}), got {residual.dtype}")  # fmt: skip
    if tuple(residual.shape) != tuple(shape):
        raise ValueError(f"fastinfer.{name}: residual must have the output's shape {list(shape)}, got {list(residual.shape)}")


def activation_grad(name: str, grad: torch.Tensor, act: int, out: torch.Tensor | None = None,
                    z: torch.Tensor | None = None) -> torch.Tensor:
    """grad * act'(z) for a fused activation's backward: ReLU / ReLU6 masked by the saved output
    `out`, erf GELU, SiLU and the tanh GELU from the recomputed input `z` (where the op gives
    one); any other raises."""
    g = grad.float()
    if act == 0:
        return g
    if act == 2:
        return g * (out > 0)
    if act == 3:
        return g * ((out > 0) & (out < 6))
    if act == 1 and z is not None:  # d/dz [z * Phi(z)] = Phi(z) + z * phi(z)
        return g * (0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0)))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi))
    if act == 4 and z is not None:  # d/dz [z * s(z)] = s (1 + z (1 - s))
        s = torch.sigmoid(z)
        return g * (s * (1.0 + z * (1.0 - s)))
    if act == 6 and z is not None:  # d/dz [z/2 (1 + tanh(u))], u = c (z + 0.044715 z^3)
        c = math.sqrt(2.0 / math.pi)
        t = torch.tanh(c * (z + 0.044715 * z * z * z))
        return g * (0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * z * z))
    raise RuntimeError(
        f"fastinfer.{name}: no gradient through the fused {activation_name(name, act)} activation; "
        "convert with QuantConfig(fuse_activations=False) to backpropagate through this layer"
    )


# ------------------------------------------------------------------------------------------ checks


def check_device(name: str, **tensors: torch.Tensor | None) -> None:
    """CPU, CUDA (the CUDA kernels say when their backend is missing) and meta tensors only."""
    for arg, t in tensors.items():
        if t is not None and t.device.type not in ("cpu", "cuda", "meta"):
            raise RuntimeError(f"fastinfer.{name}: {arg} is on {t.device}; fastinfer runs on CPU and CUDA tensors")


def check_tensor(name: str, arg: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fastinfer.{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_float_input(name: str, x: torch.Tensor) -> None:
    if x.dtype not in DTYPE_CODE:
        raise TypeError(f"fastinfer.{name}: x must be float32 or bfloat16, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"fastinfer.{name}: x must have at least 1 dimension [..., K], got a scalar")


def check_int8_2d(name: str, arg: str, t: torch.Tensor) -> None:
    if t.dtype != torch.int8:
        raise TypeError(f"fastinfer.{name}: {arg} must be int8, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"fastinfer.{name}: {arg} must be 2-D, got shape {tuple(t.shape)}")


def check_int8_matmul_args(a: torch.Tensor, w: torch.Tensor) -> None:
    """int8_matmul's a [M, K] and w [N, K], on any device."""
    check_int8_2d("int8_matmul", "a", a)
    check_int8_2d("int8_matmul", "w", w)
    if a.shape[1] != w.shape[1]:
        raise ValueError(f"fastinfer.int8_matmul: a is {tuple(a.shape)} and w is {tuple(w.shape)}; K must match")


def check_scale_bias(name: str, w_scale: torch.Tensor, bias: torch.Tensor | None) -> int:
    """N of an int8 linear's per-channel w_scale [N] (float32) and bias [N] (float32 or None)."""
    if w_scale.dtype != torch.float32 or w_scale.dim() != 1:
        raise TypeError(f"fastinfer.{name}: w_scale must be a 1-D float32 tensor [N]")
    n = w_scale.shape[0]
    if bias is not None and (bias.dtype != torch.float32 or tuple(bias.shape) != (n,)):
        raise TypeError(f"fastinfer.{name}: bias must be float32 [{n}], got {bias.dtype} {tuple(bias.shape)}")
    return n


def check_int8_linear_params(packed: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                             name: str = "int8_linear") -> int:  # fmt: skip
    """N of int8_linear's (or weight_only_linear's) weight side (packed from pack_int8_weight,
    w_scale, bias), on any device."""
    n = check_scale_bias(name, w_scale, bias)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise TypeError(f"fastinfer.{name}: packed must be a 1-D uint8 tensor from pack_int8_weight")
    return n


def check_input_scale(name: str, x_scale: object) -> None:
    """A static layer's input scale: a float32 tensor of one element (its value, finite and > 0, is
    checked by the kernel where it reads it)."""
    if not isinstance(x_scale, torch.Tensor) or x_scale.dtype != torch.float32 or x_scale.numel() != 1:
        what = f"{x_scale.dtype} {tuple(x_scale.shape)}" if isinstance(x_scale, torch.Tensor) else type(x_scale).__name__
        raise TypeError(f"fastinfer.{name}: x_scale must be a float32 tensor of one element, got {what}")


def has_data(t: torch.Tensor) -> bool:
    """True for a real CPU tensor whose bytes can be read (not meta, not a FakeTensor)."""
    if t.device.type != "cpu":
        return False
    if type(t) is torch.Tensor:  # the common case, decided without the subclass check below
        return True
    from torch._subclasses.fake_tensor import is_fake

    return not is_fake(t) and (t.numel() == 0 or t.data_ptr() != 0)


# ------------------------------------------------------------------------------ layout and outputs


def rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(2-D view [rows, K] with unit inner stride, its row stride in elements).

    Copies only when the layout needs it. A single row's stride(0) is meaningless (a [1, K] slice of
    a transposed tensor may report 1), so one row gets K."""
    if t.dim() == 2 and t.is_contiguous():  # the common case, without the checks below
        return t, t.shape[1]
    t2 = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    n, k = t2.shape
    if (k > 1 and t2.stride(-1) != 1) or (n > 1 and t2.stride(0) < k):
        t2 = t2.contiguous()
    return t2, (t2.stride(0) if n > 1 else k)


def aligned_empty(nbytes: int) -> torch.Tensor:
    """uint8 buffer whose data is 64-byte aligned (the kernels use aligned vector loads).

    torch's CPU allocator aligns to 64 bytes; the check keeps us honest if that ever changes.
    """
    out = torch.empty(nbytes, dtype=torch.uint8)
    if out.data_ptr() % 64 != 0:
        raise RuntimeError("fastinfer: torch returned a buffer that is not 64-byte aligned")
    return out


def new_output(shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool = False) -> torch.Tensor:
    """An uninitialized output of `shape`: contiguous, or with channels_last strides (a 4-D shape
    over NHWC storage). Never a view, so the caller may modify it in place under autograd (an
    in-place ReLU after a conv); outputs of LARGE_OUTPUT_BYTES or more live in a LargeBuffer."""
    numel = math.prod(shape)
    nbytes = numel * dtype.itemsize
    if nbytes < LARGE_OUTPUT_BYTES:
        return torch.empty(shape, dtype=dtype, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if channels_last:
        n, c, h, w = shape
        strides = (h * w * c, 1, w * c, c)
    else:
        strides = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    # the storage keeps a reference to the LargeBuffer for the tensor's lifetime (unmapped after)
    flat = torch.frombuffer(_C.LargeBuffer(nbytes), dtype=dtype, count=numel)
    return torch.empty(0, dtype=dtype).set_(flat.untyped_storage(), 0, shape, strides)


def packed_nbytes(n, k):
    """Size in bytes of pack_int8_weight's output for weights [n, k] (works on symbolic sizes)."""
    np_, kp = (n + 15) // 16 * 16, (k + 63) // 64 * 64
    return 64 + 4 * np_ + np_ * kp


class ValidatedBuffers:
    """Tensors whose bytes passed a kernel format's full O(bytes) validation, so an op validates a
    packed weight once per tensor version, not once per call.

    id(tensor) -> (weak reference to it, (address, size, storage bytes, version) just before it was
    checked). A hit needs the same live tensor object in the same state: an in-place write through
    torch bumps the version, a new tensor at a reused address is a different object, a resized
    storage has another size. Writes that bypass torch's version counter are not seen: through
    .numpy(), .data, DLPack, untyped_storage() item writes, tensors set_() on the same storage,
    another process's writes to shared memory or a file mapped with torch.load(mmap=True) changed
    underneath, raw pointers. Call the format's validate function (ops.validate_int8_weight,
    ops.sparse_validate) after those. Inference tensors have no version counter: they are validated
    on every call (the pack functions return normal tensors even under inference_mode for that
    reason)."""

    MAX = 16384

    def __init__(self) -> None:
        self._valid: dict[int, tuple[weakref.ref, tuple[int, int, int, int]]] = {}

    @staticmethod
    def _version(t: torch.Tensor) -> int | None:
        try:
            return t._version
        except RuntimeError:  # inference tensors do not track versions
            return None

    def known(self, t: torch.Tensor) -> bool:
        entry = self._valid.get(id(t))
        return entry is not None and entry[0]() is t and entry[1] == self._state(t)

    def _state(self, t: torch.Tensor) -> tuple[int, int, int, int] | None:
        ver = self._version(t)
        return None if ver is None else (t.data_ptr(), t.numel(), t.untyped_storage().nbytes(), ver)

    def remember(self, t: torch.Tensor, state: tuple[int, int, int, int] | None = None) -> None:
        """Marks t valid as it is now, or as it was when state = _state(t) was taken (before the
        check: a write during the check then makes the entry stale instead of trusted)."""
        state = self._state(t) if state is None else state
        if state is None:
            return
        if len(self._valid) >= self.MAX:
            self._valid.clear()
        self._valid[id(t)] = (weakref.ref(t), state)

    def checked(self, packed: torch.Tensor, validate, force: bool = False) -> torch.Tensor:
        """packed (contiguous, with data), or a 64-byte aligned copy of it, after validate(ptr, nbytes)
        passed on it now or on this version before."""
        state = self._state(packed)  # before the copy and the check (see remember)
        use = packed
        if packed.data_ptr() % 64 != 0:  # the kernels want 64-byte alignment: a per-call copy
            with torch.inference_mode(False):
                use = aligned_empty(packed.numel())
            use.copy_(packed)
        if force or not self.known(packed):
            validate(use.data_ptr(), use.numel())
            self.remember(packed, state)
        return use
