"""fastinfer.optimize: the per-layer planner.

quantize() decides by rule (every linear layer int8, depthwise convs fp32, sparse formats by
density thresholds). optimize() decides by measurement: it converts the model as quantize() does
(same fusions, BatchNorm folding), then for each converted layer builds every candidate that can
run it -- float (the original modules, fusions undone), int8 dynamic, int8 static (input scale
calibrated on the same data), int8 weight-only, the sparse
format its zeros allow, fp32 depthwise -- times each at the input shape the layer really gets
from `example_inputs` on this machine (interleaved rounds, median), measures each one's output
SQNR against float on `calibration_data` (or the example inputs), and keeps the fastest that meets
`min_sqnr_db`. Timings are cached per (candidate, shapes, ISA, threads), so layers of the same
shape (the 12 blocks of a BERT) are timed once. A transformers model's attention is then chosen
the same way, whole: fastinfer's kernel, its bf16 arithmetic or torch's SDPA.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from fastinfer import _runtime
from fastinfer.config import QuantConfig
from fastinfer.convert._select import progress_bar
from fastinfer.convert._swap import set_module
from fastinfer.convert.calibrate import batches_of, input_absmax, run_batch
from fastinfer.convert.report import LayerConversion
from fastinfer.nn import (
    DepthwiseConv2d,
    Fused,
    Int8Conv1d,
    Int8Conv2d,
    Int8Linear,
    SparseInt8Linear,
    SparseLinear,
    StaticInt8Linear,
    WeightOnlyInt8Linear,
    linear_weight_and_bias,
)
from fastinfer.ops.conv import is_depthwise
from fastinfer.plan.report import AttentionPlan, HandoffPlan, LayerPlan, PlanReport, attach_plan, describe
from fastinfer.plan.rules import choose_format

__all__ = ["optimize"]

# (candidate signature, input shape, dtype, ISA, threads) -> us per call, for this process
_TIMINGS: dict[tuple, float] = {}
# Candidates this close to the fastest (relative) count as equally fast; the most accurate is kept.
_TIE = 0.05
# The whole model with the planned layers must not be slower than with quantize()'s by more than this.
_MODEL_TIE = 0.02
# The planned model's output SQNR against float may fall this far below quantize()'s (dB).
_MODEL_SQNR_DROP = 1.0
# Inputs kept at once while timing (a CNN at batch 16 has ~100 MB activations per layer).
_CAPTURE_BYTES = 512 << 20


@dataclass
class _Candidate:
    name: str  # "float", "int8 dynamic", "int8 static", "int8 weight-only", "int8 2:4", "fp32 ell", "fp32 depthwise"
    module: nn.Module  # what goes in the layer's place
    restore: bool  # the fused modules come back (the candidate does not run them itself)
    run: Callable[[torch.Tensor], torch.Tensor]  # the layer plus what it fused, as the model runs it
    sig: tuple  # what its time depends on, besides the input


@dataclass
class _Layer:
    name: str
    layer: nn.Module  # quantize()'s module
    slots: list[tuple[str, nn.Module]]  # (qualified name, original module) of each Fused into it
    candidates: list[_Candidate]
    note: str = ""
    x: torch.Tensor | None = None  # the first input from the example run, until timed
    input: str = ""  # its shape and dtype
    times: dict[str, float] | None = None  # candidate -> us per call
    signal: float = 0.0  # sum of squares of the float output over the SQNR data
    noise: dict[str, float] | None = None  # candidate -> sum of squared errors against float


def _add_words(root: nn.Module, rows, words: dict[str, str]) -> None:
    """Appends words[name] to the conversion report's row and the plan's row of each layer name."""
    if "_fastinfer_report" in root.__dict__:
        root.__dict__["_fastinfer_report"].add_details(words)
    for r in rows:
        if r.name in words:
            r.note = "; ".join(filter(None, (r.note, words[r.name])))


def optimize(
    model: nn.Module,
    example_inputs,
    *,
    quantize: bool = True,
    prune: float | Mapping | None = None,
    calibration_data: Iterable | None = None,
    min_sqnr_db: float = 25.0,
    max_model_sqnr_drop_db: float | None = _MODEL_SQNR_DROP,
    time_budget_s: float | None = 300.0,
    config: QuantConfig | None = None,
    rounds: int = 5,
    progress: bool | None = None,
) -> tuple[nn.Module, PlanReport]:
    """Converts `model` layer by layer to whatever runs each layer fastest on this machine within
    the accuracy budget; returns (the new model, its PlanReport). The model passed in is not modified.

    example_inputs: one batch as the model will be served (a tensor, a tuple/list of positional
        arguments or a dict of keyword arguments): the layers are timed at the shapes it gives them.
    quantize: False keeps every layer's weights float (candidates: float, fp32 sparse formats,
        fp32 depthwise).
    prune: a sparsity (float, magnitude pruning, unstructured) or a dict of fastinfer.prune
        arguments ({"sparsity": 0.5, "pattern": "2:4", "method": "wanda"}; wanda uses
        calibration_data) applied first: the float reference is then the pruned model.
    calibration_data: batches (as fastinfer.prune takes them) on which each candidate's output SQNR
        is measured against float; default: example_inputs.
    min_sqnr_db: a candidate qualifies when its output SQNR on that data, against the float layer
        on the same inputs, is at least this (float always qualifies). Of the qualifying ones the
        fastest is kept; those within 5% of it count as tied and the most accurate of them wins.
        The default, 25 dB, lets through what int8 dynamic gives on ordinary layers (27-45 dB on
        the real all-MiniLM-L6-v2, where the end-to-end embedding cosine is 0.998) and catches a
        layer whose activations have outliers that per-token int8 cannot hold; 30 dB there sends
        the four FFN input layers at 27 dB to weight-only, 1.3x slower end to end for a cosine
        that moves from 0.9978 to 0.9979 (bench/RESULTS.md).
    max_model_sqnr_drop_db: the whole model is checked too. Where some layers took a candidate
        less accurate than quantize()'s (int8 static, typically), the model's output SQNR against
        float is measured on the SQNR data with the plan and with quantize()'s layers; if the plan's
        is lower by more than this, those layers go back to quantize()'s choice (their rows say so;
        report.model_sqnr_db gives both figures). Layer budgets alone let errors add up: on the real
        all-MiniLM-L6-v2 at 8x128, 26 static layers each above 25 dB took the embedding cosine
        from 0.9978 to 0.9968. None: no whole-model check of accuracy. Not with quantize=False.
    time_budget_s: layers left when it is spent keep quantize()'s choice (float with
        quantize=False), unmeasured (the report says so); None: no limit.
    config: the QuantConfig of the conversion (skip, filter_fn, fusions, attention, smoothquant
        (calibrated on calibration_data, else example_inputs)...); `activations` is ignored:
        dynamic, static (scales from calibration_data, else example_inputs) and weight-only are
        all candidates.
    rounds: interleaved timing rounds per layer (medians are compared), and of the whole-model check.

    The layers are timed alone, where their inputs and weights stay in cache; inside the model they
    may not. So the result is checked whole: example_inputs run through the model with quantize()'s
    layers (all float with quantize=False) and with the planned ones, rounds interleaved; where the
    planned model is more than 2% slower, that baseline is kept (the rows' notes say so) and
    report.model_ms gives both times.

    quantize=False also keeps float what is never planned (nn.MultiheadAttention, a layer
    registered under several names). The model must be a float CPU model (a converted one is
    refused: its layers would be taken for their own float reference).

    Layers planned: linear layers (nn.Linear, transformers Conv1D), Conv2d and Conv1d.
    nn.MultiheadAttention follows quantize() unmeasured. A transformers model's attention (with
    config.attention=True, the default) is planned whole after the layers: the model is timed on
    the example with fastinfer's kernel, with torch's SDPA, and (with quantize=True and
    max_model_sqnr_drop_db set, on an fp32 model where the CPU has AVX512_BF16) with the kernel's bf16
    arithmetic, which qualifies only if the model's output SQNR vs float stays within
    max_model_sqnr_drop_db of the fp32 kernel's. The fastest qualifying one is set (within 2%, an
    fp32 one); report.attention says what was measured.
    Chained convs (QuantConfig.conv_handoff=True, quantize=True) are linked after the layers are
    chosen; where some links could hand relu6 outputs over as uint8 (conv_handoff="u8"), the model
    is timed on the example with bf16 and with uint8 links, and uint8 is kept only when more than
    2% faster and when the output SQNR vs float stays within max_model_sqnr_drop_db of bf16's (a
    separate allowance from the layers' check, whose report.model_sqnr_db is measured before any
    link); report.handoff says what was measured. conv_handoff="u8" / "bf16" / False is kept as
    asked.
    fastinfer.report(model) prints the plan: kernel per layer, SQNR, us per call vs float.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize expects an nn.Module, got {type(model).__name__}")
    if not isinstance(min_sqnr_db, (int, float)) or isinstance(min_sqnr_db, bool) or math.isnan(min_sqnr_db):
        raise ValueError(f"min_sqnr_db must be a number, got {min_sqnr_db!r}")
    if time_budget_s is not None and not (isinstance(time_budget_s, (int, float)) and time_budget_s >= 0):
        raise ValueError(f"time_budget_s must be None or a number >= 0, got {time_budget_s!r}")
    if max_model_sqnr_drop_db is not None and not (
            isinstance(max_model_sqnr_drop_db, (int, float)) and not isinstance(max_model_sqnr_drop_db, bool)
            and max_model_sqnr_drop_db >= 0):  # fmt: skip
        raise ValueError(f"max_model_sqnr_drop_db must be None or a number >= 0, got {max_model_sqnr_drop_db!r}")
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    config = QuantConfig() if config is None else config
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a fastinfer.QuantConfig, got {type(config).__name__}")
    import dataclasses

    from fastinfer.convert import prune as prune_model
    from fastinfer.convert import quantize as quantize_model
    from fastinfer.convert._select import scan
    from fastinfer.convert.quantize import handoff_applies, mark_conv_handoff, rewrite_blocks, smooth_linear_targets

    start = time.monotonic()
    _check_float_cpu_model(model)
    if calibration_data is not None:  # read up to three times (wanda, SmoothQuant, SQNR): a generator once
        calibration_data = list(batches_of(calibration_data))
        if not calibration_data:
            raise ValueError("optimize: calibration_data yielded no batches")
    reference = model
    if prune is not None:
        kwargs = {"sparsity": prune} if isinstance(prune, (int, float)) and not isinstance(prune, bool) else prune
        if not isinstance(kwargs, Mapping):
            raise TypeError(f"prune must be a sparsity or a dict of fastinfer.prune arguments, got {prune!r}")
        kwargs = dict(kwargs)
        if kwargs.get("method") == "wanda" and "calibration_data" not in kwargs:
            kwargs["calibration_data"] = calibration_data if calibration_data is not None else [example_inputs]
        reference = prune_model(model, **kwargs)
    # the float reference: the candidates' float modules come from it (the caller's model is never
    # touched, not even its train/eval mode)
    reference = (copy.deepcopy(reference) if reference is model else reference).eval()
    quiet = progress if progress is not None else config.progress
    # bf16 between chained convs is decided once the layers are chosen (a float candidate between two
    # convs breaks a chain)
    # so are the blocks' rewrites (a conv left float there keeps its call as it is)
    cfg = dataclasses.replace(config, activations="dynamic", progress=quiet, smoothquant=None, conv_handoff=False,
                              rewrite_blocks=False)
    if not quantize:  # what the planner does not plan must not become int8 either
        cfg = dataclasses.replace(cfg, filter_fn=_unplanned_stay_float(reference, config.filter_fn))
    floats = {}  # layer name -> the float module its "float" candidate is (default: reference's)
    smoothing: dict[str, tuple[str, torch.Tensor | None]] = {}
    source = reference
    if config.smoothquant is not None and quantize:
        # smooth a float copy first: its folded norms and scaled weights are what both the int8
        # layers and the float candidates of those layers are built from
        source = copy.deepcopy(reference)
        targets, _ = scan(source, (SparseLinear,), convs=True, skip=config.skip, filter_fn=config.filter_fn,
                          min_features=config.min_features)  # fmt: skip
        done = smooth_linear_targets(source, targets, float(config.smoothquant),
                                     calibration_data if calibration_data is not None else [example_inputs])  # fmt: skip
        smoothing = {t.name: done[id(t.module)] for t in targets if id(t.module) in done}
        floats = {n: reference.get_submodule(n) for n, (_, inv) in smoothing.items() if inv is not None}
    qm = quantize_model(source, cfg)
    qm.eval()
    _apply_smoothing(qm, smoothing)

    x_scales = _static_scales(qm, calibration_data if calibration_data is not None else [example_inputs]) if quantize else {}
    layers = _plan_layers(qm, source, floats, quantize, x_scales)
    kept = "quantize()'s choice kept" if quantize else "float kept"
    # timing inputs, layer by layer in chunks that fit _CAPTURE_BYTES; SQNR on the same pass when no
    # calibration data is given
    shapes = _input_sizes(qm, layers, example_inputs)
    with progress_bar(len(layers), progress if progress is not None else len(layers) >= 10, "fastinfer.optimize") as bar:
        chunk: list[_Layer] = []
        budget = 0
        todo = [lay for lay in layers if lay.name in shapes]
        for lay in layers:
            if lay.name not in shapes:
                lay.note = f"not called by example_inputs: {kept}, unmeasured"
        for i, lay in enumerate(todo):
            chunk.append(lay)
            budget += shapes[lay.name]
            if budget >= _CAPTURE_BYTES or i == len(todo) - 1:
                _capture(qm, chunk, example_inputs, sqnr=calibration_data is None)
                for c in chunk:
                    if time_budget_s is not None and time.monotonic() - start > time_budget_s:
                        c.note = f"time_budget_s spent: {kept}, unmeasured"
                        c.x = None
                    else:
                        _time_layer(c, rounds)
                    bar.update(1)
                chunk, budget = [], 0
    if calibration_data is not None:
        _capture(qm, [lay for lay in layers if lay.name in shapes], calibration_data, sqnr=True, keep=False)
    choices = _choose(layers, min_sqnr_db, quantize)
    fallback = {lay.name: (_fallback(lay, quantize), "") for lay in layers}
    base = "quantize" if quantize else "float"
    model_sqnr = None
    if quantize and max_model_sqnr_drop_db is not None:
        choices, model_sqnr = _fidelity_check(qm, layers, choices, fallback, reference, float(max_model_sqnr_drop_db),
                                              calibration_data if calibration_data is not None else [example_inputs])  # fmt: skip
    planned, baseline = _swaps(qm, layers, choices), _swaps(qm, layers, fallback)
    model_ms, reverted, use = None, "", planned
    if any(choices[n][0] is not fallback[n][0] for n in choices):
        # the layers were timed alone: check the whole model against the baseline (quantize()'s
        # layers, or all float with quantize=False) and keep the baseline if it is faster
        model_ms = _model_check(qm, {base: baseline, "optimize": planned}, example_inputs, rounds)
        if model_ms["optimize"] > model_ms[base] * (1 + _MODEL_TIE):
            use = baseline
            reverted = (f"reverted: the whole model ran {model_ms[base]:.3g} ms with "
                        f"{'quantize()' if quantize else 'float'}'s layers, {model_ms['optimize']:.3g} ms with the planned ones")  # fmt: skip
    root = _apply(qm, use, True)
    if root is not qm and "_fastinfer_report" in qm.__dict__:  # the model was the layer itself
        root.__dict__["_fastinfer_report"] = qm.__dict__["_fastinfer_report"]
    used = choices if not reverted else {
        n: (fallback[n][0], reverted if choices[n][0] is not fallback[n][0] else choices[n][1]) for n in choices}
    rows = _rows(root, layers, used)
    if quantize and config.fuse_activations and config.rewrite_blocks:
        words, blocks = rewrite_blocks(root)
        _add_words(root, rows, words)
        if "_fastinfer_report" in root.__dict__:
            root.__dict__["_fastinfer_report"].blocks = blocks
    # bf16 between chained convs, once the layers are chosen: with quantize=False the model keeps
    # float arithmetic, which the handoff's rounding (never measured here) would not
    handoff = None
    conv_dtypes = {m.weight.dtype for m in reference.modules() if isinstance(m, nn.Conv2d)}
    planned_handoff = config.conv_handoff is True and max_model_sqnr_drop_db is not None and (
        time_budget_s is None or time.monotonic() - start <= time_budget_s)  # fmt: skip
    if quantize and handoff_applies("u8" if planned_handoff else config.conv_handoff, conv_dtypes):
        end = next(iter(conv_dtypes))
        if planned_handoff:
            handoff = _plan_handoff(root, reference, example_inputs,
                                    calibration_data if calibration_data is not None else [example_inputs], rounds,
                                    float(max_model_sqnr_drop_db), end)  # fmt: skip
            words = handoff.words if handoff is not None else {}
        else:
            words = mark_conv_handoff(root, u8=config.conv_handoff == "u8", end=end)
        _add_words(root, rows, words)
    attention = None
    if config.attention is True and (time_budget_s is None or time.monotonic() - start <= time_budget_s):
        bf16_ok = quantize and max_model_sqnr_drop_db is not None
        attention = _plan_attention(root, reference, example_inputs,
                                    calibration_data if calibration_data is not None else [example_inputs], rounds,
                                    float(max_model_sqnr_drop_db) if bf16_ok else None)  # fmt: skip
    plan = PlanReport(rows, measured=True, model_ms=model_ms, model_sqnr_db=model_sqnr, attention=attention,
                      handoff=handoff)  # fmt: skip
    attach_plan(root, plan)
    from fastinfer.plan.report import report

    return root, report(root)


