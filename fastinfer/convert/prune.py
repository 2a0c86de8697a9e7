"""One-shot pruning in plain PyTorch: write zeros into the weights of linear layers.

    from fastinfer.convert import format_report
    pruned = fastinfer.prune(model, 0.5)                       # zero the 50% smallest |W| per layer
    pruned = fastinfer.prune(model, 0.5, pattern="2:4", method="wanda", calibration_data=batches)
    print(format_report(fastinfer.sparsity_report(pruned)))

Pruning never changes a module's type: it only zeroes entries (in an Int8Linear, int8 entries;
its per-channel scales stay as they are). Faster sparse layers are built later from these zeros.
"""

from __future__ import annotations

import copy
import math
import numbers
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fastinfer.config import skip_patterns
import warnings

from fastinfer.convert._select import progress_bar, scan, shape_of
from fastinfer.convert.calibrate import input_norms
from fastinfer.nn import Int8Conv2d, Int8Linear, linear_weight_and_bias
from fastinfer.ops.conv import is_depthwise

__all__ = ["LayerSparsity", "format_report", "prune", "sparsity_report"]

PATTERNS = ("unstructured", "block", "N:M (e.g. '2:4', '4:8')")
METHODS = ("magnitude", "wanda")
_NM = re.compile(r"(\d+):(\d+)")


# ------------------------------------------------------------------------------------------ prune


