"""Calibration: run a few batches through the model with a forward pre-hook on each layer of
interest. One hook runner for every statistic a conversion needs from real inputs: wanda's
input-feature norms (fastinfer.prune, method="wanda"), SmoothQuant's channel maxima
(convert/smooth.py) and the static layers' input ranges (input_absmax)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

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


def materialize(data) -> list:
    """The batches of data as a list, for conversions that read them more than once (a generator
    runs once); ValueError when there are none."""
    batches = list(batches_of(data))
    if not batches:
        raise ValueError("calibration_data yielded no batches")
    return batches


def observe_inputs(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    calibration_data: Iterable,
    observe: Callable[[str, torch.Tensor], None],
    progress: bool | None = False,
    desc: str = "fastinfer: calibration",
) -> None:
    """Runs every batch of calibration_data through the model once (eval mode, no grad; each module's
    training flag restored after) and calls observe(name, x) with each input a named layer gets, as
    a detached [tokens, in_features] view (a conv's [N, C, H, W] input as [pixels, C] rows). A batch is called as model(batch) for a tensor,
    model(*batch) for a tuple/list, model(**batch) for a mapping; a lone tensor or mapping is one
    batch. ValueError for data that is not batches, or that yields none. progress: a bar over the
    batches (None: only for 8 or more of a known count)."""

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
            total = len(calibration_data) if hasattr(calibration_data, "__len__") else None
            enabled = (total is not None and total >= 8) if progress is None else progress
            with tqdm(total=total, desc=desc, unit="batch", disable=not enabled, leave=False) as bar:
                for batch in calibration_data:
                    run_batch(model, batch)
                    batches += 1
                    bar.update(1)
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


def input_absmax(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    calibration_data: Iterable,
    input_scales: Mapping[str, torch.Tensor] | None = None,
    progress: bool | None = None,
) -> dict[str, float]:
    """name -> max |x| over every input each layer saw, in one pass (the static layers' ranges);
    a layer given an input scale (SmoothQuant's, applied by the int8 layer before it quantizes)
    is measured on x * scale. A layer calibration never reached is missing from the result; NaN
    or Inf inputs give NaN (the caller keeps such a layer dynamic)."""
    input_scales = input_scales or {}
    amax: dict[str, float] = {}

    def observe(name: str, x: torch.Tensor) -> None:
        scale = input_scales.get(name)
        x = x.float() if scale is None else x.float() * scale.to(x.device)[None, :]
        m = float(x.abs().max()) if x.numel() else 0.0  # NaN when x holds one
        prev = amax.get(name, 0.0)
        amax[name] = math.nan if math.isnan(m) or math.isnan(prev) else max(prev, m)

    observe_inputs(model, layers, calibration_data, observe, progress, "fastinfer: static calibration")
    return amax
