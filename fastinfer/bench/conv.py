"""`fastinfer bench --suite conv`: single conv layers of the image models, Int8Conv2d beside torch.

Each layer is one conv of MobileNetV2, EfficientNet-Lite0 or ResNet-50 at its place in the network
(channels, kernel, stride, groups, input size), at batch 16 and 1. Its weights are random, with a
bias (a conv whose BatchNorm was folded); its input is random, and non-negative where the layer
follows a ReLU/ReLU6 in the model (fastinfer quantizes such an input to uint8, a path of its own).
Peers, on the same weights and the same input:

  fp32 channels_last   nn.Conv2d.to(memory_format=torch.channels_last), channels_last input
  bf16 channels_last   the same in bf16 (module and input)
  ours Int8Conv2d      fastinfer.nn.Int8Conv2d.from_conv(conv), channels_last fp32 input and output
                       (the input's quantization included)

Correctness is checked first (SQNR of each output vs the fp32 conv). Timing is the ops suite's
(fastinfer.bench.ops.time_peers): rounds with the peers in a rotating order, each timed batch of
calls after its own untimed settle calls; a time is the median over clean rounds, a ratio the
median over rounds of the two times of the same round; rounds in which another process used the
CPU are dropped (fastinfer.bench.guard). Our effective int8 rate is 2 * MACs / time, quoted as a
share of the int8 compute ceiling that the same run measures (fastinfer's register-only dot-peak
probe, fastinfer.bench.ops.int8_peak_tops); a rate above the ceiling is named, never printed. How a
layer runs right after a torch op is the ops suite's interleaved table, not repeated here.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

import fastinfer
from fastinfer import _runtime
from fastinfer.bench import ops as bench_ops
from fastinfer.bench._progress import progress_bar
from fastinfer.bench.guard import CpuGuard

__all__ = ["BATCHES", "LAYERS", "ConvLayer", "format_markdown", "run", "select"]


@dataclass(frozen=True)
class ConvLayer:
    key: str  # what --convs selects (by prefix)
    title: str
    cin: int
    cout: int
    k: int
    stride: int
    groups: int
    size: int  # input height = width
    relu_input: bool  # the layer follows a ReLU/ReLU6 in its model: the input is >= 0

    def conv(self) -> nn.Conv2d:
        return nn.Conv2d(self.cin, self.cout, self.k, self.stride, (self.k - 1) // 2, groups=self.groups, bias=True)

    def out_size(self) -> int:
        return (self.size + 2 * ((self.k - 1) // 2) - self.k) // self.stride + 1

    def macs(self, batch: int) -> int:
        return batch * self.out_size() ** 2 * self.cout * (self.cin // self.groups) * self.k * self.k


LAYERS: tuple[ConvLayer, ...] = (
    ConvLayer("mbv2-expand-24-144", "MobileNetV2 1x1 expand 24->144", 24, 144, 1, 1, 1, 56, False),
    ConvLayer("mbv2-dw3x3-144-s1", "MobileNetV2 3x3 depthwise 144, stride 1", 144, 144, 3, 1, 144, 56, True),
    ConvLayer("mbv2-dw3x3-144-s2", "MobileNetV2 3x3 depthwise 144, stride 2", 144, 144, 3, 2, 144, 56, True),
    ConvLayer("mbv2-project-144-24", "MobileNetV2 1x1 project 144->24", 144, 24, 1, 1, 1, 56, True),
    ConvLayer("lite0-dw5x5-144-s2", "EfficientNet-Lite0 5x5 depthwise 144, stride 2", 144, 144, 5, 2, 144, 56, True),
    ConvLayer("r50-stem-7x7", "ResNet-50 stem 7x7 3->64, stride 2", 3, 64, 7, 2, 1, 224, False),
    ConvLayer("r50-3x3-64", "ResNet-50 3x3 64->64", 64, 64, 3, 1, 1, 56, True),
    ConvLayer("r50-1x1-256-64", "ResNet-50 1x1 256->64", 256, 64, 1, 1, 1, 56, True),
    ConvLayer("r50-3x3-512-7x7", "ResNet-50 3x3 512->512 at 7x7", 512, 512, 3, 1, 1, 7, True),
)
BATCHES = (16, 1)


def select(names: Iterable[str] | None) -> list[ConvLayer]:
    """The layers whose key is one of `names` or starts with one (all when None); unknown names raise."""
    if not names:
        return list(LAYERS)
    names = list(names)
    keys = {layer.key for layer in LAYERS}
    bad = [n for n in names if not any(k.startswith(n) for k in keys)]
    if bad:
        raise ValueError(f"unknown conv layer(s) {', '.join(bad)}; known: {', '.join(layer.key for layer in LAYERS)}")
    return [layer for layer in LAYERS if any(layer.key == n or (n not in keys and layer.key.startswith(n)) for n in names)]


def _peers(layer: ConvLayer, batch: int, seed: int = 0) -> tuple[list[bench_ops.Peer], dict[str, str]]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        conv = layer.conv().eval()
        x = torch.randn(batch, layer.cin, layer.size, layer.size)
    if layer.relu_input:
        x = x.clamp_(min=0.0)
    x = x.contiguous(memory_format=torch.channels_last)
    conv_cl = conv.to(memory_format=torch.channels_last)
    conv_bf = copy.deepcopy(conv_cl).to(torch.bfloat16)
    x_bf = x.to(torch.bfloat16)
    errors: dict[str, str] = {}
    peers = [
        bench_ops.Peer(name="fp32 channels_last", kind="float", fn=lambda: conv_cl(x), note="nn.Conv2d, channels_last"),
        bench_ops.Peer(name="bf16 channels_last", kind="float", fn=lambda: conv_bf(x_bf), note="module and input bf16"),
    ]
    try:
        ours = fastinfer.nn.Int8Conv2d.from_conv(conv_cl).eval()
        peers.append(bench_ops.Peer(name="ours Int8Conv2d", kind="ours", fn=lambda: ours(x), isa=_runtime.active_isa(),
                                    note="fp32 channels_last in/out, input quantization included"))  # fmt: skip
        peers.append(bench_ops.Peer(name="ours Int8Conv2d bf16", kind="ours", fn=lambda: ours(x_bf), isa=_runtime.active_isa(),
                                    note="bf16 channels_last in/out"))  # fmt: skip
    except Exception as e:  # reported, the torch peers still run
        errors["ours Int8Conv2d"] = f"{type(e).__name__}: {str(e)[:200]}"
    if layer.groups > 1 and layer.groups == layer.cin:
        try:  # what fastinfer.quantize() puts in place of a depthwise conv
            dwl = fastinfer.nn.DepthwiseConv2d.from_conv(conv_cl).eval()
            peers.append(bench_ops.Peer(name="ours DepthwiseConv2d", kind="ours", fn=lambda: dwl(x), isa=_runtime.active_isa(),
                                        note="fp32 kernel (quantize()'s choice for depthwise), fp32 in/out"))  # fmt: skip
        except Exception as e:
            errors["ours DepthwiseConv2d"] = f"{type(e).__name__}: {str(e)[:200]}"
    return peers, errors


def _check(peers: list[bench_ops.Peer], errors: dict[str, str]) -> tuple[list[bench_ops.Peer], dict[str, str]]:
    """SQNR of every peer's output vs the fp32 conv; a peer that raises is dropped (and named)."""
    checks: dict[str, str] = {}
    with torch.inference_mode():
        ref = peers[0].call().float()
        keep = []
        for p in peers:
            try:
                y = p.call()
                if y.shape != ref.shape:
                    raise RuntimeError(f"output shape {tuple(y.shape)}, fp32 gives {tuple(ref.shape)}")
                db = bench_ops.sqnr_db(y.float(), ref)
                checks[p.name] = "reference" if p is peers[0] else f"SQNR {db:.1f} dB"
                keep.append(p)
            except Exception as e:
                errors[p.name] = f"{type(e).__name__}: {str(e)[:200]}"
    return keep, checks


