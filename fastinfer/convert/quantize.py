"""fastinfer.quantize: float linear layers (and SparseLinear) and nn.Conv2d -> int8 layers."""

from __future__ import annotations

import copy
import math
from collections.abc import Collection

import torch
from torch import nn
from torch.nn import functional as F

from fastinfer.config import QuantConfig
from fastinfer.convert._select import LeftFloat, Target, config_reason, scan
from fastinfer.convert._swap import set_module, swap
from fastinfer.convert.calibrate import input_absmax, materialize
from fastinfer.convert.attention import is_hf_model, enable_fast_attention
from fastinfer.convert.hf_quantizer import mark_converted
from fastinfer.convert.fuse import ConvFusion, conv_fusions, fx_graph, handoff_chains, rewrite_residual_blocks
from fastinfer.convert.hf_blocks import fuse_blocks, unfused_class
from fastinfer.convert.patterns import is_erf_gelu, linear_activation, linear_activation_fusions  # noqa: F401 (is_erf_gelu: public here before)
from fastinfer.convert.report import ConversionReport, LayerConversion, attach
from fastinfer.convert.smooth import smooth
from fastinfer.convert.sparsify import sparse_int8_or_dense
from fastinfer.nn import (
    DepthwiseConv2d,
    Fused,
    Int8Conv1d,
    Int8Conv2d,
    Int8Linear,
    Int8MultiheadAttention,
    SparseLinear,
    StaticInt8Linear,
    WeightOnlyInt8Linear,
    quantize_weight_per_channel,
)
from fastinfer.nn.attention import mha_float_reason
from fastinfer.nn.norm import LayerNorm as FastLayerNorm
from fastinfer.ops.conv import is_depthwise

__all__ = ["quantize"]

_WEIGHT_ONLY_FLOAT = "QuantConfig(activations='none'): no weight-only kernel for this layer kind (linear layers only)"


