"""Calibration: run a few batches through the model with a forward pre-hook on each layer of
interest. One hook runner for every statistic a conversion needs from real inputs; today wanda's
input-feature norms (fastinfer.prune, method="wanda")."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from fastinfer.convert._select import shape_of
from fastinfer.nn import Int8Conv2d, Int8Linear


def run_batch(model: nn.Module, batch) -> object:
    """model(batch) for a tensor, model(*batch) for a tuple/list, model(**batch) for a mapping."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    raise ValueError(f"each batch must be a tensor, a tuple/list or a dict, got {type(batch).__name__}")


def batches_of(data) -> Iterable:
    """data as an iterable of batches: a lone tensor or mapping is one batch."""
    if isinstance(data, (torch.Tensor, Mapping)):
        return (data,)
    if not isinstance(data, Iterable):
        raise ValueError(f"calibration_data must be an iterable of batches, got {type(data).__name__}")
    return data


def observe_inputs(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    calibration_data: Iterable,
    observe: Callable[[str, torch.Tensor], None],
) -> None:
    """Runs every batch of calibration_data through the model once (eval mode, no grad; each module's
    training flag restored after) and calls observe(name, x) with each input a named layer gets, as
    a detached [tokens, in_features] view (a conv's [N, C, H, W] input as [pixels, C] rows). A batch is called as model(batch) for a tensor,
    model(*batch) for a tuple/list, model(**batch) for a mapping; a lone tensor or mapping is one
    batch. ValueError for data that is not batches, or that yields none."""

    def make_hook(name: str, in_features: int, conv: bool):
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(iter(kwargs.values()), None)
            if conv:
                if isinstance(x, torch.Tensor) and x.dim() in (3, 4) and x.shape[-3] == in_features:
                    observe(name, x.detach().movedim(-3, -1).reshape(-1, in_features))
                return
            if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != in_features:
                return  # the layer itself will complain about such an input
            observe(name, x.detach().reshape(-1, in_features))

        return hook

    def hook_for(name: str, mod: nn.Module):
        if isinstance(mod, (nn.Conv2d, Int8Conv2d)):
            return make_hook(name, mod.in_channels, True)
        return make_hook(name, shape_of(mod, (Int8Linear,))[1], False)

    calibration_data = batches_of(calibration_data)
    modes = {mod: mod.training for mod in model.modules()}
    handles = [
        mod.register_forward_pre_hook(hook_for(name, mod), with_kwargs=True)
        for name, mod in layers.items()
    ]
    batches = 0
    try:
        model.eval()
        with torch.no_grad():
            for batch in calibration_data:
                run_batch(model, batch)
                batches += 1
    finally:
        for h in handles:
            h.remove()
        for mod, training in modes.items():
            mod.training = training
    if batches == 0:
        raise ValueError("calibration_data yielded no batches")


def input_norms(
    model: nn.Module, layers: Mapping[str, nn.Module], calibration_data: Iterable
) -> dict[str, torch.Tensor]:
    """name -> ||X_j||_2 (float64 [in_features]) over every token each layer saw, in one pass (wanda);
    for a conv, per input channel over every pixel."""
    sums: dict[str, torch.Tensor | None] = dict.fromkeys(layers)

    def add(name: str, x: torch.Tensor) -> None:
        x = x.to(torch.float64)
        sq = (x * x).sum(dim=0)
        sums[name] = sq if sums[name] is None else sums[name] + sq.to(sums[name].device)

    observe_inputs(model, layers, calibration_data, add)
    norms = {}
    for name, sq in sums.items():
        if sq is None:
            raise ValueError(
                f"layer {name or '<model>'!r} was not called during calibration; wanda needs its "
                "inputs (skip it, or give calibration_data that reaches it)"
            )
        norm = sq.sqrt()
        if not torch.isfinite(norm).all():
            raise ValueError(
                f"layer {name or '<model>'!r} saw NaN or Inf inputs during calibration"
            )
        norms[name] = norm
    return norms
