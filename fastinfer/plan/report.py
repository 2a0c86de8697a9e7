"""fastinfer.report(model): one row per layer of a convertible kind -- what runs it (kernel and
format), its shape, sparsity and weight bytes, and, where fastinfer.optimize measured it, the
output SQNR vs float and the time per call vs float. As a list of LayerPlan dataclasses, a
markdown table (str(report)) or CSV (report.to_csv())."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from fastinfer import _runtime
from fastinfer.nn import (
    DepthwiseConv2d,
    Int8Conv1d,
    Int8Conv2d,
    Int8Linear,
    Int8MultiheadAttention,
    SparseInt8Linear,
    SparseLinear,
    StaticInt8Linear,
    WeightOnlyInt8Linear,
    linear_weight_and_bias,
)
from fastinfer.nn.conv import hands_uint8

__all__ = ["AttentionPlan", "LayerPlan", "PlanReport", "report"]


@dataclass
class LayerPlan:
    """One layer. time_us / float_us / sqnr_db are None where nothing was measured (a model from
    quantize() or load() rather than optimize()). candidates: what optimize() measured, name ->
    (us per call or None when not timed, output SQNR in dB vs float; inf for float itself)."""

    name: str
    module: str  # the class running the layer now
    kernel: str  # "int8 dynamic", "int8 weight-only", "int8 2:4", "fp32 depthwise", "float (torch)", ...
    shape: str  # "768 -> 3072", "conv 3x3 64 -> 64 /2"
    sparsity: float  # fraction of the weights that are zero
    weight_bytes: int  # bytes of the weights as this layer stores them (scales and bias included)
    input: str = ""  # the input optimize() measured at, e.g. "8x128x384 float32"
    sqnr_db: float | None = None
    time_us: float | None = None
    float_us: float | None = None
    note: str = ""
    candidates: dict[str, tuple[float | None, float]] = field(default_factory=dict)

    @property
    def speedup(self) -> float | None:
        """float time / this layer's time, where both were measured."""
        if self.time_us and self.float_us:
            return self.float_us / self.time_us
        return None


@dataclass
class AttentionPlan:
    """What optimize() chose for a transformers model's attention: `chosen` (a label below) is the
    attn_implementation `implementation`; ms = the whole model's time per forward on the example
    with each candidate (labels "fastinfer kernel", "fastinfer kernel, bf16 arithmetic", "torch
    SDPA"); sqnr_db = the model's output SQNR vs float with the fastinfer kernel and with bf16
    arithmetic (None when bf16 arithmetic was not a candidate)."""

    chosen: str
    implementation: str
    ms: dict[str, float]
    sqnr_db: dict[str, float] | None = None
    note: str = ""

    def summary(self) -> str:
        times = ", ".join(f"{k} {v:.3g} ms" for k, v in self.ms.items())
        return f"attention: {self.chosen} ({times}{'; ' + self.note if self.note else ''})"


@dataclass
class HandoffPlan:
    """What optimize() chose for the outputs its chained convs hand to each other
    (QuantConfig.conv_handoff): `chosen` is "bf16" or "u8" (uint8 after relu6 where a link allows);
    words = the report's note per layer; ms / sqnr_db = the whole model's time per forward on the
    example and its output SQNR vs float with each (None when uint8 was not a candidate)."""

    chosen: str
    words: dict[str, str]
    ms: dict[str, float] | None = None
    sqnr_db: dict[str, float] | None = None
    note: str = ""

    def summary(self) -> str:
        parts = [f"{k} {self.ms[k]:.3g} ms, {self.sqnr_db[k]:.1f} dB" for k in self.ms] if self.ms and self.sqnr_db else []
        if self.note:
            parts.append(self.note)
        return f"conv handoff: {self.chosen}" + (f" ({'; '.join(parts)})" if parts else "")


_COLUMNS = ("layer", "module", "kernel", "shape", "input", "sparsity", "weight KiB", "SQNR dB", "us", "float us",
            "vs float", "note")  # fmt: skip


def _cells(r: LayerPlan) -> tuple[str, ...]:
    def num(v, fmt):
        return "-" if v is None else ("inf" if v == math.inf else format(v, fmt))

    return (r.name or "<model>", r.module, r.kernel, r.shape, r.input or "-", f"{100 * r.sparsity:.0f}%",
            f"{r.weight_bytes / 1024:.1f}", num(r.sqnr_db, ".1f"), num(r.time_us, ".1f"), num(r.float_us, ".1f"),
            "-" if r.speedup is None else f"{r.speedup:.2f}x", r.note)  # fmt: skip