def quantize(model: nn.Module, config: QuantConfig | None = None, *, calibration_data=None,
             inplace: bool = False) -> nn.Module:  # fmt: skip
    """Returns `model` with every nn.Linear (not skipped by `config`) replaced by an Int8Linear, and
    every fastinfer.nn.SparseLinear by its int8 counterpart (SparseInt8Linear, or Int8Linear where
    the sparse int8 kernel would not be faster): quantize after sparsify equals sparsify after quantize.

    Hugging Face `Conv1D` layers (GPT-2 and relatives store linear weights as [in, out]) are
    linear layers too and are converted the same way. Subclasses of nn.Linear are left alone: they
    may change forward() in ways a swap would lose.

    nn.Conv2d layers with zero padding become Int8Conv2d (depthwise ones DepthwiseConv2d, fp32:
    see QuantConfig.depthwise), nn.Conv1d ones Int8Conv1d (no fusions), and so do subclasses that keep
    nn.Conv2d's forward (one that only fixes padding="same" in __init__, say); a subclass with its
    own forward (e.g. one that pads by the input's size first) stays float. A BatchNorm2d (eval
    mode) that only post-processes a conv is folded into its weights and replaced by a fastinfer.nn.Fused (an nn.Identity);
    with fuse_activations, a ReLU / ReLU6 / SiLU / Hardswish module after it (or after its
    BatchNorm2d) is fused into the conv's epilogue and replaced too. "Only post-processes" is known
    from an nn.Sequential's order or from a torch.fx trace of the model (ResNet / MobileNet blocks).

    fastinfer.conversion_report(result) lists every layer of a convertible kind: what it became,
    the fusions made, or why it stayed float; a one-line summary is logged to the "fastinfer"
    logger (stderr by default).

    With config.fuse_activations (the default), an activation module that only post-processes a
    converted linear layer (erf or tanh GELU, SiLU, ReLU, ReLU6, Hardswish: the next module of an
    nn.Sequential, BERT-style `intermediate_act_fn` after `dense`, GPT-2's MLP, the gate projection
    of LLaMA-style MLPs; fastinfer/convert/patterns.py) is fused into that layer's epilogue
    (activation="gelu", "gelu_tanh", ...) and replaced by fastinfer.nn.Fused. A layer that stays
    float (skipped) or is registered under several names is never fused.

    With QuantConfig(activations="none"), linear layers become WeightOnlyInt8Linear (int8 weights,
    activations never quantized) and convolutions and nn.MultiheadAttention stay float, each with
    that reason in the report.

    With config.attention (the default), a transformers model that runs torch's SDPA is switched to
    fastinfer's fused attention kernel (see QuantConfig.attention; the report says what was done).
    nn.MultiheadAttention modules (also inside nn.TransformerEncoderLayer / DecoderLayer) become
    Int8MultiheadAttention: the fused in_proj_weight one Int8Linear, out_proj another, the
    attention on the fused kernel (torch's SDPA with attention=False); torch's fused encoder fast
    path is turned off for them (it reads float weights).

    With QuantConfig(activations="static"), calibration_data (batches as fastinfer.prune takes them)
    is run through the float model (after any smoothing) once to find each linear layer's input
    range: those layers become StaticInt8Linear (one activation scale, max|x| / 127). Convolutions
    and nn.MultiheadAttention keep their run-time scales, and so does a layer calibration never
    reached; the report says which.

    With QuantConfig(smoothquant=alpha), calibration_data (batches as fastinfer.prune takes them)
    is run through the float model once to find each layer's input channel maxima; see
    QuantConfig.smoothquant and fastinfer/convert/smooth.py. The report says, per layer, where
    the smoothing went.

    The original model is not modified unless inplace=True. The result is a plain nn.Module: same
    inputs, same outputs (within int8 rounding), usable with torch.compile.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize expects an nn.Module, got {type(model).__name__}")
    if config is None:
        config = QuantConfig()
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a fastinfer.QuantConfig, got {type(config).__name__}")
    if config.smoothquant is not None and calibration_data is None:
        raise ValueError("QuantConfig(smoothquant=...) needs quantize(..., calibration_data=batches): the "
                         "smoothing factors come from the inputs' channel maxima")  # fmt: skip
    static = config.activations == "static"
    if static and calibration_data is None:
        raise ValueError("QuantConfig(activations='static') needs quantize(..., calibration_data=batches): the "
                         "layers' input scales come from the inputs' ranges")  # fmt: skip
    if calibration_data is not None and (config.smoothquant is not None or static):
        calibration_data = materialize(calibration_data)  # one or two passes over the same batches
    if not inplace:
        model = copy.deepcopy(model)
    model, mha_rows = _convert_mha(model, config)
    targets, left = scan(model, (SparseLinear,), convs=True, skip=config.skip, filter_fn=config.filter_fn,
                         min_features=config.min_features)  # fmt: skip
    smoothed: dict[int, tuple[str, object]] = {}
    if config.smoothquant is not None:
        smoothed = smooth_linear_targets(model, targets, float(config.smoothquant), calibration_data)
    weight_only = config.activations == "none"
    if weight_only:  # only linear layers have a weight-only kernel
        keep = [t for t in targets if not isinstance(t.module, (nn.Conv1d, nn.Conv2d))]
        left += [LeftFloat(t.names, t.module, _WEIGHT_ONLY_FLOAT) for t in targets if not any(t is k for k in keep)]
        targets = keep
    convs = {id(t.module): t.module for t in targets if isinstance(t.module, nn.Conv2d)}
    conv_dtypes = {m.weight.dtype for m in convs.values()}
    convs1d = {id(t.module) for t in targets if isinstance(t.module, nn.Conv1d)}
    linears = [t for t in targets if id(t.module) not in convs and id(t.module) not in convs1d]
    x_scales = static_input_scales(model, linears, smoothed, calibration_data, config.progress) if static else {}
    # one trace for both kinds of fusion (None: fx cannot trace the model); the layers and the
    # activations a fusion may take stay call_module nodes even when they are not torch.nn's
    leaves = tuple(t.module for t in targets) + tuple(m for m in model.modules() if linear_activation(m))
    graph = fx_graph(model, leaves) if config.fuse_activations or convs else None
    fused = linear_activation_fusions(model, linears, graph) if config.fuse_activations else {}
    shared = {id(t.module) for t in targets if len(t.names) > 1}
    cfused = conv_fusions(model, convs, shared, graph)
    if not config.fuse_activations:  # BatchNorm folding stays: it does not change what the model computes
        cfused = {k: ConvFusion(bn=f.bn) for k, f in cfused.items() if f.bn}
    rows: dict[int, LayerConversion] = {}

    def convert(mod: nn.Module) -> nn.Module:
        if id(mod) in convs1d:
            new, detail = Int8Conv1d.from_conv(mod), _STATIC_CONV if static else ""
        elif id(mod) in convs:
            f = cfused.get(id(mod), ConvFusion())
            kw = dict(bn=f.module("bn"), activation=f.act_name if f.act else None)
            detail = f.describe()
            if config.depthwise == "float" and is_depthwise(mod.in_channels, mod.out_channels, mod.groups):
                new = DepthwiseConv2d.from_conv(mod, **kw)
                detail = "; ".join(filter(None, ("depthwise: fp32 kernel", detail)))
            else:
                new = Int8Conv2d.from_conv(mod, **kw)
                detail = "; ".join(filter(None, (detail, _STATIC_CONV if static else "")))
        else:
            _, _, act, note = fused.get(id(mod), (None, None, None, ""))
            x_scale, why = x_scales.get(id(mod), (None, ""))
            new = _to_int8(mod, act, weight_only, x_scale)
            how, input_scale = smoothed.get(id(mod), ("", None))
            if input_scale is not None:
                new.input_scale = input_scale
            mode = "weight-only" if weight_only else (f"static (input scale {x_scale:.4g})" if x_scale else why)
            detail = "; ".join(filter(None, (mode, f"{act} fused{note}" if act else "", how)))
        rows[id(mod)] = (type(mod).__name__, type(new).__name__, detail)
        return new

    attention = (enable_fast_attention(model, bf16=config.attention == "bf16") if config.attention
                 else "kept: QuantConfig(attention=False)")  # fmt: skip
    report = ConversionReport("fastinfer.quantize", attention=attention if is_hf_model(model) else None)
    position = {fqn: i for i, (fqn, _) in enumerate(model.named_modules(remove_duplicate=False))}
    order = sorted([*targets, *left, *mha_rows], key=lambda item: position[item.name])  # model order
    result = swap(model, targets, convert, config.progress, "fastinfer.quantize")
    name_of = {id(t.module): t.name for t in targets}
    slots = [((parent, child), name_of[k]) for k, (parent, child, _, _) in fused.items()]
    slots += [(slot, name_of[k]) for k, f in cfused.items() for slot in (f.bn, f.act) if slot is not None]
    for (parent, name), into in slots:  # what now runs inside the layer before it
        was = parent._modules[name]
        identity = Fused(type(was).__name__, into)
        identity.train(was.training)
        setattr(parent, name, identity)
    for item in order:
        if isinstance(item, LayerConversion):
            report.append(item)
        elif id(item.module) in rows:
            kind, now, detail = rows[id(item.module)]
            report.append(LayerConversion(item.name, kind, now, detail))
        else:
            report.append(LayerConversion(item.name, type(item.module).__name__, "float", item.reason))
    if handoff_applies(config.conv_handoff, conv_dtypes):
        report.add_details(mark_conv_handoff(result, u8=config.conv_handoff == "u8", end=next(iter(conv_dtypes))))
    if config.fuse_activations and config.rewrite_blocks and result is model:
        words, report.blocks = rewrite_blocks(result)
        report.add_details(words)
    if config.layernorm:
        result, n = fast_layernorms(result)
        report.layernorm = f"{n} on fastinfer's kernel" if n else None
    else:
        report.layernorm = "kept: QuantConfig(layernorm=False)"
    if report.converted and is_hf_model(result):
        mark_converted(result)  # transformers' own from_pretrained then refuses its saved folders
    attach(result, report)
    return result


def rewrite_blocks(model: nn.Module) -> tuple[dict[str, str], str | None]:
    """QuantConfig.rewrite_blocks on a converted model: the activations and residual adds its
    blocks' forwards apply after their Int8Conv2d layers, moved into those layers
    (fastinfer.convert.fuse.rewrite_residual_blocks); transformers' BERT-style output blocks adding
    their input in their int8 dense layer, and their encoder layers on the short road
    (fastinfer.convert.hf_blocks). Returns (the report's words per layer name, the report's words
    on the transformers blocks or None)."""
    words = {}
    if any(isinstance(m, Int8Conv2d) for m in model.modules()):
        for block in rewrite_residual_blocks(model, Int8Conv2d):
            words.update({conv: f"{how} (block {block.name} rewritten with torch.fx)" for conv, how in block.fused.items()})
    fused = fuse_blocks(model)
    layers: dict[str, int] = {}
    for name, kind in fused.items():
        cls = unfused_class(model.get_submodule(name)).__name__
        if kind == "output":
            words[f"{name}.dense" if name else "dense"] = f"residual add fused ({cls}'s input)"
        else:
            layers[cls] = layers.get(cls, 0) + 1
    blocks = ", ".join(f"{n} {cls}" for cls, n in layers.items())
    return words, (f"{blocks} on fastinfer's layer path" if blocks else None)


def handoff_applies(conv_handoff: bool | str, conv_dtypes: set) -> bool:
    """Whether QuantConfig.conv_handoff changes a model whose convs hold conv_dtypes: an fp32 one,
    or a bf16 one with "u8" (its links carry bf16 already)."""
    return bool(conv_handoff) and (conv_dtypes == {torch.float32} or (conv_handoff == "u8" and conv_dtypes == {torch.bfloat16}))


def mark_conv_handoff(model: nn.Module, u8: bool = False, end: torch.dtype = torch.float32) -> dict[str, str]:
    """QuantConfig.conv_handoff on a converted fp32 model: in each chain of Int8Conv2d /
    DepthwiseConv2d layers that feed only each other (fastinfer.convert.fuse.handoff_chains: from a
    torch.fx trace only), linked where a depthwise conv is at one end and an int8 conv at the other,
    the inner ones output bf16 and the last one float32, following the model's casts. The links are
    an inverted residual's expanded tensors, the model's largest: linking the narrow block outputs
    too measured the same speed and lost 0.8 dB of output SQNR on a MobileNetV2; two fp32 depthwise
    convs in a row would lose their exactness. u8 (conv_handoff="u8"): an inner conv that fuses
    relu6 and reaches the next through identities alone outputs uint8 instead (its range [0, 6] in
    254 steps: fastinfer.ops.conv.U8_SCALE). end: the model's dtype, which the last conv of a chain
    returns (bf16 models: with u8 only). Returns the report's words per layer name."""
    bare: set[str] = set()
    chains = handoff_chains(model, (Int8Conv2d, DepthwiseConv2d), bare=bare,
                            keep=lambda a, b: isinstance(a, DepthwiseConv2d) != isinstance(b, DepthwiseConv2d))
    words = {}
    for m in model.modules():
        if isinstance(m, (Int8Conv2d, DepthwiseConv2d)):
            m._takes_u8 = False
    for chain in chains:
        for name, nxt in zip(chain, chain[1:]):
            layer = model.get_submodule(name)
            dtype = torch.uint8 if u8 and name in bare and layer.activation == "relu6" else torch.bfloat16
            layer.output_dtype, layer._follows_model_dtype = dtype, False
            model.get_submodule(nxt)._takes_u8 = dtype == torch.uint8
            words[name] = f"output {'uint8' if dtype == torch.uint8 else 'bf16'} to {nxt}"
        last = model.get_submodule(chain[-1])
        last.output_dtype, last._follows_model_dtype = end, True
        words[chain[-1]] = f"last of a conv chain from {chain[0]}: output {str(end).replace('torch.', '')}"
    return words