def _check_float_cpu_model(model: nn.Module) -> None:
    """optimize converts a float CPU model: a converted layer in it would be taken for its own float
    reference, and the candidates are timed on the CPU kernels."""
    from fastinfer.nn import Int8MultiheadAttention

    kinds = (Int8Linear, SparseInt8Linear, Int8Conv2d, DepthwiseConv2d, Int8Conv1d, Int8MultiheadAttention)
    for name, mod in model.named_modules():
        if isinstance(mod, kinds):
            raise ValueError(f"optimize takes the float model (it converts it itself); {name or '<model>'!r} is "
                             f"already a {type(mod).__name__}")  # fmt: skip
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        if t.device.type != "cpu":
            raise ValueError(f"optimize measures the CPU kernels: move the model to the CPU first ({name!r} is on {t.device})")


def _unplanned_stay_float(reference: nn.Module, user_filter):
    """quantize()'s filter_fn for optimize(quantize=False): what the planner never plans (shared layers,
    nn.MultiheadAttention) stays float."""
    names: dict[int, list[str]] = {}
    for name, mod in reference.named_modules(remove_duplicate=False):
        names.setdefault(id(mod), []).append(name)
    shared = {n for group in names.values() if len(group) > 1 for n in group}  # by name: quantize() works on a copy

    def keep(mod: nn.Module, name: str) -> bool:
        if isinstance(mod, nn.MultiheadAttention) or name in shared:
            return False
        return user_filter(mod, name) if user_filter is not None else True

    return keep


