"""The one target scan of quantize, prune and sparsify: which layers of a model an entry point
converts, found by qualified name, one target per layer object."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from fastinfer.config import skipped
from fastinfer.nn import linear_weight_and_bias


@dataclass(frozen=True)
class Target:
    """One layer to convert and every qualified name it is registered under, in named_modules order
    ("" is the model itself)."""

    names: tuple[str, ...]
    module: nn.Module

    @property
    def name(self) -> str:
        return self.names[0]


def shape_of(module: nn.Module, also: tuple[type, ...] = ()) -> tuple[int, int] | None:
    """(out_features, in_features) of a float linear layer (nn.Linear itself, Hugging Face Conv1D)
    or of an instance of a type in `also` (fastinfer layers); None for any other module."""
    if also and isinstance(module, also):
        if hasattr(module, "out_channels"):  # a fastinfer conv layer
            return module.out_channels, module.in_channels
        return module.out_features, module.in_features
    weight, _ = linear_weight_and_bias(module)
    return None if weight is None else tuple(weight.shape)


def conv1d_shape_of(module: nn.Module) -> tuple[int, int] | None:
    """(out_channels, in_channels) of an nn.Conv1d (or a subclass keeping its forward) that
    Int8Conv1d can replace, else None."""
    if (isinstance(module, nn.Conv1d) and type(module).forward is nn.Conv1d.forward
            and type(module)._conv_forward is nn.Conv1d._conv_forward and module.padding_mode == "zeros"
            and not isinstance(module, nn.modules.lazy.LazyModuleMixin)):  # fmt: skip
        return module.out_channels, module.in_channels
    return None


def conv_shape_of(module: nn.Module) -> tuple[int, int] | None:
    """(out_channels, in_channels) of a float nn.Conv2d that Int8Conv2d can replace: nn.Conv2d itself
    or a subclass that keeps its forward (e.g. one that only sets padding="same" in __init__), with
    zero padding; None for anything else (float_reason says why)."""
    if (isinstance(module, nn.Conv2d) and type(module).forward is nn.Conv2d.forward
            and type(module)._conv_forward is nn.Conv2d._conv_forward and module.padding_mode == "zeros"
            and not isinstance(module, nn.modules.lazy.LazyModuleMixin)):  # fmt: skip
        return module.out_channels, module.in_channels
    return None


def float_reason(module: nn.Module, convs: bool) -> str | None:
    """Why a layer of a kind fastinfer converts stays float by its nature (None: not such a layer)."""
    name = type(module).__name__
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and isinstance(module, (nn.Linear, nn.Conv2d)):
        return f"{name} not initialized yet (run one batch through the model first)"
    if isinstance(module, nn.Linear) and type(module) is not nn.Linear:
        if name == "NonDynamicallyQuantizableLinear":
            return "out_proj of nn.MultiheadAttention (its forward reads the weight directly)"
        return f"subclass {name} of nn.Linear (its forward may differ from nn.Linear's)"
    if isinstance(module, nn.Conv2d):
        if not convs:
            return None
        if type(module).forward is not nn.Conv2d.forward or type(module)._conv_forward is not nn.Conv2d._conv_forward:
            return f"subclass {name} of nn.Conv2d with its own forward"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} (the int8 conv pads with zeros only)"
    if isinstance(module, nn.Conv1d) and convs:
        if type(module).forward is not nn.Conv1d.forward or type(module)._conv_forward is not nn.Conv1d._conv_forward:
            return f"subclass {name} of nn.Conv1d with its own forward"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} (the int8 conv pads with zeros only)"
    if convs and isinstance(module, (nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return f"no int8 {name} kernel"
    return None


@dataclass(frozen=True)
class LeftFloat:
    names: tuple[str, ...]
    module: nn.Module
    reason: str

    @property
    def name(self) -> str:
        return self.names[0]


def scan(
    model: nn.Module,
    also: tuple[type, ...] = (),
    *,
    convs: bool = False,
    skip: tuple[str | re.Pattern, ...] = (),
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    min_features: int = 1,
) -> tuple[list[Target], list[LeftFloat]]:
    """select()'s targets (with float nn.Conv2d layers too when convs), and every other layer of a
    convertible kind with the reason it stays float."""
    names: dict[int, list[str]] = {}
    layers: dict[int, tuple[nn.Module, tuple[int, int] | None]] = {}
    for fqn, mod in model.named_modules(remove_duplicate=False):
        if id(mod) not in layers:
            shape = shape_of(mod, also)
            if shape is None and convs:
                shape = conv_shape_of(mod) or conv1d_shape_of(mod)
            if shape is None and float_reason(mod, convs) is None:
                continue
            layers[id(mod)] = (mod, shape)
        names.setdefault(id(mod), []).append(fqn)
    targets, left = [], []
    for key, fqns in names.items():
        mod, shape = layers[key]
        why = float_reason(mod, convs) if shape is None else config_reason(mod, fqns, min(shape), skip, filter_fn, min_features)
        if why:
            left.append(LeftFloat(tuple(fqns), mod, why))
        else:
            targets.append(Target(tuple(fqns), mod))
    return targets, left


def config_reason(mod: nn.Module, fqns: list[str], size: int, skip: tuple[str | re.Pattern, ...],
                  filter_fn: Callable[[nn.Module, str], bool] | None, min_features: int,
                  also_skipped_by: tuple[str, ...] = ()) -> str | None:  # fmt: skip
    """Why the config keeps a convertible layer in float (None: it converts): a skip pattern matching
    one of its names (or of `also_skipped_by`), its smallest dimension `size` below min_features,
    or filter_fn refusing one of its names."""
    if any(skipped(skip, fqn) for fqn in (*fqns, *also_skipped_by)):
        return "skipped by QuantConfig.skip"
    if size < min_features:
        return f"smaller than QuantConfig.min_features={min_features}"
    if filter_fn is not None and not all(filter_fn(mod, fqn) for fqn in fqns):
        return "filter_fn returned False"
    return None


def select(
    model: nn.Module,
    also: tuple[type, ...] = (),
    *,
    skip: tuple[str | re.Pattern, ...] = (),
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    min_features: int = 1,
) -> list[Target]:
    """The float linear layers of `model` (and instances of the types in `also`) to convert, one
    Target per layer object, in named_modules order.

    A layer is left out when any of its names is matched by `skip` (config.skipped), when its
    in_features or out_features is below `min_features`, or when filter_fn(layer, name) is False
    for any of its names: a layer shared under two names is one decision, so every entry point
    converts it under both names (it stays one layer) or under neither.
    """
    return scan(model, also, skip=skip, filter_fn=filter_fn, min_features=min_features)[0]


def progress_bar(total: int, enabled: bool | None, desc: str):
    """A tqdm bar over `total` layers (on stderr); by default only for 50 layers or more."""
    from tqdm.auto import tqdm

    disable = (total < 50) if enabled is None else not enabled
    return tqdm(total=total, desc=desc, unit="layer", disable=disable, leave=False)
