"""SmoothQuant (Xiao et al., 2023): move the activations' outlier channels into the weights before
int8 quantization, so that per-token int8 loses less of the small channels.

For a linear layer y = x W^T and per-input-channel factors s_j > 0, y = (x / s) (W s)^T exactly.
With s_j = max|x_j|^alpha / max_i |W_ij|^(1 - alpha) (alpha in [0, 1]; max|x_j| over the
calibration tokens), x / s has flatter channels and W s absorbs them. Where the layer's input is the
output of a norm that feeds only linear layers (the pre-norm blocks of GPT-2, LLaMA-style models,
nn.TransformerEncoderLayer(norm_first=True)), 1 / s is folded into the norm's weight and bias: no
cost at run time, and the norm's consumers share one s (their weight columns' maxima combined).
Elsewhere (BERT's post-norm blocks, where the norm's output also feeds the residual; plain MLPs) the
layer multiplies its input by 1 / s itself (Int8Linear.input_scale: one elementwise pass).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from fastinfer.convert._select import Target
from fastinfer.convert.calibrate import observe_inputs
from fastinfer.nn import linear_weight_and_bias

__all__ = ["smooth"]


def _norm_weight(mod: nn.Module) -> torch.Tensor | None:
    """The per-channel weight of a LayerNorm with an affine weight, or of an RMSNorm-style module
    (a class whose name ends in RMSNorm, with a 1-D `weight`)."""
    if isinstance(mod, nn.LayerNorm) and mod.weight is not None and mod.weight.dim() == 1:
        return mod.weight
    if type(mod).__name__.endswith("RMSNorm") and isinstance(getattr(mod, "weight", None), torch.Tensor):
        return mod.weight if mod.weight.dim() == 1 else None
    return None


def _block_norms(block: nn.Module) -> list[tuple[str, list[str]]]:
    """(norm attribute, [consumer paths]) of a pre-norm block whose forward is known to feed the
    norm's output to those linear layers only."""
    name = type(block).__name__
    if name == "GPT2Block" and not hasattr(block, "crossattention"):
        return [("ln_1", ["attn.c_attn"]), ("ln_2", ["mlp.c_fc"])]
    if name.endswith("DecoderLayer") and all(hasattr(block, a) for a in ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp")):
        attn, mlp = block.self_attn, block.mlp
        if all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj")) and all(hasattr(mlp, p) for p in ("gate_proj", "up_proj")):
            return [("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
                    ("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"])]  # fmt: skip
    if isinstance(block, nn.TransformerEncoderLayer) and block.norm_first and type(block).forward is nn.TransformerEncoderLayer.forward:
        return [("norm2", ["linear1"])]
    return []


def norm_groups(model: nn.Module) -> list[tuple[str, list[str]]]:
    """(norm's qualified name, [its consumers' qualified names]) for every foldable norm."""
    out = []
    for name, block in model.named_modules():
        prefix = name + "." if name else ""
        for norm, consumers in _block_norms(block):
            nmod = block.get_submodule(norm)
            w = _norm_weight(nmod)
            if w is None:
                continue
            mods = [block.get_submodule(c) for c in consumers]
            weights = [linear_weight_and_bias(m)[0] for m in mods]
            if any(wt is None or wt.shape[1] != w.shape[0] for wt in weights):
                continue
            out.append((prefix + norm, [prefix + c for c in consumers]))
    return out


def _factors(amax: torch.Tensor, wmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = amax^alpha / wmax^(1 - alpha), 1 where either is 0 (a channel never used), in float64."""
    s = amax.double().clamp(min=0) ** alpha / wmax.double().clamp(min=1e-12) ** (1 - alpha)
    s = torch.where((amax > 0) & (wmax > 0) & torch.isfinite(s), s, torch.ones_like(s))
    return s.clamp(min=1e-5, max=1e5)


def _col_max(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().double().abs().amax(dim=0)


def _scale_columns(mod: nn.Module, s: torch.Tensor) -> None:
    """The layer's input columns times s, as a new parameter: a weight tied to another module (GPT-2's
    lm_head shares the token embedding) must not change under it."""
    w = mod.weight
    if type(mod) is nn.Linear:
        new = w.detach() * s.to(w)[None, :]
    else:  # a transformers Conv1D: weight [in, out]
        new = w.detach() * s.to(w)[:, None]
    mod.weight = nn.Parameter(new, requires_grad=w.requires_grad)


def _divide(mod: nn.Module, name: str, s: torch.Tensor) -> None:
    p = getattr(mod, name, None)
    if p is not None:
        setattr(mod, name, nn.Parameter(p.detach() / s.to(p), requires_grad=p.requires_grad))


def smooth(model: nn.Module, targets: list[Target], alpha: float, calibration_data: Iterable) -> dict[int, tuple[str, torch.Tensor | None]]:
    """Smooths the float linear layers in `targets` (in place) on calibration_data. Returns, per
    layer (id), (what was done, the input_scale it must apply itself, or None when the smoothing
    was folded into a norm)."""
    layers = {}
    for t in targets:
        weight, _ = linear_weight_and_bias(t.module)
        if weight is not None and len(t.names) == 1:
            layers[t.name] = t.module
    amax: dict[str, torch.Tensor] = {}

    def observe(name: str, x: torch.Tensor) -> None:
        m = x.detach().float().abs().amax(dim=0) if x.shape[0] else x.new_zeros(x.shape[1])
        amax[name] = m if name not in amax else torch.maximum(amax[name], m.to(amax[name].device))

    observe_inputs(model, layers, calibration_data, observe)
    done: dict[int, tuple[str, torch.Tensor | None]] = {}
    with torch.no_grad():
        for norm_name, consumers in norm_groups(model):
            if not any(c in amax for c in consumers):
                continue
            norm = model.get_submodule(norm_name)
            mods = [model.get_submodule(c) for c in consumers]
            a = torch.stack([amax[c] for c in consumers if c in amax]).amax(dim=0)
            wmax = torch.stack([_col_max(linear_weight_and_bias(m)[0]) for m in mods]).amax(dim=0)
            s = _factors(a, wmax, alpha)
            _divide(norm, "weight", s)
            _divide(norm, "bias", s)
            for m in mods:
                _scale_columns(m, s)
                done[id(m)] = (f"SmoothQuant alpha={alpha:g} folded into {norm_name}", None)
        for name, mod in layers.items():
            if id(mod) in done or name not in amax:
                continue
            w, _ = linear_weight_and_bias(mod)
            s = _factors(amax[name], _col_max(w), alpha)
            _scale_columns(mod, s)
            done[id(mod)] = (f"SmoothQuant alpha={alpha:g} (input scaling)", (1.0 / s).float())
    return done