class PlanReport(list):
    """LayerPlan rows in model order. `measured` says whether optimize() timed the layers; `isa`
    and `threads` are the machine state they were measured (or reported) under."""

    def __init__(self, rows=(), measured: bool = False, isa: str | None = None, threads: int | None = None,
                 model_ms: dict[str, float] | None = None, model_sqnr_db: dict[str, float] | None = None,
                 attention: AttentionPlan | None = None, handoff: HandoffPlan | None = None) -> None:  # fmt: skip
        super().__init__(rows)
        self.measured = measured
        self.attention = attention  # optimize's choice of a transformers model's attention, or None
        self.handoff = handoff  # optimize's choice of the dtype chained convs hand over, or None
        self.model_ms = model_ms  # optimize's whole-model check: ms per forward, "quantize" and "optimize"
        # optimize's whole-model accuracy check: output SQNR vs float, "quantize" and "optimize" (as
        # first planned, before any layer went back)
        self.model_sqnr_db = model_sqnr_db
        self.isa = isa or _runtime.active_isa()
        self.threads = threads or _runtime.num_threads()  # fastinfer's kernels' threads

    def to_markdown(self) -> str:
        lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
        lines += ["| " + " | ".join(c.replace("|", "/") for c in _cells(r)) + " |" for r in self]
        return "\n".join(lines)

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(_COLUMNS)
        w.writerows(_cells(r) for r in self)
        return buf.getvalue()

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for r in self:
            kinds[r.kernel] = kinds.get(r.kernel, 0) + 1
        line = f"{len(self)} layers: " + ", ".join(f"{n} {k}" for k, n in kinds.items())
        timed = [r for r in self if r.time_us is not None and r.float_us is not None]
        if timed:
            ours, flt = sum(r.time_us for r in timed), sum(r.float_us for r in timed)
            line += f"; measured layers {flt / 1e3:.2f} ms float -> {ours / 1e3:.2f} ms ({flt / ours:.2f}x)"
        if self.model_ms:
            base = next(k for k in self.model_ms if k != "optimize")
            line += (f"; whole model on the example: {self.model_ms[base]:.3g} ms with "
                     f"{'quantize()' if base == 'quantize' else base}'s layers, {self.model_ms['optimize']:.3g} ms planned")  # fmt: skip
        if self.model_sqnr_db:
            line += (f"; model output SQNR vs float: {self.model_sqnr_db['quantize']:.1f} dB with quantize()'s layers, "
                     f"{self.model_sqnr_db['optimize']:.1f} dB as planned")  # fmt: skip
        if self.attention is not None:
            line += "; " + self.attention.summary()
        if self.handoff is not None:
            line += "; " + self.handoff.summary()
        return line + f" ({self.isa}, {self.threads} threads)"

    def __str__(self) -> str:
        return self.to_markdown() + "\n\n" + self.summary()

    def __repr__(self) -> str:
        return f"PlanReport({self.summary()})"


# ------------------------------------------------------------------------------- describing layers


def _conv_shape(kind: str, cin: int, cout: int, ks, stride, groups: int) -> str:
    s = f"{kind} {ks[0]}x{ks[1]} {cin} -> {cout}"
    if tuple(stride) != (1, 1):
        s += f" /{stride[0]}" if stride[0] == stride[1] else f" /{tuple(stride)}"
    if groups > 1:
        s += " depthwise" if groups == cin == cout else f" groups={groups}"
    return s