def _apply_smoothing(qm: nn.Module, smoothing: dict) -> None:
    """The input scales of the layers SmoothQuant could not fold, and the report's words for it."""
    rep = qm.__dict__.get("_fastinfer_report")
    index = {r.name: i for i, r in enumerate(rep)} if rep is not None else {}
    for name, (how, inv) in smoothing.items():
        layer = qm.get_submodule(name)
        if inv is not None and isinstance(layer, Int8Linear):
            layer.input_scale = inv
        if name in index:
            old = rep[index[name]]
            rep[index[name]] = LayerConversion(old.name, old.kind, old.result, "; ".join(filter(None, (old.detail, how))))


# ----------------------------------------------------------------------------------- candidates


def _static_scales(qm: nn.Module, data) -> dict[str, float]:
    """The "int8 static" candidates' input scales: max|x| / 127 over data of what each linear layer
    quantize() converted gets in qm (x times the layer's SmoothQuant input scale where it has one:
    what it quantizes). A layer data never reached, or that saw only zeros, NaN or Inf, has none."""
    layers = {n: m for n, m in qm.named_modules() if isinstance(m, (Int8Linear, SparseInt8Linear))}
    scales = {n: m.input_scale for n, m in layers.items() if getattr(m, "input_scale", None) is not None}
    amax = input_absmax(qm, layers, data, scales, progress=False)
    return {n: a / 127.0 for n, a in amax.items() if 1e-30 <= a / 127.0 <= 1e30}  # StaticInt8Linear's range (NaN fails)


