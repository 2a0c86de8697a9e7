"""The sparse layers: SparseLinear (pruned fp32 weights) and SparseInt8Linear (pruned int8 weights,
bit for bit the dense Int8Linear's output). Their weight is a packed sparse buffer (ops.pack_sparse)."""

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
from fastinfer.nn.linear import Int8Linear
from fastinfer.ops._common import aligned_empty
from fastinfer.ops.sparse import formats_for, prepare_sparse_int8_linear, prepare_sparse_linear


def _repacked_24(packed: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A 2:4 weight packed for `device`'s kernel (CPU and CUDA layouts differ), from either layout."""
    w = ops.unpack_sparse(packed, bounded=False).cpu()
    with torch.inference_mode(False):  # a version-tracked buffer
        return ops.pack_sparse(w.to(device), "2:4")


class _SparseBase(_FastForward, nn.Module):
    """Shared by the sparse layers: the packed buffer's size depends on the weights (nonzeros), so
    load_state_dict replaces it instead of copying into it; fp32 scales/bias survive dtype casts."""

    sparse_weight: torch.Tensor
    bias: torch.Tensor | None
    _WEIGHT = "sparse_weight"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):  # fmt: skip
        key = prefix + "sparse_weight"
        device = self.sparse_weight.device
        if not check_scale(prefix + "weight_scale", state_dict, error_msgs):
            return
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
            if device.type == "cuda" and info["format"] != "2:4":
                error_msgs.append(f"{key}: a '{info['format']}' weight cannot load into a layer on CUDA (only '2:4' "
                                  "runs there); load it on the CPU")  # fmt: skip
                return
            with torch.inference_mode(False):  # a normal tensor (version-tracked), 64-byte aligned
                self.sparse_weight = aligned_empty(incoming.numel())
        errors_before = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)  # fmt: skip
        if key in state_dict and device.type == "cuda" and len(error_msgs) == errors_before:
            self._buffers["sparse_weight"] = _repacked_24(self.sparse_weight, device)

    def _cuda_refusal(self) -> str | None:
        """Why this layer cannot run on CUDA, or None (only int8 '2:4' weights have a CUDA kernel)."""
        fmt = self.format
        if self._weight_dtype == torch.int8 and fmt == "2:4":
            return None
        if self._weight_dtype != torch.int8:
            return (f"{type(self).__name__} (fp32 '{fmt}') runs on the CPU only: the CUDA sparse kernel is int8 "
                    "'2:4' (SparseInt8Linear); keep this layer on the CPU")  # fmt: skip
        return (f"{type(self).__name__} with format '{fmt}' has no CUDA kernel (only '2:4' runs on CUDA); "
                "use .to_int8linear() for a dense int8 layer on CUDA, or prune to 2:4 and build it with format='2:4'")  # fmt: skip

    def _apply(self, fn, recurse=True):
        probe = fn(torch.empty(0))
        if probe.device.type not in ("cpu", "meta"):
            if probe.device.type != "cuda" or (why := self._cuda_refusal()) is not None:
                raise RuntimeError(why if probe.device.type == "cuda" else
                                   f"{type(self).__name__} runs on CPU and CUDA only, not {probe.device.type}")  # fmt: skip
        before = apply_keeping_dtypes(self, super()._apply, fn, recurse)
        # A move between CPU and CUDA re-packs: each device's 2:4 kernel has its own layout.
        old, new = before["sparse_weight"], self._buffers["sparse_weight"]
        kinds = {old.device.type, new.device.type}
        if len(kinds) == 2 and "meta" not in kinds:
            self._buffers["sparse_weight"] = _repacked_24(old, new.device)
        return self

    # Files hold the CPU layout (portable: any machine loads them); a layer on CUDA writes its weight
    # in it and re-packs what it loads for the GPU.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        w = self.sparse_weight
        if w.device.type == "cuda":
            destination[prefix + "sparse_weight"] = ops.pack_sparse(ops.unpack_sparse(w).cpu(), "2:4")

    @property
    def format(self) -> str:
        return ops.sparse_info(self.sparse_weight)["format"]

    def sparsity_stats(self) -> tuple[int, int]:
        """(nonzero weights, all weights) of the layer."""
        numel = self.out_features * self.in_features
        return ops.sparse_nonzeros(self.sparse_weight), numel

    def _repr_sparsity(self) -> str:
        nnz, numel = self.sparsity_stats()
        return f"{100.0 * (1 - nnz / numel):.1f}%" if numel else "n/a"