def run(layers: Iterable[ConvLayer] | None = None, batches: Iterable[int] = BATCHES, quick: bool = False,
        rounds: int | None = None, target_s: float | None = None, progress: bool = True) -> list[dict]:  # fmt: skip
    """One dict per (layer, batch, peer): ms, ratios vs the fp32 and bf16 convs, TOPS, the check;
    a (layer, batch) that was noisy or failed yields rows with kind "error"."""
    layers = list(layers) if layers is not None else list(LAYERS)
    batches = list(batches)
    d_rounds, d_target, settle_s = bench_ops.QUICK_TIMING if quick else bench_ops.DEFAULT_TIMING
    rounds = rounds or d_rounds
    target_s = target_s or d_target
    rows: list[dict] = []
    with progress_bar(len(layers) * len(batches) * rounds, "fastinfer bench conv", "round", progress) as bar:
        for layer in layers:
            for b in batches:
                base = {"layer": layer.key, "title": layer.title, "batch": b, "out": layer.out_size(),
                        "gmac": layer.macs(b) / 1e9, "relu_input": layer.relu_input}  # fmt: skip
                bar.set_postfix_str(f"{layer.key} b{b}")
                peers, errors = _peers(layer, b)
                peers, checks = _check(peers, errors)
                guard = CpuGuard()
                with torch.inference_mode():
                    samples = bench_ops.time_peers(peers, rounds, target_s, settle_s, tick=bar.update, guard=guard)
                verdict = guard.verdict(bench_ops.min_clean_rounds(rounds))
                if verdict:
                    rows.append({**base, "peer": "NOISY", "kind": "error", "error": verdict})
                else:
                    flops = 2.0 * layer.macs(b)
                    for p in peers:
                        ts = samples[p.name]
                        row = {**base, "peer": p.name, "kind": p.kind, "isa": p.isa, "note": p.note,
                               "ms": statistics.median(ts) * 1e3, "tops": flops / statistics.median(ts) / 1e12,
                               "rounds": len(ts), "check": checks.get(p.name, "")}  # fmt: skip
                        for ref in ("fp32 channels_last", "bf16 channels_last"):
                            if ref in samples:
                                row[f"vs {ref.split()[0]}"] = statistics.median(a / t for a, t in zip(samples[ref], ts))
                        rows.append(row)
                for name, err in errors.items():
                    rows.append({**base, "peer": name, "kind": "error", "error": err})
    return rows