def prune(
    model: nn.Module,
    sparsity: float,
    *,
    pattern: str = "unstructured",
    method: str = "magnitude",
    calibration_data: Iterable | None = None,
    skip: str | re.Pattern | Iterable[str | re.Pattern] = (),
    block: tuple[int, int] | None = None,
    inplace: bool = False,
    progress: bool | None = None,
) -> nn.Module:
    """Returns `model` with a fraction `sparsity` of each linear layer's weights set to zero.

    Layers: every nn.Linear (exact type), Hugging Face `Conv1D` (pruned in its [out, in] view),
    fastinfer.nn.Int8Linear, nn.Conv2d (the layers quantize() converts) and Int8Conv2d whose
    qualified name is not matched by `skip` (patterns as in `QuantConfig(skip=...)`). A conv is
    pruned in its [out, kh * kw * in/groups] view with k ordered (ky, kx, channel), the order its
    int8 kernel reads: an N:M group is M consecutive channels of one tap. Depthwise convs are left
    alone (a few weights per channel, and fp32 after quantize()); so is, with a warning, a conv
    whose view the pattern does not divide (a stem conv of 3 channels and "2:4"). A layer registered under several names is pruned once, and is left
    alone if any of its names is skipped (as quantize and sparsify do). The model is deep-copied
    first unless inplace=True.

    sparsity: fraction in [0, 1) per layer; k = round(sparsity * count) entries (or blocks) go.
    pattern: "unstructured": the k lowest scores of the layer (magnitude) or of each output row
        (wanda, as in the paper). "N:M" (e.g. "2:4"; sparsity must be 1 - N/M): each group of M
        consecutive inputs of a row keeps its N highest scores. "block": blocks of `block` =
        (rows, cols) of the [out, in] weight, scored by the sum of their entries' scores. The
        default (block=None) is the int8 kernel's tile: 64 x 64 where out_features is a multiple
        of 64 (four 16-channel blocks then share their tiles and the block-sparse kernel runs its
        full register tile: 3.0x dense at 75% and M=512 against 1.8x-2.3x with 16 x 64 blocks,
        bench/RESULTS.md), else 16 x 64.
    method: "magnitude" scores |W| (an Int8Linear's |W| is |int8| * its row scale); "wanda" scores
        |W_ij| * ||X_j||_2, the L2 norm of input feature j over every calibration token (for a
        conv, of input channel j over every pixel; grouped convs are scored by magnitude).
    calibration_data: for wanda, an iterable of batches run through the model once (eval mode, no
        grad): a tensor is called as model(batch), a tuple/list as model(*batch), a mapping as
        model(**batch). A lone tensor or mapping is taken as one batch.

    Entries that are already zero are pruned first (they count towards k), so the achieved count
    is exactly k unless a layer already had more zeros. Among equal scores the lower index (row
    major) goes first. Errors in the arguments or layers raise ValueError before any weight is
    written.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prune expects an nn.Module, got {type(model).__name__}")
    sparsity = _check_sparsity(sparsity)
    nm = _check_pattern(pattern, sparsity)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    block = _check_block(block)
    skip = skip_patterns(skip, "prune(skip=...)")
    if method == "wanda" and calibration_data is None:
        raise ValueError("method='wanda' needs calibration_data (an iterable of input batches)")

    if not inplace:
        model = copy.deepcopy(model)
    targets = [t for t in scan(model, (Int8Linear,), convs=True, skip=skip)[0] if not isinstance(t.module, nn.Conv1d)]
    targets += [t for t in scan(model, (Int8Conv2d,), skip=skip)[0] if isinstance(t.module, Int8Conv2d)]
    layers = {t.name: t.module for t in targets
              if not (_is_conv(t.module) and is_depthwise(t.module.in_channels, t.module.out_channels, t.module.groups))}
    unfit = [name for name, mod in layers.items() if _is_conv(mod) and not _fits(mod, pattern, nm, block)]
    if unfit:
        warnings.warn(f"prune: pattern {pattern!r} does not divide the weights of {len(unfit)} conv(s), left dense: "
                      + ", ".join(unfit[:5]) + (" ..." if len(unfit) > 5 else ""), stacklevel=2)  # fmt: skip
        for name in unfit:
            del layers[name]
    for name, mod in layers.items():
        _check_layer(name, mod, pattern, nm, block)

    norms: dict[str, torch.Tensor] = {}
    if method == "wanda":
        norms = input_norms(model, layers, calibration_data)

    with progress_bar(len(layers), progress, "fastinfer.prune") as bar:
        for name, mod in layers.items():
            _prune_layer(mod, sparsity, pattern, nm, block, norms.get(name))
            bar.update(1)
    return model


def _check_sparsity(sparsity: object) -> float:
    if (
        not isinstance(sparsity, numbers.Real)
        or isinstance(sparsity, bool)
        or not math.isfinite(float(sparsity))
        or not 0.0 <= float(sparsity) < 1.0
    ):
        raise ValueError(f"sparsity must be a float in [0, 1), got {sparsity!r}")
    return float(sparsity)


def _check_pattern(pattern: object, sparsity: float) -> tuple[int, int] | None:
    """(N, M) for an "N:M" pattern, None for "unstructured" / "block"."""
    if pattern in ("unstructured", "block"):
        return None
    m = _NM.fullmatch(pattern) if isinstance(pattern, str) else None
    if m is None or not 0 < int(m[1]) < int(m[2]):
        raise ValueError(f"pattern must be one of {PATTERNS} with 0 < N < M, got {pattern!r}")
    n, mm = int(m[1]), int(m[2])
    if abs(sparsity - (1.0 - n / mm)) > 1e-9:
        raise ValueError(
            f"pattern {pattern!r} zeroes {mm - n} of every {mm} weights: sparsity must be "
            f"{1.0 - n / mm!r}, got {sparsity!r}"
        )
    return n, mm


def _layer_block(block: tuple[int, int] | None, out_features: int) -> tuple[int, int]:
    """The block shape used for a layer: the one given, or the kernel's default for its width."""
    if block is not None:
        return block
    return (64, 64) if out_features % 64 == 0 else (16, 64)


def _check_block(block: object) -> tuple[int, int] | None:
    if block is None:
        return None
    ok = (
        isinstance(block, Sequence)
        and len(block) == 2
        and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    )
    if not ok:
        raise ValueError(f"block must be (rows, cols) of positive ints, got {block!r}")
    return int(block[0]), int(block[1])


def _is_conv(mod: nn.Module) -> bool:
    return isinstance(mod, (nn.Conv2d, Int8Conv2d))


def _view_shape(mod: nn.Module) -> tuple[int, int]:
    """[out, in] of the weight view a layer is pruned in."""
    if _is_conv(mod):
        kh, kw = mod.kernel_size
        return mod.out_channels, kh * kw * mod.in_channels // mod.groups
    return shape_of(mod, (Int8Linear,))


def _fits(mod: nn.Module, pattern: str, nm, block) -> bool:
    out_f, in_f = _view_shape(mod)
    if nm is not None:
        return in_f % nm[1] == 0
    if pattern == "block":
        r, c = _layer_block(block, out_f)
        return out_f % r == 0 and in_f % c == 0
    return True