class SparseLinear(_SparseBase):
    """y = x @ W^T + b with a pruned float weight stored sparse: "csr" (fp32 values and column
    indices, rows compressed) or "ell" (16-channel steps of one nonzero per channel, activations
    gathered in registers; AVX-512). The kernel touches only the nonzeros. Inputs float32 or
    bfloat16 [..., in]; fp32 accumulation, output in the input dtype. Built with
    SparseLinear.from_linear(linear, format)."""

    _weight_dtype = torch.float32  # what sparse_weight must hold

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        check_features(in_features, out_features)
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
        return ops.unpack_sparse(self.sparse_weight, bounded=False)  # the layer's own shape (checked at load)

    def _op(self, x: torch.Tensor, activation: str | None = None) -> torch.Tensor:  # (no activation)
        return ops.sparse_linear(x, self.sparse_weight, self.bias, self.out_features)

    def _prepare(self):  # validation cached by the op just run
        return prepare_sparse_linear(self.sparse_weight, self.bias, self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return layer_repr(self, f"format={self.format} fp32", f"sparsity={self._repr_sparsity()}")


class SparseInt8Linear(_FusedActivation, _SparseBase):
    """Int8Linear with a pruned int8 weight in a sparse format (any of ops.SPARSE_FORMATS): the same
    per-channel weight scales, per-token activation quantization, fp32 epilogue and fused activation
    (None or "gelu"), and exactly the same output as the dense Int8Linear of the same weights. Built
    with from_int8linear / from_linear."""

    _weight_dtype = torch.int8  # what sparse_weight must hold

    def __init__(self, in_features: int, out_features: int, bias: bool = True, format: str = "csr",
                 activation: str | None = None) -> None:  # fmt: skip
        super().__init__()
        check_features(in_features, out_features)
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        zero = torch.zeros((out_features, in_features), dtype=torch.int8)
        self.register_buffer("sparse_weight", ops.pack_sparse(zero, format))
        self.register_buffer("weight_scale", torch.zeros(out_features, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32) if bias else None)

    @classmethod
    def from_int8linear(cls, layer: Int8Linear, format: str = "csr") -> SparseInt8Linear:
        """The same layer (fused activation included) with its int8 weight in `format` (its zeros skipped)."""
        if not isinstance(layer, Int8Linear):
            raise TypeError(f"from_int8linear expects an Int8Linear, got {type(layer).__name__}")
        mod = cls(layer.in_features, layer.out_features, bias=layer.bias is not None, format=format,
                  activation=layer.activation)  # fmt: skip
        mod.sparse_weight = ops.pack_sparse(layer.weight_int8, format)
        mod.weight_scale = layer.weight_scale.detach().clone()
        if layer.bias is not None:
            mod.bias.copy_(layer.bias)
        mod.train(layer.training)
        return mod

    @classmethod
    def from_linear(cls, linear: nn.Module, format: str = "csr", activation: str | None = None) -> SparseInt8Linear:
        """Quantizes like Int8Linear.from_linear (zeros stay zero), then stores the weight sparse."""
        return cls.from_int8linear(Int8Linear.from_linear(linear, activation=activation), format)

    @property
    def weight_int8(self) -> torch.Tensor:
        """int8 [out, in] with the zeros in place."""
        return ops.unpack_sparse(self.sparse_weight, bounded=False)  # the layer's own shape (checked at load)

    def to_int8linear(self) -> Int8Linear:
        dense = Int8Linear(self.in_features, self.out_features, bias=self.bias is not None, activation=self.activation)
        dense.set_weight(self.weight_int8, self.weight_scale.clone())
        if self.bias is not None:
            dense.bias.copy_(self.bias)
        dense.train(self.training)
        return dense

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.weight_scale[:, None]

    def _op(self, x: torch.Tensor, activation: str | None) -> torch.Tensor:
        return ops.sparse_int8_linear(x, self.sparse_weight, self.weight_scale, self.bias, activation)

    def _prepare(self):  # validation cached by the op just run
        return prepare_sparse_int8_linear(
            self.sparse_weight, self.weight_scale, self.bias, self.in_features, self._act_code()
        )

    def extra_repr(self) -> str:
        return layer_repr(
            self, f"format={self.format} int8", f"sparsity={self._repr_sparsity()}", "act=int8 per-token",
            *self._act_repr(),
        )  # fmt: skip
