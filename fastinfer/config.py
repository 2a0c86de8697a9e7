"""What to convert: the configs of the conversion entry points. They say what, never how (the how
is in fastinfer/convert/ and fastinfer/plan/)."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import nn

__all__ = ["QuantConfig", "skip_patterns", "skipped"]


def skip_patterns(skip: object, what: str = "QuantConfig.skip") -> tuple[str | re.Pattern, ...]:
    """`skip` as a tuple of patterns (one pattern, or an iterable of them); TypeError names `what`."""
    if isinstance(skip, (str, re.Pattern)):
        skip = (skip,)
    if not isinstance(skip, Iterable):
        raise TypeError(f"{what} must be a pattern or a sequence of patterns, got {skip!r}")
    skip = tuple(skip)
    for p in skip:
        if not isinstance(p, (str, re.Pattern)):
            raise TypeError(f"{what} entries must be str or re.Pattern, got {p!r}")
    return skip


def skipped(patterns: tuple[str | re.Pattern, ...], fqn: str) -> bool:
    """Whether a pattern matches the qualified name `fqn` or a container above it ("encoder" skips
    "encoder.0.out"; fnmatch globs and regular expressions match whole names)."""
    parts = fqn.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    for p in patterns:
        for name in prefixes:
            if isinstance(p, re.Pattern) and p.fullmatch(name):
                return True
            if isinstance(p, str) and fnmatch.fnmatchcase(name, p):
                return True
    return False


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
    fuse_activations: fuse an activation that directly follows a converted linear layer into that
        layer's kernel (Int8Linear(activation=...)), replacing the activation module by
        fastinfer.nn.Fused: erf GELU ("gelu"), GELU's tanh form ("gelu_tanh": torch's
        approximate="tanh", transformers' gelu_new / gelu_fast / gelu_pytorch_tanh), SiLU, ReLU,
        ReLU6, Hardswish; where an nn.Sequential, a BERT-style block (`dense` +
        `intermediate_act_fn`), GPT-2's MLP or a LLaMA-style gated MLP (gate_proj + act_fn) shows
        the activation only post-processes the layer (fastinfer/convert/patterns.py). The fused
        activations are fp32 approximations (erf within 4e-7 of the exact one; the exp of SiLU and
        of the tanh GELU within a few ulp). False keeps every activation module as it is.
        Convs fuse ReLU / ReLU6 / SiLU / Hardswish the same way (a BatchNorm2d between them is
        folded into the conv whatever this says).
    rewrite_blocks: with fuse_activations, what a block's own forward does after its convs also moves
        into them where a module swap cannot express it: an activation module the block calls
        several times (ResNet's one ReLU), a functional relu, and the residual add of a ResNet or
        MobileNet block (conv -> add -> relu as conv(x, residual=identity) with relu fused: one
        pass). The block is traced with torch.fx and replaced by the fx GraphModule of its edited
        graph (same submodules and state_dict keys, its class name kept as the GraphModule's name;
        deepcopy and pickling keep it, fastinfer.save / load record and redo it). Not kept: the
        block's class itself (isinstance), its methods and other attributes. Only blocks whose
        trace is exact are rewritten: no hooks, no `with` in the forward, no `+=` on a tensor it
        does not own, a graph of submodule calls, adds and relus only, each fused conv called
        once in the whole model (fastinfer.convert.fuse.rewrite_residual_blocks). In transformers
        models it also puts BERT-style blocks on a shorter road (fastinfer.convert.hf_blocks): an
        output block (BertSelfOutput, BertOutput and their copies) passes its input to its int8
        dense layer as the residual, and an encoder layer (BertLayer and its copies) calls its
        parts' forward methods directly, skipping ~20 nn.Module calls per layer. These blocks keep
        their class (they become a subclass of it) and take their own forward wherever the short
        road could differ (training, hooks, caches, cross-attention, chunking, replaced parts,
        torch.compile); float32 outputs are bit-identical. False keeps every block's class and
        forward.
    depthwise: what depthwise convs (groups = in = out channels) become: "float" (the default)
        fastinfer.nn.DepthwiseConv2d, fp32 on fastinfer's fused NHWC kernel (memory-bound layers:
        int8 would only add a quantization pass, and fp32 keeps them exact); "int8" Int8Conv2d
        (one activation scale per sample).
    activations: how the linear layers treat their inputs. "dynamic" (the default): Int8Linear,
        activations quantized per token at run time (int8 x int8 products, the fast choice from a
        few rows up). "none": WeightOnlyInt8Linear, weight-only int8 (W8A32: int8 weights widened
        to fp32, the activations never quantized) for models whose activations have outliers, and
        for decoding at one to a few rows, where it streams the same int8 bytes at about the same
        speed. With "none" only linear layers convert: convolutions and nn.MultiheadAttention stay
        float (their weight-only kernels are not built; the report says so), and a SparseLinear
        becomes a dense WeightOnlyInt8Linear. "static": StaticInt8Linear, one activation scale
        per layer (max|x| / 127 over quantize(..., calibration_data=batches), one calibration pass)
        instead of a scale per token: one pass over x at run time instead of two, but values past
        the calibrated range saturate, and one scale for every token costs accuracy where tokens
        differ in range (fastinfer.optimize measures that per layer and keeps the dynamic layer
        where the static one loses too much). Static applies to linear layers; convolutions and
        nn.MultiheadAttention keep their per-sample / per-token scales, a layer calibration
        never reached (or saw only zeros, NaN or Inf) stays dynamic; the report says which.
    smoothquant: None, or SmoothQuant's alpha in [0, 1] (0.5 is the paper's default): before
        quantizing, each linear layer's input channels are divided by s_j = max|x_j|^alpha /
        max|W_j|^(1 - alpha) and its weight columns multiplied by it (exact in float), so
        activation outlier channels cost int8 per-token quantization less. max|x_j| comes from
        quantize(..., calibration_data=batches). The division is folded into the norm before the
        layer in pre-norm blocks (GPT-2, LLaMA-style decoder layers, TransformerEncoderLayer with
        norm_first=True: free at run time); elsewhere the layer scales its own input
        (Int8Linear.input_scale, one elementwise pass). Linear layers only (not convs or
        nn.MultiheadAttention); a smoothed layer stays dense under sparsify.
    attention: switch a transformers model that runs torch's SDPA (its default) to fastinfer's fused
        attention kernel (fastinfer.ops.attention: scores, mask, softmax and values in one pass
        per head, fp32 arithmetic). Calls that the kernel does not serve (autograd, dropout,
        output_attentions, GPUs, CPUs without AVX-512) take torch's SDPA as before. False keeps
        the model's attention as it is. "bf16": the same, with fp32 q, k, v rounded to bf16 for the
        kernel's two products (bf16 inputs always are): on CPUs with AVX512_BF16 1.3-1.6x the fp32
        kernel here, with bf16's error in the attention output (~4e-3 on values ~N(0, 1));
        transformers models only (nn.MultiheadAttention keeps fp32 arithmetic). Other models are
        not touched either way. fastinfer.optimize plans the attention when it is True (the
        default: the kernel, its bf16 arithmetic or SDPA, the fastest within the accuracy
        allowance) and keeps what is asked for otherwise: "fp32" (the kernel in fp32, as True in
        quantize()), "bf16" or False.
    layernorm: every nn.LayerNorm (the class itself: a subclass may have its own forward) becomes
        fastinfer.nn.LayerNorm, the same module on fastinfer's kernel (fp32 arithmetic, one
        summation order on every ISA; 1.3-2x torch's own here). Calls it does not serve
        (autograd, GPUs, CPUs without AVX-512) take torch's layer_norm. False keeps torch's.
    conv_handoff: in an fp32 model, a converted conv whose output goes to the next converted conv
        alone (through activations or fused modules, none of them hooked; known from a torch.fx
        trace of the converted model: without one nothing is linked), with a depthwise conv at one
        end of the link and an int8 conv at the other (MobileNet's and EfficientNet's expand ->
        depthwise -> project: the model's largest tensors), hands it over in bf16, half the bytes of
        fp32 (the int8 conv quantizes it anyway; the depthwise conv runs its fp32 arithmetic on it);
        the chain's last conv returns float32 and follows casts of the model. ~0.87x of
        MobileNetV2's time at batch 16, output SQNR within 0.1 dB. The report names each link. What
        the trace cannot see stays unknown: an output the model also stores in an attribute or
        returns from another method is bf16 there. False keeps every output in its input's dtype.
        "u8": the same links, and where the conv handing over fuses relu6 (MobileNetV2's and
        EfficientNet-Lite's expand and depthwise convs) with nothing but fused identities between,
        it hands uint8 over instead: relu6's range [0, 6] in 254 steps (byte 255 is NaN), a quarter
        of fp32's bytes, which the next int8 conv sums as they are (no quantization pass) and the
        depthwise conv reads in fp32. ~0.8x of the bf16 handoff's time on MobileNetV2 at batch 16,
        for ~2 dB of output SQNR (32.5 -> 30.7 dB at 224 x 224, 25.1 -> 22.3 dB at 64 x 64, random
        weights); fastinfer.optimize takes it where the model's SQNR allows. True is "bf16". Only a
        link's receiving conv takes uint8 (any other refuses it: a raw uint8 image is not this
        code); a conv handing uint8 over hands bf16 instead under autograd or while it has a
        forward hook. Calling part of a linked chain directly returns its bytes
        (fastinfer.ops.conv.dequantize_u8 gives their values).

    A layer registered under several names is converted under all of them (it stays one layer), or
    left in float when skip or filter_fn keeps any of its names: prune and sparsify agree.
    """

    skip: tuple[str | re.Pattern, ...] = ()
    filter_fn: Callable[[nn.Module, str], bool] | None = None
    min_features: int = 1
    progress: bool | None = None
    fuse_activations: bool = True
    rewrite_blocks: bool = True
    depthwise: str = "float"
    attention: bool | str = True
    layernorm: bool = True
    conv_handoff: bool | str = True
    activations: str = "dynamic"
    smoothquant: float | None = None

    def __post_init__(self) -> None:
        if self.activations not in ("dynamic", "static", "none"):
            raise ValueError(f"QuantConfig.activations must be 'dynamic', 'static' or 'none', got {self.activations!r}")
        if self.smoothquant is not None:
            a = self.smoothquant
            if not isinstance(a, (int, float)) or isinstance(a, bool) or not 0.0 <= a <= 1.0:
                raise ValueError(f"QuantConfig.smoothquant must be None or an alpha in [0, 1], got {a!r}")
            if self.activations == "none":
                raise ValueError("QuantConfig.smoothquant smooths int8 activations: it needs activations='dynamic' or 'static'")
        if self.depthwise not in ("float", "int8"):
            raise ValueError(f"QuantConfig.depthwise must be 'float' or 'int8', got {self.depthwise!r}")
        object.__setattr__(self, "skip", skip_patterns(self.skip))
        if not (isinstance(self.attention, bool) or self.attention in ("bf16", "fp32")):
            raise TypeError(f"QuantConfig.attention must be True, False, 'fp32' or 'bf16', got {self.attention!r}")
        if not isinstance(self.layernorm, bool):
            raise TypeError(f"QuantConfig.layernorm must be a bool, got {self.layernorm!r}")
        if not (isinstance(self.conv_handoff, bool) or self.conv_handoff in ("bf16", "u8")):
            raise TypeError(f"QuantConfig.conv_handoff must be True, False, 'bf16' or 'u8', got {self.conv_handoff!r}")
        if not isinstance(self.fuse_activations, bool):
            raise TypeError(f"QuantConfig.fuse_activations must be a bool, got {self.fuse_activations!r}")
        if not isinstance(self.rewrite_blocks, bool):
            raise TypeError(f"QuantConfig.rewrite_blocks must be a bool, got {self.rewrite_blocks!r}")
        if not isinstance(self.min_features, int) or self.min_features < 1:
            raise ValueError(f"QuantConfig.min_features must be an int >= 1, got {self.min_features!r}")

    def skips(self, fqn: str) -> bool:
        return skipped(self.skip, fqn)
