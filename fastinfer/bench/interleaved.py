"""Layers timed right after a torch op, as they run inside a model (the "interleaved" rows of
`fastinfer bench --suite ops`).

A layer alone in a loop hides what a model does to it: the op before it leaves torch's OpenMP
workers spinning and its output's memory freshly freed. For each shape and op (GELU, LayerNorm, add
on a tensor as large as the layer's output) this times, in the same rounds and interleaved: the op
alone, the layer alone, and the op followed by the layer. penalty = median over rounds of
t(op; layer) / (t(op) + t(layer)): 1.00 means the layer runs inside a model as fast as alone.
Minor page faults per (op; layer) step are counted in the steady state (after warm-up): fresh
pages for every output would cost ~1 us each.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import fastinfer
from fastinfer.bench._progress import progress_bar
from fastinfer.bench.guard import CpuGuard

SHAPES = ((1, 4096, 4096), (128, 768, 3072), (512, 384, 1536))
OPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": lambda t: nn.functional.gelu(t),
    "layer_norm": lambda t: nn.functional.layer_norm(t, t.shape[-1:]),
    "add": lambda t: t + t,
}
TARGET_PENALTY = 1.10


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _batch(fn: Callable[[], Any], calls: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def layers_for(K: int, N: int, seed: int = 0) -> dict[str, nn.Module]:
    """The dense Int8Linear, and where this CPU has a fast sparse path, a 90%-sparse int8 layer."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lin = nn.Linear(K, N).eval()
    out = {"Int8Linear": fastinfer.nn.Int8Linear.from_linear(lin)}
    with torch.no_grad():
        w = lin.weight.clone()
        thr = w.abs().flatten().kthvalue(int(w.numel() * 0.9)).values
        w[w.abs() <= thr] = 0
        lin.weight.copy_(w)
    sparse = fastinfer.sparsify(fastinfer.quantize(lin))
    if isinstance(sparse, fastinfer.nn.SparseInt8Linear):
        out[f"SparseInt8Linear {sparse.format} 90%"] = sparse
    return out


def run(shapes=SHAPES, ops: tuple[str, ...] = tuple(OPS), rounds: int = 7, target_s: float = 0.02,
        progress: bool = True) -> list[dict]:  # fmt: skip
    rows: list[dict] = []
    items = [(s, name, layer) for s in shapes for name, layer in layers_for(s[1], s[2]).items()]
    with progress_bar(len(items) * len(ops), "fastinfer bench interleaved", "case", progress) as bar:
        for (M, K, N), lname, layer in items:
            x = torch.randn(M, K)
            big = torch.randn(M, N)
            for opname in ops:
                op = OPS[opname]
                keep: dict[str, torch.Tensor] = {}

                def pair(op=op, layer=layer, keep=keep):
                    keep["a"] = op(big)
                    keep["b"] = layer(x)

                fns = {"op": lambda op=op: op(big), "layer": lambda layer=layer: layer(x), "pair": pair}
                with torch.inference_mode():
                    calls = {k: max(1, round(target_s / max(_batch(f, 3), 1e-7))) for k, f in fns.items()}
                    guard = CpuGuard()
                    samples: dict[str, list[float]] = {k: [] for k in fns}
                    faults = []
                    for r in range(rounds):
                        order = list(fns)[r % 3:] + list(fns)[: r % 3]
                        with guard.round():
                            for k in order:
                                if k == "pair":
                                    f0 = _faults()
                                    samples[k].append(_batch(fns[k], calls[k]))
                                    faults.append((_faults() - f0) / (calls[k] + 1))
                                else:
                                    samples[k].append(_batch(fns[k], calls[k]))
                clean = guard.clean_indices()
                verdict = guard.verdict(max(3, rounds // 2))
                row = {"shape": f"{M}x{K}x{N}", "layer": lname, "op": opname, "verdict": verdict,
                       "faults": statistics.median(faults)}  # fmt: skip
                if verdict is None:
                    row.update(
                        op_us=statistics.median(samples["op"][i] for i in clean) * 1e6,
                        layer_us=statistics.median(samples["layer"][i] for i in clean) * 1e6,
                        pair_us=statistics.median(samples["pair"][i] for i in clean) * 1e6,
                        penalty=statistics.median(
                            samples["pair"][i] / (samples["op"][i] + samples["layer"][i]) for i in clean
                        ),
                    )
                rows.append(row)
                bar.update(1)
    return rows


def format_markdown(rows: list[dict]) -> str:
    out = [
        "## Interleaved: each layer right after a torch op (as inside a model)",
        "",
        "penalty = median over rounds of t(op; layer) / (t(op) + t(layer)), all three timed in the same "
        f"rounds; target <= {TARGET_PENALTY:.2f}. faults = minor page faults per (op; layer) step in the "
        "steady state.",
        "",
        "| shape (MxKxN) | layer | op | op us | layer us | op; layer us | penalty | faults/step |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    noisy = [r["verdict"] for r in rows if r["verdict"]]
    for r in rows:
        if r["verdict"]:
            out.append(f"| {r['shape']} | {r['layer']} | {r['op']} | | | | NOISY | {r['faults']:.0f} |")
            continue
        out.append(
            f"| {r['shape']} | {r['layer']} | {r['op']} | {r['op_us']:.1f} | {r['layer_us']:.1f} | "
            f"{r['pair_us']:.1f} | {r['penalty']:.2f} | {r['faults']:.0f} |"
        )
    if noisy:
        out += ["", f"NOISY rows: {noisy[0]}"]
    return "\n".join(out) + "\n"