def fast_layernorms(model: nn.Module, names: Collection[str] | None = None) -> tuple[nn.Module, int]:
    """Every nn.LayerNorm of the model (the class itself: a subclass may have its own forward), or
    those at `names`, replaced by fastinfer.nn.LayerNorm sharing its parameters (a module under
    several names stays one module); returns (the model, itself replaced when it is one, and how
    many modules were replaced)."""
    found: dict[int, tuple[nn.Module, list[str]]] = {}
    for fqn, mod in model.named_modules(remove_duplicate=False):
        if type(mod) is nn.LayerNorm and (names is None or fqn in names):
            found.setdefault(id(mod), (mod, []))[1].append(fqn)
    for mod, fqns in found.values():
        new = FastLayerNorm.from_layernorm(mod)
        for fqn in fqns:
            model = set_module(model, fqn, new)
    return model, len(found)


def smooth_linear_targets(model: nn.Module, targets: list[Target], alpha: float, calibration_data) -> dict:
    """SmoothQuant on the float linear layers among quantize()'s targets (in place): per layer id,
    (what was done, the input_scale the int8 layer must apply, or None)."""
    linear = [t for t in targets if not isinstance(t.module, (nn.Conv1d, nn.Conv2d, SparseLinear))]
    done = smooth(model, linear, alpha, calibration_data)
    for t in linear:
        done.setdefault(id(t.module), ("SmoothQuant: not smoothed (calibration_data never reached it)", None))
    return done