def _f(v: float | None, spec: str, suffix: str = "") -> str:
    return "" if v is None else f"{v:{spec}}{suffix}"


def format_markdown(rows: list[dict], meta: dict | None = None) -> str:
    meta = meta or {}
    peaks = meta.get("peak_tops") or {}
    out = ["# fastinfer benchmark: conv layers of image models, Int8Conv2d vs torch", ""]
    if meta.get("command"):
        out.append(f"- command: `{meta['command']}`")
    if meta:
        out.append(f"- CPU: {meta.get('cpu')}; ISA `{meta.get('isa_active')}`; threads {meta.get('threads')} (torch), "
                   f"{meta.get('fastinfer_threads')} (fastinfer); torch {meta.get('torch')}; fastinfer "
                   f"{meta.get('fastinfer')}; date {meta.get('date')}")  # fmt: skip
        shown = ", ".join(f"{k} {v:.2f} TOPS" for k, v in peaks.items() if v)
        if shown:
            out.append(f"- int8 compute ceiling (register-only dot instructions on all threads, this run): {shown}")
    out.append(
        "- method: every peer of a layer in one process on the same weights and channels_last input; "
        "rounds with the peers in a rotating order, each timed batch of calls after its own untimed "
        "settle calls; ms = median per-call time over clean rounds; **vs X = median over rounds of "
        "t_X / t_peer** (> 1: the row is faster than X); rounds in which another process used > 10% of "
        "the CPU are dropped. TOPS = 2 * MACs / time (for every peer; for ours an int8 rate, % ceiling = "
        "its share of the measured int8 ceiling). input >= 0: the layer follows a ReLU/ReLU6 in its "
        "model (fastinfer quantizes it to uint8). check: SQNR of the output vs the fp32 conv."
    )
    out.append("")
    out.append("| layer | batch | input | out | GMAC | peer | ms | vs fp32 | vs bf16 | TOPS | % int8 ceiling | check |")
    out.append("|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---|")
    summary: list[str] = []
    for r in rows:
        head = (f"| {r['title']} | {r['batch']} | {'>= 0' if r['relu_input'] else 'signed'} | {r['out']}x{r['out']} "
                f"| {r['gmac']:.3f} | {r['peer']} |")  # fmt: skip
        if r["kind"] == "error":
            label = "" if r["peer"] == "NOISY" else "ERROR: "
            out.append(f"{head} | | | | | {label}{r['error']} |")
            continue
        why = bench_ops.untrusted(r, peaks)
        if why:
            out.append(f"{head} | | | | | NOT TRUSTED, not printed: {why} |")
            continue
        int8 = r["kind"] == "ours" and "DepthwiseConv2d" not in r["peer"]  # DepthwiseConv2d runs fp32
        peak = peaks.get(r.get("isa") or "") if int8 else None
        frac = r["tops"] / peak if peak else None
        out.append(f"{head} {r['ms']:.3f} | {_f(r.get('vs fp32'), '.2f', 'x')} | {_f(r.get('vs bf16'), '.2f', 'x')} "
                   f"| {r['tops']:.3f} | {_f(frac * 100 if frac is not None else None, '.0f', '%')} | {r['check']} |")  # fmt: skip
        if r["kind"] == "ours":
            others = [o for o in rows if o["layer"] == r["layer"] and o["batch"] == r["batch"] and o["kind"] == "float"]
            best = min(others, key=lambda o: o["ms"], default=None)
            what = r["peer"].removeprefix("ours ")
            line = f"- {r['title']}, batch {r['batch']}, {what}: {r['ms']:.3f} ms, {r['tops']:.2f} {'int8' if int8 else 'fp32'} TOPS"
            if frac is not None:
                line += f" = {frac * 100:.0f}% of the {r['isa']} ceiling"
            if best is not None:
                ratio = r.get(f"vs {best['peer'].split()[0]}")
                line += f"; best torch peer {best['peer']} {best['ms']:.3f} ms: ours {ratio:.2f}x"
            summary.append(line)
    if summary:
        out += ["", "Summary (ours vs the faster torch peer, same rounds):", ""] + summary
    return "\n".join(out) + "\n"