def _plan_layers(qm: nn.Module, source: nn.Module, floats: dict[str, nn.Module], quantize: bool,
                 x_scales: dict[str, float] | None = None) -> list[_Layer]:  # fmt: skip
    """The layers quantize() converted, each with its candidates; fused modules looked up by the
    Fused markers quantize() left (`into` names the layer), in the order the layer's forward runs
    them (a BatchNorm before an activation: the only fusions quantize() makes are conv -> bn ->
    act and linear -> act). The float candidate is source's module, or floats[name]."""
    fused: dict[str, list[tuple[str, nn.Module]]] = {}
    for name, mod in qm.named_modules():
        if isinstance(mod, Fused):
            fused.setdefault(mod.into, []).append((name, source.get_submodule(name)))
    for slots in fused.values():
        slots.sort(key=lambda slot: 0 if isinstance(slot[1], nn.modules.batchnorm._BatchNorm) else 1)
    names: dict[int, list[str]] = {}
    for name, mod in qm.named_modules(remove_duplicate=False):
        names.setdefault(id(mod), []).append(name)
    out = []
    for name, mod in qm.named_modules():
        if not isinstance(mod, (Int8Linear, SparseInt8Linear, Int8Conv2d, DepthwiseConv2d, Int8Conv1d)):
            continue
        if any(_inside(name, lay.name) for lay in out if isinstance(lay.layer, Int8Conv1d)):
            continue  # the Int8Conv2d inside an Int8Conv1d
        if len(names[id(mod)]) > 1 or name.endswith(("in_proj", "out_proj")) and _in_mha(qm, name):
            continue  # shared layers and MultiheadAttention's projections: quantize()'s choice
        slots = fused.get(name, [])
        original = floats.get(name) or source.get_submodule(name)
        lay = _Layer(name, mod, slots, [])
        lay.candidates = [c for c in _candidates(mod, original, slots, (x_scales or {}).get(name))
                          if quantize or not c.name.startswith("int8")]  # fmt: skip
        out.append(lay)
    return out


def _inside(name: str, container: str) -> bool:
    """Whether the module named `name` sits below the one named `container` ("" is the root)."""
    return name != container and (container == "" or name.startswith(container + "."))


def _in_mha(qm: nn.Module, name: str) -> bool:
    from fastinfer.nn import Int8MultiheadAttention

    parent = name.rpartition(".")[0]
    return isinstance(qm.get_submodule(parent), Int8MultiheadAttention)


def _chain(*mods: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x):
        for m in mods:
            x = m(x)
        return x

    return run