_STATIC_CONV = "per-sample activation scales (static scales are built for linear layers only)"


def static_input_scales(model: nn.Module, linears: list[Target], smoothed: dict, calibration_data,
                        progress: bool | None) -> dict[int, tuple[float | None, str]]:  # fmt: skip
    """One calibration pass over the (already smoothed) float model: per linear layer id,
    (its StaticInt8Linear input scale max|x| / 127, "") or (None, why it stays dynamic)."""
    layers = {t.name: t.module for t in linears}
    # a layer SmoothQuant gave an input_scale has its weight columns scaled already: in this float
    # model its input must be scaled too (as the int8 layer will), or every layer after it sees
    # wrong values; the observing hooks, registered later, run after these and see x * scale
    handles = []
    for t in linears:
        inv = smoothed.get(id(t.module), ("", None))[1]
        if inv is not None:
            handles.append(t.module.register_forward_pre_hook(
                lambda mod, args, inv=inv: (args[0] * inv.to(args[0]), *args[1:]) if args else None))
    try:
        amax = input_absmax(model, layers, calibration_data, None, progress)
    finally:
        for h in handles:
            h.remove()
    out: dict[int, tuple[float | None, str]] = {}
    for t in linears:
        a = amax.get(t.name)
        if a is None:
            out[id(t.module)] = (None, "dynamic: static calibration never reached it")
        elif not math.isfinite(a):
            out[id(t.module)] = (None, "dynamic: static calibration saw NaN or Inf inputs")
        elif not 1e-30 <= a / 127.0 <= 1e30:  # StaticInt8Linear's range
            out[id(t.module)] = (None, f"dynamic: static calibration saw max|x| = {a:.3g} (zero, or outside float32's range for a scale)")
        else:
            out[id(t.module)] = (a / 127.0, "")
    return out