def _zeros(t: torch.Tensor) -> float:
    return 1.0 - float(torch.count_nonzero(t)) / t.numel() if t.numel() else 0.0


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def describe(mod: nn.Module) -> tuple[str, str, float, int] | None:
    """(kernel, shape, sparsity, weight bytes) of a layer of a kind fastinfer converts, or None."""
    shape = f"{getattr(mod, 'in_features', '?')} -> {getattr(mod, 'out_features', '?')}"
    if type(mod) is WeightOnlyInt8Linear:
        w = mod.weight_int8
        return "int8 weight-only", shape, _zeros(w), w.numel() + _nbytes(mod.weight_scale, mod.bias)
    if type(mod) is Int8Linear:
        w = mod.weight_int8
        return "int8 dynamic", shape, _zeros(w), w.numel() + _nbytes(mod.weight_scale, mod.bias)
    if type(mod) is StaticInt8Linear:
        w = mod.weight_int8
        return "int8 static", shape, _zeros(w), w.numel() + _nbytes(mod.weight_scale, mod.bias, mod.x_scale)
    if isinstance(mod, (SparseInt8Linear, SparseLinear)):
        nnz, numel = mod.sparsity_stats()
        dtype = "int8" if isinstance(mod, SparseInt8Linear) else "fp32"
        extra = _nbytes(getattr(mod, "weight_scale", None), mod.bias)
        return f"{dtype} {mod.format}", shape, 1 - nnz / numel if numel else 0.0, _nbytes(mod.sparse_weight) + extra
    if isinstance(mod, (Int8Conv1d, Int8Conv2d)):
        c = mod.conv2d if isinstance(mod, Int8Conv1d) else mod
        kind = "conv1d" if isinstance(mod, Int8Conv1d) else "conv"
        return ("int8 conv", _conv_shape(kind, c.in_channels, c.out_channels, c.kernel_size, c.stride, c.groups),
                _zeros(c.weight_int8), _nbytes(c.weight_int8, c.weight_scale, c.bias))  # fmt: skip
    if isinstance(mod, DepthwiseConv2d):
        return ("fp32 depthwise", _conv_shape("conv", mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride,
                                              mod.groups), _zeros(mod.weight), _nbytes(mod.weight, mod.bias))  # fmt: skip
    if isinstance(mod, Int8MultiheadAttention):
        return ("int8 dynamic projections", f"mha {mod.embed_dim}, {mod.num_heads} heads",
                _zeros(mod.in_proj.weight_int8), _nbytes(mod.in_proj.weight_int8, mod.out_proj.weight_int8))  # fmt: skip
    weight, bias = linear_weight_and_bias(mod)
    if weight is not None:
        return "float (torch)", f"{weight.shape[1]} -> {weight.shape[0]}", _zeros(weight.detach()), _nbytes(weight, bias)
    if isinstance(mod, (nn.Conv2d, nn.Conv1d)) and type(mod).forward in (nn.Conv2d.forward, nn.Conv1d.forward):
        ks = tuple(mod.kernel_size) if len(mod.kernel_size) == 2 else (1, mod.kernel_size[0])
        st = tuple(mod.stride) if len(mod.stride) == 2 else (1, mod.stride[0])
        kind = "conv" if isinstance(mod, nn.Conv2d) else "conv1d"
        return ("float (torch)", _conv_shape(kind, mod.in_channels, mod.out_channels, ks, st, mod.groups),
                _zeros(mod.weight.detach()), _nbytes(mod.weight, mod.bias))  # fmt: skip
    if isinstance(mod, nn.MultiheadAttention):
        return "float (torch)", f"mha {mod.embed_dim}, {mod.num_heads} heads", 0.0, _nbytes(*mod.parameters())
    return None


def report(model: nn.Module) -> PlanReport:
    """A row per layer of a kind fastinfer converts (linear, conv, MultiheadAttention; fastinfer's
    and float ones), in model order: kernel/format, shape, sparsity, weight bytes. For a model
    returned by fastinfer.optimize, the rows also hold what was measured there (input shape, output
    SQNR vs float, us per call vs float, the candidates). A layer inside a converted
    MultiheadAttention (or an Int8Conv1d) is reported with it, not on its own."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"report expects an nn.Module, got {type(model).__name__}")
    plan = model.__dict__.get("_fastinfer_plan")
    measured = {r.name: r for r in plan} if plan is not None else {}
    rows, seen, inside = [], set(), set()
    for name, mod in model.named_modules():
        if id(mod) in seen or any(name != p and (p == "" or name.startswith(p + ".")) for p in inside):
            continue
        d = describe(mod)
        if d is None:
            continue
        seen.add(id(mod))
        if isinstance(mod, (Int8MultiheadAttention, nn.MultiheadAttention, Int8Conv1d)):
            inside.add(name)
        kernel, shape, sparsity, nbytes = d
        row = LayerPlan(name, type(mod).__name__, kernel, shape, sparsity, nbytes)
        m = measured.get(name)
        if m is not None and m.module == row.module:  # still the layer optimize() chose
            row.input, row.sqnr_db, row.time_us, row.float_us = m.input, m.sqnr_db, m.time_us, m.float_us
            row.note, row.candidates = m.note, dict(m.candidates)
        rows.append(row)
    attention = plan.attention if plan else None
    config = getattr(model, "config", None)
    if attention is not None and getattr(config, "_attn_implementation", None) != attention.implementation:
        attention = None  # switched since optimize() chose it
    handoff = plan.handoff if plan else None
    if handoff is not None and handoff.chosen == "u8" and not hands_uint8(model):
        handoff = None  # reset since optimize() chose it
    return PlanReport(rows, measured=bool(measured), isa=plan.isa if plan else None,
                      threads=plan.threads if plan else None, model_ms=plan.model_ms if plan else None,
                      model_sqnr_db=plan.model_sqnr_db if plan else None, attention=attention,
                      handoff=handoff)  # fmt: skip


def attach_plan(model: nn.Module, plan: PlanReport) -> None:
    model.__dict__["_fastinfer_plan"] = plan