def _sig(name: str, mod: nn.Module, extra=()) -> tuple:
    d = describe(mod)
    return (name, type(mod).__name__, d[0], d[1], round(d[2], 2), getattr(mod, "activation", None), *extra)


def _candidates(mod: nn.Module, original: nn.Module, slots: list[tuple[str, nn.Module]],
                x_scale: float | None = None) -> list[_Candidate]:  # fmt: skip
    after = [m for _, m in slots]
    float_run = _chain(original, *after)
    flt = _Candidate("float", original, True, float_run, _sig("float", original, tuple(type(m).__name__ for m in after)))
    act = getattr(mod, "activation", None)
    bn = next((m for m in after if isinstance(m, nn.BatchNorm2d)), None)
    cands = [flt]
    if isinstance(mod, (Int8Linear, SparseInt8Linear)):
        dense = mod.to_int8linear() if isinstance(mod, SparseInt8Linear) else mod
        cands.append(_Candidate("int8 dynamic", dense, False, dense, _sig("int8 dynamic", dense)))
        if x_scale is not None:
            st = StaticInt8Linear.from_int8linear(dense, x_scale)
            cands.append(_Candidate("int8 static", st, False, st, _sig("int8 static", st)))
        fmt = choose_format(dense.weight_int8) if dense.input_scale is None else None  # sparse layers: no input_scale
        if fmt is not None:
            sp = mod if isinstance(mod, SparseInt8Linear) and mod.format == fmt else SparseInt8Linear.from_int8linear(dense, fmt)
            cands.append(_Candidate(f"int8 {fmt}", sp, False, sp, _sig(f"int8 {fmt}", sp)))
        wo = WeightOnlyInt8Linear(dense.in_features, dense.out_features, bias=dense.bias is not None, activation=act)
        wo.set_weight(dense.weight_int8, dense.weight_scale.clone())
        if dense.bias is not None:
            wo.bias.copy_(dense.bias)
        if dense.input_scale is not None:
            wo.input_scale = dense.input_scale.clone()
        cands.append(_Candidate("int8 weight-only", wo, False, wo, _sig("int8 weight-only", wo)))
        weight, _ = linear_weight_and_bias(original)
        if weight is not None:
            ffmt = choose_format(weight.detach().float())
            if ffmt is not None:
                sl = SparseLinear.from_linear(original, ffmt)
                cands.append(_Candidate(f"fp32 {ffmt}", sl, True, _chain(sl, *after), _sig(f"fp32 {ffmt}", sl)))
    elif isinstance(mod, (Int8Conv2d, DepthwiseConv2d)):
        depthwise = is_depthwise(original.in_channels, original.out_channels, original.groups)
        i8 = mod if isinstance(mod, Int8Conv2d) else Int8Conv2d.from_conv(original, bn=bn, activation=act)
        cands.append(_Candidate("int8 conv", i8, False, i8, _sig("int8 conv", i8)))
        if depthwise:
            dw = mod if isinstance(mod, DepthwiseConv2d) else DepthwiseConv2d.from_conv(original, bn=bn, activation=act)
            cands.append(_Candidate("fp32 depthwise", dw, False, dw, _sig("fp32 depthwise", dw)))
    elif isinstance(mod, Int8Conv1d):
        cands.append(_Candidate("int8 conv", mod, False, mod, _sig("int8 conv", mod)))
    for c in cands:
        c.module.eval()
    return cands


# ----------------------------------------------------------------------------------- measuring


def _first_input(args: tuple, kwargs: dict):
    x = args[0] if args else next(iter(kwargs.values()), None)
    return x if isinstance(x, torch.Tensor) else None