def _convert_mha(model: nn.Module, config: QuantConfig) -> tuple[nn.Module, list[LayerConversion]]:
    """Replaces each nn.MultiheadAttention that can be (mha_float_reason) and is not skipped by an
    Int8MultiheadAttention, under every name it has; returns the model (itself replaced when it is
    one) and a report row per module. Skip patterns match the module's names or its out_proj's."""
    found: dict[int, tuple[nn.Module, list[str]]] = {}
    for fqn, mod in model.named_modules(remove_duplicate=False):
        if isinstance(mod, nn.MultiheadAttention):
            found.setdefault(id(mod), (mod, []))[1].append(fqn)
    rows, targets = [], []
    for mod, names in found.values():
        # the out_proj's names skip it too: the module converts whole or not at all
        why = (_WEIGHT_ONLY_FLOAT if config.activations == "none" else None) or mha_float_reason(mod) or config_reason(mod, names, mod.embed_dim, config.skip, config.filter_fn,
                                                     config.min_features, tuple(f"{n}.out_proj".lstrip(".") for n in names))  # fmt: skip
        if why:
            rows.append(LayerConversion(names[0], type(mod).__name__, "float", why))
            continue
        targets.append(Target(tuple(names), mod))
        detail = "in_proj and out_proj int8; attention: " + ("fastinfer kernel" if config.attention else "torch SDPA")
        if config.activations == "static":
            detail += "; per-token activation scales (static scales are built for linear layers only)"
        rows.append(LayerConversion(names[0], type(mod).__name__, "Int8MultiheadAttention", detail))
    if targets:
        model = swap(model, targets, lambda m: Int8MultiheadAttention.from_mha(m, fused_attention=bool(config.attention)),
                     config.progress, "fastinfer.quantize")  # fmt: skip
    return model, rows


def _to_int8(mod: nn.Module, activation: str | None = None, weight_only: bool = False,
             x_scale: float | None = None) -> nn.Module:  # fmt: skip
    """Int8Linear for a float linear layer; for a SparseLinear, the same quantization of its weights
    (zeros stay zero) stored in the int8 sparse format sparsify() would pick, or dense if none pays.
    weight_only: WeightOnlyInt8Linear instead; x_scale: StaticInt8Linear with that input scale
    (both dense: no sparse weight-only or static kernels).
    activation: fused after the layer (None or an epilogue name, see convert/patterns.py)."""
    cls = WeightOnlyInt8Linear if weight_only else (StaticInt8Linear if x_scale else Int8Linear)
    kw = {"x_scale": x_scale} if x_scale else {}
    if not isinstance(mod, SparseLinear):
        return cls.from_linear(mod, activation=activation, **kw)
    dense = cls(mod.in_features, mod.out_features, bias=mod.bias is not None, activation=activation, **kw)
    dense.set_weight(*quantize_weight_per_channel(mod.dense_weight()))
    if mod.bias is not None:
        dense.bias.copy_(mod.bias)
    dense.train(mod.training)
    return dense if weight_only or x_scale else sparse_int8_or_dense(dense)
