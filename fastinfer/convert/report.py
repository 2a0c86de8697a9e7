"""What a conversion did to each layer: converted (to what, with which fusions) or left in float
(and why). quantize() stores one on the model it returns; fastinfer.conversion_report(model)
reads it back, and one summary line goes to the "fastinfer" logger."""

from __future__ import annotations

import logging
import re
import sys
from dataclasses import dataclass

from torch import nn

__all__ = ["ConversionReport", "LayerConversion", "conversion_report", "logger"]


class _StderrHandler(logging.StreamHandler):
    """Writes to the sys.stderr of the moment (pytest's capture, a redirected notebook)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it
        pass


logger = logging.getLogger("fastinfer")
if not logger.handlers:  # one line per conversion by default; logging.getLogger("fastinfer").setLevel(logging.WARNING) silences it
    _handler = _StderrHandler()
    _handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


@dataclass(frozen=True)
class LayerConversion:
    """One layer: its qualified name, its float class, what it became ("float" when left), and the
    fusions made or the reason it stayed float."""

    name: str
    kind: str
    result: str
    detail: str = ""

    @property
    def converted(self) -> bool:
        return self.result != "float"


# a row's words for an activation run in its layer's epilogue ("BatchNorm2d folded + relu fused",
# "gelu fused", "residual add + relu fused"; not "residual add fused" alone)
_ACT_FUSED = re.compile(r"\b(gelu_tanh|gelu|relu6|relu|silu|hardswish) fused")


class ConversionReport(list):
    """The LayerConversion of every layer a conversion looked at, in model order, and what became
    of the model's attention (`attention`: None when the conversion did not look at it)."""

    def __init__(self, entry: str, rows=(), attention: str | None = None, layernorm: str | None = None,
                 blocks: str | None = None) -> None:  # fmt: skip
        super().__init__(rows)
        self.entry = entry
        self.attention = attention
        self.layernorm = layernorm  # what became of the model's nn.LayerNorm modules (None: not looked at)
        self.blocks = blocks  # transformers blocks on fastinfer's layer path (fastinfer.convert.hf_blocks), or None

    def add_details(self, words: dict[str, str]) -> None:
        """Appends words[name] to the detail of the row of each layer name."""
        for i, row in enumerate(self):
            if row.name in words:
                self[i] = LayerConversion(row.name, row.kind, row.result, "; ".join(filter(None, (row.detail, words[row.name]))))

    @property
    def converted(self) -> list[LayerConversion]:
        return [r for r in self if r.converted]

    @property
    def left_float(self) -> list[LayerConversion]:
        return [r for r in self if not r.converted]

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for r in self.converted:
            counts[r.result] = counts.get(r.result, 0) + 1
        folded = sum("BatchNorm2d folded" in r.detail for r in self.converted)
        fused = sum(bool(_ACT_FUSED.search(r.detail)) for r in self.converted)
        residual = sum("residual add" in r.detail for r in self.converted)
        kinds = ", ".join(f"{n} {k}" for k, n in counts.items())
        line = f"{self.entry}: {len(self.converted)} layers converted" + (f" ({kinds})" if kinds else "")
        if folded or fused or residual:
            line += f", {folded} BatchNorm2d folded, {fused} activations fused"
            line += f", {residual} residual adds fused" if residual else ""
        left = self.left_float
        if left:
            shown = "; ".join(f"{r.name or '<model>'} ({r.detail})" for r in left[:3])
            line += f"; {len(left)} left in float: {shown}" + ("; ..." if len(left) > 3 else "")
        if self.attention is not None:
            line += f"; attention: {self.attention}"
        if self.layernorm:
            line += f"; LayerNorm: {self.layernorm}"
        if self.blocks:
            line += f"; blocks: {self.blocks}"
        return line + ". fastinfer.conversion_report(model) lists every layer."

    def __str__(self) -> str:
        tail = ("" if self.attention is None else f"\nattention: {self.attention}") + (
            f"\nLayerNorm: {self.layernorm}" if self.layernorm else "") + (f"\nblocks: {self.blocks}" if self.blocks else "")
        if not self:
            return f"{self.entry}: no convertible layers" + tail
        w = max(len("layer"), *(len(r.name or "<model>") for r in self)) + 2
        k = max(len("was"), *(len(r.kind) for r in self)) + 2
        res = max(len("now"), *(len(r.result) for r in self)) + 2
        lines = [f"{'layer':<{w}}{'was':<{k}}{'now':<{res}}detail"]
        lines += [f"{r.name or '<model>':<{w}}{r.kind:<{k}}{r.result:<{res}}{r.detail}" for r in self]
        return "\n".join(lines) + tail

    def __repr__(self) -> str:
        return f"ConversionReport({self.entry}: {len(self.converted)} converted, {len(self.left_float)} left in float)"


def conversion_report(model: nn.Module) -> ConversionReport:
    """The report of the conversion that produced `model` (fastinfer.quantize's result)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"conversion_report expects an nn.Module, got {type(model).__name__}")
    report = model.__dict__.get("_fastinfer_report")
    if report is None:
        raise ValueError("this model carries no conversion report: it was not returned by fastinfer.quantize")
    return report


def attach(model: nn.Module, report: ConversionReport) -> None:
    model.__dict__["_fastinfer_report"] = report
    logger.info(report.summary())