def _input_sizes(qm: nn.Module, layers: list[_Layer], example_inputs) -> dict[str, int]:
    """Bytes of each layer's first input in one run of example_inputs (layers not called are absent)."""
    sizes: dict[str, int] = {}

    def hook_for(name):
        def hook(mod, args, kwargs):
            x = _first_input(args, kwargs)
            if x is not None and name not in sizes:
                sizes[name] = x.numel() * x.element_size()

        return hook

    handles = [lay.layer.register_forward_pre_hook(hook_for(lay.name), with_kwargs=True) for lay in layers]
    try:
        with torch.inference_mode():
            run_batch(qm, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return sizes


def _sqnr_update(lay: _Layer, x: torch.Tensor) -> None:
    ref = lay.candidates[0].run(x).double()
    lay.signal += float(ref.square().sum())
    if lay.noise is None:
        lay.noise = {c.name: 0.0 for c in lay.candidates[1:]}
    for c in lay.candidates[1:]:
        lay.noise[c.name] += float((c.run(x).double() - ref).square().sum())


def _capture(qm: nn.Module, layers: list[_Layer], data, *, sqnr: bool, keep: bool = True) -> None:
    """Runs data (one batch for the example inputs, batches for calibration) through qm with a hook
    on each layer: keeps its first input (keep), and adds each candidate's squared error against
    float on every input it gets (sqnr)."""

    busy = []  # the candidates called from a hook include the hooked layer itself: no re-entry

    def hook_for(lay: _Layer):
        def hook(mod, args, kwargs):
            x = _first_input(args, kwargs)
            if x is None or busy:
                return
            if keep and lay.x is None:
                lay.x = x.clone()
            if sqnr:
                busy.append(lay)
                try:
                    _sqnr_update(lay, x)
                finally:
                    busy.pop()

        return hook

    handles = [lay.layer.register_forward_pre_hook(hook_for(lay), with_kwargs=True) for lay in layers]
    try:
        with torch.inference_mode():
            for batch in batches_of(data) if not keep else [data]:
                run_batch(qm, batch)
    finally:
        for h in handles:
            h.remove()


def _time_layer(lay: _Layer, rounds: int, target_s: float = 0.003) -> None:
    """us per call of each candidate on lay.x, interleaved rounds, medians; cached."""
    x = lay.x
    key_tail = (tuple(x.shape), x.dtype, _runtime.active_isa(), _runtime.num_threads(), torch.get_num_threads())
    todo = [c for c in lay.candidates if (c.sig, *key_tail) not in _TIMINGS]
    if todo:
        with torch.inference_mode():
            reps = {}
            for c in todo:
                c.run(x)  # warm: packs, prepared calls, allocator
                t0 = time.perf_counter()
                c.run(x)
                reps[c.name] = max(1, min(1000, int(target_s / max(time.perf_counter() - t0, 1e-7))))
            samples: dict[str, list[float]] = {c.name: [] for c in todo}
            for _ in range(rounds):
                for c in todo:
                    t0 = time.perf_counter()
                    for _ in range(reps[c.name]):
                        c.run(x)
                    samples[c.name].append((time.perf_counter() - t0) / reps[c.name])
        for c in todo:
            _TIMINGS[(c.sig, *key_tail)] = statistics.median(samples[c.name]) * 1e6
    lay.x = None  # the input is not needed any more
    lay.times = {c.name: _TIMINGS[(c.sig, *key_tail)] for c in lay.candidates}
    lay.input = f"{'x'.join(map(str, x.shape))} {str(x.dtype).removeprefix('torch.')}"


# ----------------------------------------------------------------------------------- deciding


def _sqnr_of(lay: _Layer) -> dict[str, float]:
    out = {"float": math.inf}
    for name, noise in (lay.noise or {}).items():
        if noise == 0:
            out[name] = math.inf
        elif lay.signal == 0 or not math.isfinite(noise):
            out[name] = -math.inf
        else:
            out[name] = 10 * math.log10(lay.signal / noise)
    return out


def _fallback(lay: _Layer, quantize: bool) -> _Candidate:
    """What a layer keeps when nothing decides otherwise: quantize()'s module, or float."""
    if not quantize:
        return lay.candidates[0]
    return next((c for c in lay.candidates if c.module is lay.layer), lay.candidates[0])


def _choose(layers: list[_Layer], min_sqnr_db: float, quantize: bool = True) -> dict[str, tuple[_Candidate, str]]:
    """layer name -> (the candidate kept, a note): the fastest whose SQNR reaches min_sqnr_db."""
    out = {}
    kept = "quantize()'s choice kept" if quantize else "float kept"
    for lay in layers:
        sqnr, times = _sqnr_of(lay), lay.times
        if times is None:
            out[lay.name] = (_fallback(lay, quantize), lay.note)
            continue
        if lay.noise is None and len(lay.candidates) > 1:  # timed, but the SQNR data never reached it
            out[lay.name] = (_fallback(lay, quantize), f"not reached by the SQNR data: {kept}, SQNR unmeasured")
            continue
        ok = [c for c in lay.candidates if sqnr.get(c.name, -math.inf) >= min_sqnr_db]
        best = min(times[c.name] for c in ok)
        # within _TIE of the fastest is noise on a shared machine: the more accurate one
        chosen = max((c for c in ok if times[c.name] <= best * (1 + _TIE)), key=lambda c: sqnr[c.name])
        note = "" if chosen is not lay.candidates[0] else "float: " + (
            "fastest" if len(ok) == len(lay.candidates) else f"the others below {min_sqnr_db:g} dB or slower")
        out[lay.name] = (chosen, note)
    return out


def _output_tensors(out) -> list[torch.Tensor]:
    """The floating-point tensors of a model's output (a tensor, tuples/lists, dicts such as a
    transformers ModelOutput), in order."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _output_tensors(o)]
    return []


def _model_sqnr(root: nn.Module, variants: dict[str, list], reference: nn.Module, data) -> dict[str, float]:
    """Output SQNR (dB) against the float reference over the batches of data, for each variant
    (swaps from quantize()'s model): every floating output tensor, summed; the model is left as
    quantize() made it."""
    with torch.inference_mode():
        refs = _reference_outputs(reference, data)
        out = {}
        for name, swaps in variants.items():
            model = _apply(root, swaps, True)
            try:
                out[name] = _output_sqnr(model, refs, data)
            finally:
                root = _apply(model, swaps, False)
    return out


def _reference_outputs(reference: nn.Module, data) -> list[list[torch.Tensor]]:
    """The float reference's output tensors (float64) for each batch of data."""
    return [[t.double() for t in _output_tensors(run_batch(reference, b))] for b in batches_of(data)]


def _output_sqnr(model: nn.Module, refs: list[list[torch.Tensor]], data) -> float:
    """The model's output SQNR (dB) against refs over the batches of data: every floating output
    tensor of matching shape, summed."""
    signal = noise = 0.0
    for ref, batch in zip(refs, batches_of(data)):
        for r, g in zip(ref, _output_tensors(run_batch(model, batch))):
            if r.shape == g.shape:
                signal += float(r.square().sum())
                noise += float((g.double() - r).square().sum())
    return math.inf if noise == 0 else (10 * math.log10(signal / noise) if signal > 0 and math.isfinite(noise) else -math.inf)


def _fidelity_check(qm: nn.Module, layers: list[_Layer], choices: dict, fallback: dict, reference: nn.Module,
                    max_drop: float, data) -> tuple[dict, dict[str, float] | None]:  # fmt: skip
    """The whole model's accuracy against quantize()'s: where layers chose a candidate less accurate
    than quantize()'s and the model's output SQNR fell by more than max_drop dB, those layers go back
    to quantize()'s choice. Returns (the choices, {"quantize": dB, "optimize": dB} or None when no
    layer chose a less accurate candidate)."""
    worse = []
    for lay in layers:
        chosen, base = choices[lay.name][0], fallback[lay.name][0]
        sqnr = _sqnr_of(lay)
        if chosen is not base and lay.noise is not None and sqnr.get(chosen.name, -math.inf) < sqnr.get(base.name, -math.inf):
            worse.append(lay.name)
    if not worse:
        return choices, None
    variants = {"quantize": _swaps(qm, layers, fallback), "optimize": _swaps(qm, layers, choices)}
    sqnr = _model_sqnr(qm, variants, reference, data)
    if not sqnr["optimize"] < sqnr["quantize"] - max_drop:
        return choices, sqnr
    why = (f"reverted to quantize()'s choice: with the less accurate choices the model's output SQNR was "
           f"{sqnr['optimize']:.1f} dB against {sqnr['quantize']:.1f} dB with quantize()'s layers")
    out = dict(choices)
    for name in worse:
        out[name] = (fallback[name][0], why)
    return out, sqnr


def _swaps(qm: nn.Module, layers: list[_Layer], choices: dict) -> list[tuple[str, nn.Module, nn.Module]]:
    """(qualified name, new module, the module there now) for every replacement the choices make in
    quantize()'s model: the layer, and for a candidate that does not run its fusions itself, the
    fused modules back."""
    swaps = []
    for lay in layers:
        chosen, _ = choices[lay.name]
        if chosen.module is not lay.layer:
            swaps.append((lay.name, copy.deepcopy(chosen.module) if chosen.restore else chosen.module, lay.layer))
        if chosen.restore:
            swaps += [(slot, copy.deepcopy(original), qm.get_submodule(slot)) for slot, original in lay.slots]
    return swaps


def _apply(root: nn.Module, swaps: list, forward: bool) -> nn.Module:
    """Puts the swaps' new modules in (forward) or the old ones back; returns the model (another
    module when the model itself is the layer replaced)."""
    for name, new, old in swaps if forward else reversed(swaps):
        root = set_module(root, name, new if forward else old)
    return root


def _model_check(root: nn.Module, variants: dict[str, list], example_inputs, rounds: int) -> dict[str, float]:
    """ms per forward of example_inputs for each variant (swaps from quantize()'s model), rounds
    interleaved in a rotating order; the model is left as quantize() made it."""
    samples: dict[str, list[float]] = {k: [] for k in variants}
    order = list(variants)
    with torch.inference_mode():
        for r in range(rounds + 1):
            for name in order[r % len(order):] + order[: r % len(order)]:
                model = _apply(root, variants[name], True)
                run_batch(model, example_inputs)  # untimed: settles caches after the swap
                t0 = time.perf_counter()
                run_batch(model, example_inputs)
                if r:  # round 0 warms every variant
                    samples[name].append((time.perf_counter() - t0) * 1e3)
                root = _apply(model, variants[name], False)
    return {k: statistics.median(v) for k, v in samples.items()}


# ---------------------------------------------------------------------------------- conv handoff


def _plan_handoff(root: nn.Module, reference: nn.Module, example_inputs, data, rounds: int,
                  max_drop: float | None, end: torch.dtype = torch.float32) -> HandoffPlan | None:  # fmt: skip
    """QuantConfig.conv_handoff=True in optimize: the chains of convs marked for bf16 (quantize()'s
    rule; in a bf16 model, end = bf16, what they hand over anyway), and where some links could
    carry uint8 (conv_handoff="u8"), the whole model timed on the example with each; uint8 is kept
    only when max_drop is given and the model's output SQNR vs float is at most max_drop dB below
    bf16's, and when it is faster by more than _MODEL_TIE. None when nothing is linked."""
    from fastinfer.convert.quantize import mark_conv_handoff

    words = {"bf16": mark_conv_handoff(root, end=end)}
    if not words["bf16"]:
        return None
    layers = [m for m in root.modules() if isinstance(m, (Int8Conv2d, DepthwiseConv2d))]
    dtypes = {"bf16": [(m.output_dtype, m._takes_u8) for m in layers]}
    words["u8"] = mark_conv_handoff(root, u8=True, end=end)
    dtypes["u8"] = [(m.output_dtype, m._takes_u8) for m in layers]
    if dtypes["u8"] == dtypes["bf16"] or max_drop is None:
        _set_dtypes(layers, dtypes["bf16"])
        return HandoffPlan("bf16", words["bf16"], note="no link can carry uint8" if max_drop is not None else "")
    settings = {k: (lambda d=d: _set_dtypes(layers, d)) for k, d in dtypes.items()}
    ms = _time_settings(root, settings, example_inputs, rounds)
    sqnr = _settings_sqnr(root, settings, reference, data)
    chosen, note = "bf16", ""
    if not sqnr["u8"] >= sqnr["bf16"] - max_drop:
        note = f"uint8 left out: model output SQNR {sqnr['u8']:.1f} dB against {sqnr['bf16']:.1f} dB with bf16"
    elif ms["u8"] * (1 + _MODEL_TIE) < ms["bf16"]:
        chosen = "u8"
    settings[chosen]()
    return HandoffPlan(chosen, words[chosen], ms, sqnr, note)


def _set_dtypes(layers: list[nn.Module], dtypes: list) -> None:
    for m, (d, takes_u8) in zip(layers, dtypes):
        m._output_dtype, m._takes_u8 = d, takes_u8


# ------------------------------------------------------------------------------------ attention

_ATTN_FP32, _ATTN_BF16, _ATTN_SDPA = "fastinfer kernel", "fastinfer kernel, bf16 arithmetic", "torch SDPA"


def _plan_attention(root: nn.Module, reference: nn.Module, example_inputs, data, rounds: int,
                    max_drop: float | None) -> AttentionPlan | None:  # fmt: skip
    """The attention of a transformers model that quantize() switched to fastinfer's kernel, timed
    whole on the example with each candidate: the kernel, the kernel with bf16 arithmetic (when
    max_drop is given, the model is fp32 and the CPU runs the vdpbf16ps kernel; kept only if the
    model's output SQNR vs float is at most max_drop dB below the fp32 kernel's) and torch's SDPA.
    Sets the fastest (within _MODEL_TIE the exact one) on root; None when there is nothing to plan."""
    from fastinfer.convert.attention import HF_NAME, HF_NAME_BF16, is_hf_model

    if not is_hf_model(root) or root.config._attn_implementation != HF_NAME:
        return None
    impls = {_ATTN_FP32: HF_NAME, _ATTN_SDPA: "sdpa"}
    dtypes = {p.dtype for p in root.parameters() if p.is_floating_point()}
    if max_drop is not None and dtypes == {torch.float32} and _runtime._C.attention_kernel() == "avx512_bf16":
        impls[_ATTN_BF16] = HF_NAME_BF16
    try:
        ms = _time_attention(root, impls, example_inputs, rounds)
        sqnr = _attention_sqnr(root, {k: impls[k] for k in (_ATTN_FP32, _ATTN_BF16)}, reference, data) if _ATTN_BF16 in impls else None
    finally:
        root.set_attn_implementation(HF_NAME)
    chosen, note = _choose_attention(ms, sqnr, max_drop)
    root.set_attn_implementation(impls[chosen])
    if root.config._attn_implementation != impls[chosen]:  # pragma: no cover - transformers refused it
        root.set_attn_implementation(HF_NAME)
        chosen, note = _ATTN_FP32, f"transformers refused attn_implementation={impls[chosen]!r}"
    rep = root.__dict__.get("_fastinfer_report")
    if rep is not None:
        rep.attention = f"{chosen} (chosen by optimize)" if chosen != _ATTN_SDPA else "torch SDPA (chosen by optimize)"
    return AttentionPlan(chosen, impls[chosen], ms, sqnr, note)


def _time_attention(root: nn.Module, impls: dict[str, str], example_inputs, rounds: int) -> dict[str, float]:
    """ms per forward of example_inputs with each attn_implementation (_time_settings); the last
    one stays set."""
    return _time_settings(root, {k: _attn_setter(root, v) for k, v in impls.items()}, example_inputs, rounds)


def _attention_sqnr(root: nn.Module, impls: dict[str, str], reference: nn.Module, data) -> dict[str, float]:
    """The model's output SQNR (dB) vs the float reference over data, per attn_implementation."""
    return _settings_sqnr(root, {k: _attn_setter(root, v) for k, v in impls.items()}, reference, data)


def _attn_setter(root: nn.Module, impl: str) -> Callable[[], None]:
    return lambda: root.set_attn_implementation(impl)


def _time_settings(root: nn.Module, settings: dict[str, Callable[[], None]], example_inputs, rounds: int) -> dict[str, float]:
    """ms per forward of example_inputs with each setting of the model (a function that sets it),
    rounds interleaved in a rotating order (round 0 warms every one); the last one stays set."""
    samples: dict[str, list[float]] = {k: [] for k in settings}
    order = list(settings)
    with torch.inference_mode():
        for r in range(rounds + 1):
            for label in order[r % len(order):] + order[: r % len(order)]:
                settings[label]()
                run_batch(root, example_inputs)  # untimed
                t0 = time.perf_counter()
                run_batch(root, example_inputs)
                if r:
                    samples[label].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


def _settings_sqnr(root: nn.Module, settings: dict[str, Callable[[], None]], reference: nn.Module, data) -> dict[str, float]:
    """The model's output SQNR (dB) vs the float reference over data, per setting."""
    out = {}
    with torch.inference_mode():
        refs = _reference_outputs(reference, data)
        for label, setting in settings.items():
            setting()
            out[label] = _output_sqnr(root, refs, data)
    return out


def _choose_attention(ms: dict[str, float], sqnr: dict[str, float] | None, max_drop: float | None) -> tuple[str, str]:
    """(label, note): the fastest candidate whose accuracy qualifies; one within _MODEL_TIE of it
    that computes in fp32 (the fastinfer kernel first, then SDPA) is preferred to bf16 arithmetic."""
    notes = []
    ok = dict(ms)
    if _ATTN_BF16 in ok and (sqnr is None or max_drop is None or not sqnr[_ATTN_BF16] >= sqnr[_ATTN_FP32] - max_drop):
        del ok[_ATTN_BF16]
        if sqnr is not None:
            notes.append(f"bf16 arithmetic left out: model output SQNR {sqnr[_ATTN_BF16]:.1f} dB against "
                         f"{sqnr[_ATTN_FP32]:.1f} dB")  # fmt: skip
    fastest = min(ok, key=ok.get)
    exact = [k for k in (_ATTN_FP32, _ATTN_SDPA) if k in ok and ok[k] <= ok[fastest] * (1 + _MODEL_TIE)]
    chosen = exact[0] if exact else fastest
    if sqnr is not None and chosen == _ATTN_BF16:
        notes.append(f"model output SQNR {sqnr[_ATTN_BF16]:.1f} dB against {sqnr[_ATTN_FP32]:.1f} dB in fp32")
    return chosen, "; ".join(notes)


def _rows(root: nn.Module, layers: list[_Layer], choices: dict) -> list[LayerPlan]:
    rows = []
    conv_report = root.__dict__.get("_fastinfer_report")
    index = {r.name: i for i, r in enumerate(conv_report)} if conv_report is not None else {}
    for lay in layers:
        chosen, note = choices[lay.name]
        if lay.name in index and chosen.module is not lay.layer:
            old = conv_report[index[lay.name]]
            now = "float" if chosen.name == "float" else type(chosen.module).__name__
            conv_report[index[lay.name]] = LayerConversion(old.name, old.kind, now, f"optimize: {chosen.name}")
        now = root.get_submodule(lay.name)
        kernel, shape, sparsity, nbytes = describe(now)
        sqnr, times = _sqnr_of(lay), lay.times or {}
        cands = {c.name: (times.get(c.name), sqnr.get(c.name, math.nan)) for c in lay.candidates}
        rows.append(LayerPlan(lay.name, type(now).__name__, kernel, shape, sparsity, nbytes, input=lay.input,
                              sqnr_db=sqnr.get(chosen.name) if lay.noise else None, time_us=times.get(chosen.name),
                              float_us=times.get("float"), note=note, candidates=cands))  # fmt: skip
    return rows