def _conv_view(w: torch.Tensor) -> torch.Tensor:
    """[out, in/g, kh, kw] -> [out, kh * kw * in/g] with k ordered (ky, kx, channel) (a copy)."""
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)


def _conv_unview(mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    out, cg, kh, kw = shape
    return mask.reshape(out, kh, kw, cg).permute(0, 3, 1, 2)


def _check_layer(
    name: str, mod: nn.Module, pattern: str, nm: tuple[int, int] | None, block: tuple[int, int] | None
) -> None:
    label = name or "<model>"
    out_f, in_f = _view_shape(mod)
    if nm is not None and in_f % nm[1]:
        raise ValueError(
            f"layer {label!r}: pattern {pattern!r} needs in_features divisible by {nm[1]}, "
            f"got K={in_f}"
        )
    block = _layer_block(block, out_f)
    if pattern == "block" and (out_f % block[0] or in_f % block[1]):
        raise ValueError(
            f"layer {label!r}: weight [{out_f}, {in_f}] does not split into blocks of {block}"
        )
    if isinstance(mod, (Int8Linear, Int8Conv2d)):
        finite = bool(torch.isfinite(mod.weight_scale).all())
    elif isinstance(mod, nn.Conv2d):
        finite = bool(torch.isfinite(mod.weight.detach()).all())
    else:
        finite = bool(torch.isfinite(linear_weight_and_bias(mod)[0].detach()).all())
    if not finite:
        raise ValueError(f"layer {label!r} has NaN or Inf weights; cannot prune it")


# --------------------------------------------------------------------------------------- masking


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """bool mask of the k lowest entries along the last dim; ties go to the lower index."""
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k > 0:
        idx = torch.argsort(scores, dim=-1, stable=True)[..., :k]
        mask.scatter_(-1, idx, True)
    return mask


def _prune_mask(
    absw: torch.Tensor,
    norm: torch.Tensor | None,
    sparsity: float,
    pattern: str,
    nm: tuple[int, int] | None,
    block: tuple[int, int] | None,
) -> torch.Tensor:
    """bool [out, in]: True where the weight goes. `absw` is |W| in float64."""
    out_f, in_f = absw.shape
    scores = absw if norm is None else absw * norm.to(absw.device)[None, :]
    zero = absw == 0
    if pattern == "block":
        r, c = _layer_block(block, out_f)
        bscore = scores.reshape(out_f // r, r, in_f // c, c).sum(dim=(1, 3))
        bscore[zero.reshape(out_f // r, r, in_f // c, c).all(dim=3).all(dim=1)] = -1.0
        bmask = _lowest(bscore.flatten(), round(sparsity * bscore.numel())).reshape(bscore.shape)
        return bmask.repeat_interleave(r, dim=0).repeat_interleave(c, dim=1)
    scores = scores.masked_fill(zero, -1.0)  # already-zero entries are pruned first
    if nm is not None:
        n, m = nm
        return _lowest(scores.reshape(out_f, in_f // m, m), m - n).reshape(out_f, in_f)
    if norm is None:  # magnitude: the whole layer competes
        return _lowest(scores.flatten(), round(sparsity * scores.numel())).reshape(out_f, in_f)
    return _lowest(scores, round(sparsity * in_f))  # wanda: per output row


@torch.no_grad()
def _prune_layer(
    mod: nn.Module,
    sparsity: float,
    pattern: str,
    nm: tuple[int, int] | None,
    block: tuple[int, int] | None,
    norm: torch.Tensor | None,
) -> None:
    if _is_conv(mod):
        kh, kw = mod.kernel_size
        if norm is not None:  # per input channel -> per (ky, kx, channel) column of the view
            norm = norm.repeat(kh * kw) if mod.groups == 1 else None
        if isinstance(mod, Int8Conv2d):
            q = mod.weight_int8.clone()
            absw = _conv_view(q).to(torch.float64).abs() * mod.weight_scale.to(torch.float64)[:, None]
            q[_conv_unview(_prune_mask(absw, norm, sparsity, pattern, nm, block), q.shape)] = 0
            mod.set_weight(q, mod.weight_scale.clone())
        else:
            w = mod.weight
            mask = _prune_mask(_conv_view(w.detach()).abs().to(torch.float64), norm, sparsity, pattern, nm, block)
            w.masked_fill_(_conv_unview(mask, w.shape).to(w.device), 0)
        return
    if isinstance(mod, Int8Linear):
        q = mod.weight_int8.clone()
        absw = q.to(torch.float64).abs() * mod.weight_scale.to(torch.float64)[:, None]
        q[_prune_mask(absw, norm, sparsity, pattern, nm, block)] = 0
        mod.set_weight(q, mod.weight_scale.clone())
        return
    weight, _ = linear_weight_and_bias(mod)  # a view [out, in] of the parameter
    mask = _prune_mask(weight.detach().abs().to(torch.float64), norm, sparsity, pattern, nm, block)
    weight.masked_fill_(mask.to(weight.device), 0)


# ---------------------------------------------------------------------------------------- report


@dataclass(frozen=True)
class LayerSparsity:
    """One linear-like layer of `sparsity_report`: its shape and how many weights are nonzero."""

    name: str
    kind: str
    out_features: int
    in_features: int
    nonzeros: int
    numel: int
    sparsity: float

    def __str__(self) -> str:
        return (
            f"{self.name or '<model>'} ({self.kind} {self.out_features}x{self.in_features}): "
            f"{self.nonzeros}/{self.numel} nonzero, sparsity {self.sparsity:.2%}"
        )


def _stats(mod: nn.Module) -> tuple[int, int, int, int] | None:
    """(out_features, in_features, nonzeros, numel) of a linear-like layer, else None."""
    if callable(getattr(mod, "sparsity_stats", None)):
        nonzeros, numel = mod.sparsity_stats()
        out_f, in_f = getattr(mod, "out_features", 0), getattr(mod, "in_features", 0)
        return int(out_f), int(in_f), int(nonzeros), int(numel)
    if isinstance(mod, Int8Linear):
        q = mod.weight_int8
        return mod.out_features, mod.in_features, int(torch.count_nonzero(q)), q.numel()
    if isinstance(mod, (Int8Conv2d, nn.Conv2d)):
        w = mod.weight_int8 if isinstance(mod, Int8Conv2d) else mod.weight.detach()
        out_f, in_f = _view_shape(mod)
        return out_f, in_f, int(torch.count_nonzero(w)), w.numel()
    weight, _ = linear_weight_and_bias(mod)
    if weight is None:
        return None
    out_f, in_f = weight.shape
    return out_f, in_f, int(torch.count_nonzero(weight.detach())), weight.numel()


def sparsity_report(model: nn.Module) -> list[LayerSparsity]:
    """One row per linear-like layer (nn.Linear, Hugging Face Conv1D, Int8Linear, nn.Conv2d and
    Int8Conv2d in their [out, kh * kw * in/groups] view, and any module with a
    `sparsity_stats() -> (nonzeros, numel)` method), in named_modules order (a shared layer
    once, under its first name)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsity_report expects an nn.Module, got {type(model).__name__}")
    rows = []
    for name, mod in model.named_modules():
        stats = _stats(mod)
        if stats is None:
            continue
        out_f, in_f, nonzeros, numel = stats
        sparsity = 1.0 - nonzeros / numel if numel else 0.0
        rows.append(LayerSparsity(name, type(mod).__name__, out_f, in_f, nonzeros, numel, sparsity))
    return rows


def format_report(rows: Iterable[LayerSparsity]) -> str:
    """An aligned text table of `sparsity_report` rows with a total line."""
    rows = list(rows)
    nonzeros = sum(r.nonzeros for r in rows)
    numel = sum(r.numel for r in rows)
    total = 1.0 - nonzeros / numel if numel else 0.0
    table = [("layer", "kind", "shape", "nonzeros", "numel", "sparsity")]
    for r in rows:
        table.append(
            (r.name or "<model>", r.kind, f"{r.out_features}x{r.in_features}", str(r.nonzeros),
             str(r.numel), f"{r.sparsity:.2%}")
        )  # fmt: skip
    table.append((f"total ({len(rows)} layers)", "", "", str(nonzeros), str(numel), f"{total:.2%}"))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = []
    for i, row in enumerate(table):
        cells = [c.ljust(w) if j < 3 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if i == 0 or i == len(table) - 2:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
