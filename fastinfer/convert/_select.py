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
        return module.out_features, module.in_features
    weight, _ = linear_weight_and_bias(module)
    return None if weight is None else tuple(weight.shape)


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
    names: dict[int, list[str]] = {}
    layers: dict[int, tuple[nn.Module, tuple[int, int]]] = {}
    for fqn, mod in model.named_modules(remove_duplicate=False):
        if id(mod) not in layers:
            shape = shape_of(mod, also)
            if shape is None:
                continue
            layers[id(mod)] = (mod, shape)
        names.setdefault(id(mod), []).append(fqn)
    targets = []
    for key, fqns in names.items():
        mod, shape = layers[key]
        if any(skipped(skip, fqn) for fqn in fqns) or min(shape) < min_features:
            continue
        if filter_fn is not None and not all(filter_fn(mod, fqn) for fqn in fqns):
            continue
        targets.append(Target(tuple(fqns), mod))
    return targets


def progress_bar(total: int, enabled: bool | None, desc: str):
    """A tqdm bar over `total` layers (on stderr); by default only for 50 layers or more."""
    from tqdm.auto import tqdm

    disable = (total < 50) if enabled is None else not enabled
    return tqdm(total=total, desc=desc, unit="layer", disable=disable, leave=False)
