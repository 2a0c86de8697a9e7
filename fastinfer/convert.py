"""Model conversion: walk a module tree by qualified name and swap layers (no pointers here)."""

from __future__ import annotations

import copy
import fnmatch
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from torch import nn

from fastinfer.nn import Int8Linear, SparseLinear, linear_weight_and_bias, quantize_weight_per_channel

__all__ = ["QuantConfig", "quantize"]


@dataclass(frozen=True)
class QuantConfig:
    """What `fastinfer.quantize` converts.

    skip: qualified-name patterns (fnmatch globs such as "classifier" or "encoder.*.output.dense",
        or compiled regular expressions) of layers to leave in float. A pattern that names a
        container skips everything below it.
    filter_fn: optional predicate (module, qualified_name) -> bool; False leaves the layer in float.
    min_features: layers whose in_features or out_features is smaller stay float (tiny layers gain
        nothing from int8).
    progress: show a progress bar over the layers (default: only for 50 layers or more).
    """

    skip: tuple[str | re.Pattern, ...] = ()
    filter_fn: Callable[[nn.Module, str], bool] | None = None
    min_features: int = 1
    progress: bool | None = None
    _patterns: tuple = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        skip = self.skip
        if isinstance(skip, (str, re.Pattern)):
            skip = (skip,)
        if not isinstance(skip, Iterable):
            raise TypeError(f"QuantConfig.skip must be a pattern or a sequence of patterns, got {skip!r}")
        skip = tuple(skip)
        for p in skip:
            if not isinstance(p, (str, re.Pattern)):
                raise TypeError(f"QuantConfig.skip entries must be str or re.Pattern, got {p!r}")
        object.__setattr__(self, "skip", skip)
        if not isinstance(self.min_features, int) or self.min_features < 1:
            raise ValueError(f"QuantConfig.min_features must be an int >= 1, got {self.min_features!r}")

    def skips(self, fqn: str) -> bool:
        parts = fqn.split(".")
        prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
        for p in self.skip:
            for name in prefixes:
                if isinstance(p, re.Pattern) and p.fullmatch(name):
                    return True
                if isinstance(p, str) and fnmatch.fnmatchcase(name, p):
                    return True
        return False


def _progress(total: int, enabled: bool | None, desc: str):
    from tqdm.auto import tqdm

    disable = (total < 50) if enabled is None else not enabled
    return tqdm(total=total, desc=desc, unit="layer", disable=disable, leave=False)


def quantize(model: nn.Module, config: QuantConfig | None = None, *, inplace: bool = False) -> nn.Module:
    """Returns `model` with every nn.Linear (not skipped by `config`) replaced by an Int8Linear, and
    every fastinfer.nn.SparseLinear by its int8 counterpart (SparseInt8Linear, or Int8Linear where
    the sparse int8 kernel would not be faster): quantize after sparsify equals sparsify after quantize.

    Hugging Face `Conv1D` layers (GPT-2 and relatives store linear weights as [in, out]) are
    linear layers too and are converted the same way. Subclasses of nn.Linear are left alone: they
    may change forward() in ways a swap would lose.

    The original model is not modified unless inplace=True. The result is a plain nn.Module: same
    inputs, same outputs (within int8 rounding), usable with torch.compile.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize expects an nn.Module, got {type(model).__name__}")
    if config is None:
        config = QuantConfig()
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a fastinfer.QuantConfig, got {type(config).__name__}")
    if not inplace:
        model = copy.deepcopy(model)

    targets = []
    # remove_duplicate=False: a layer shared under two names is converted under both (once).
    for fqn, mod in model.named_modules(remove_duplicate=False):
        weight, _ = linear_weight_and_bias(mod)
        if isinstance(mod, SparseLinear):
            weight = mod.dense_weight()
        if weight is not None and not config.skips(fqn):
            if min(weight.shape) < config.min_features:
                continue
            if config.filter_fn is not None and not config.filter_fn(mod, fqn):
                continue
            targets.append(fqn)
    return swap_layers(model, targets, _to_int8, config.progress, "fastinfer.quantize")


def swap_layers(model: nn.Module, targets: list[str], convert: Callable[[nn.Module], nn.Module],
                progress: bool | None, desc: str) -> nn.Module:  # fmt: skip
    """Replaces each module named in `targets` by convert(module), once per module object (a layer
    registered under two names stays one layer), with a progress bar; "" means the model itself."""
    if "" in targets:
        return convert(model)
    done: dict[int, nn.Module] = {}
    with _progress(len(targets), progress, desc) as bar:
        for fqn in targets:
            parent_name, _, child = fqn.rpartition(".")
            parent = model.get_submodule(parent_name)
            old = getattr(parent, child)
            if id(old) not in done:
                done[id(old)] = convert(old)
            setattr(parent, child, done[id(old)])
            bar.update(1)
    route_fused_layers_through_modules(model)
    return model


def _to_int8(mod: nn.Module) -> nn.Module:
    """Int8Linear for a float linear layer; for a SparseLinear, the same quantization of its weights
    (zeros stay zero) stored in the int8 sparse format sparsify() would pick, or dense if none pays."""
    if not isinstance(mod, SparseLinear):
        return Int8Linear.from_linear(mod)
    from fastinfer.sparsify import sparse_int8_or_dense

    dense = Int8Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
    dense.set_weight(*quantize_weight_per_channel(mod.dense_weight()))
    if mod.bias is not None:
        dense.bias.copy_(mod.bias)
    dense.train(mod.training)
    return sparse_int8_or_dense(dense)


def _keep_module_path(module, args):
    """No-op forward pre-hook; its presence is what turns torch's fused fast path off."""
    return None


def route_fused_layers_through_modules(model: nn.Module) -> None:
    """nn.TransformerEncoderLayer has a fused inference fast path (batch_first, eval, no grad) that
    reads linear1.weight / linear2.weight and never calls those modules. With int8 layers there it
    would fail (our layers have no float .weight). torch skips that path when a submodule has a
    forward hook, so give the swapped layers a no-op pre-hook: the layer then calls our modules."""
    for mod in model.modules():
        if isinstance(mod, nn.TransformerEncoderLayer):
            for lin in (mod.linear1, mod.linear2):
                if type(lin) is not nn.Linear and _keep_module_path not in lin._forward_pre_hooks.values():
                    lin.register_forward_pre_hook(_keep_module_path)
