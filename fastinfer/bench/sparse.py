"""Side-by-side benchmark of the sparse layers (`fastinfer bench --suite sparse`).

Same method as fastinfer.bench.ops (peers interleaved round by round in one process, each after its
own untimed settle calls, ratios = median over rounds of per-round time ratios). For every weight
shape, sparsity and pattern, the weights are pruned once with fastinfer.prune (magnitude) and every
peer multiplies the same pruned weights:

  dense fp32 nn.Linear | ours dense Int8Linear | torch CSR (weight.to_sparse_csr(), fp32) |
  ours SparseLinear (fp32 csr and ell) | ours SparseInt8Linear (csr and ell / block / 2:4, per pattern)

Correctness before timing: SparseInt8Linear must equal the dense Int8Linear bit for bit, the float
peers must match fp32 nn.Linear to 1e-4 relative. Small M rows also report the compressed weight
bytes per second against the read bandwidth of a buffer of the dense int8 weight size.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

import fastinfer
from fastinfer.bench._progress import progress_bar
from fastinfer.bench.guard import CpuGuard
from fastinfer.bench.ops import LIMIT_SLACK, Peer, _read_probes, min_clean_rounds, sqnr_db, time_peers
from fastinfer.nn import Int8Linear, SparseInt8Linear, SparseLinear

WEIGHT_SHAPES = ((4096, 4096), (768, 3072))  # (K, N)
SPARSITIES = (0.5, 0.75, 0.9, 0.95)
MS = (1, 16, 128, 512)
SMALL_M = 16
TIMING = (5, 0.02, 0.02)  # rounds, seconds per timed batch, settle seconds
MAX_CALL_S = 0.5  # a peer slower than this per call is reported, not timed


@dataclass(frozen=True)
class Case:
    K: int
    N: int
    pattern: str  # "unstructured", "block", "2:4"
    sparsity: float
    block: tuple[int, int] = (16, 64)  # tile shape for pattern "block" (prune's default)

    @property
    def label(self) -> str:
        return f"block {self.block[0]}x{self.block[1]}" if self.pattern == "block" else self.pattern


def default_cases(shapes=WEIGHT_SHAPES, sparsities=SPARSITIES) -> list[Case]:
    cases = []
    for K, N in shapes:
        for s in sparsities:
            cases.append(Case(K, N, "unstructured", s))
            cases.append(Case(K, N, "block", s))
        cases.append(Case(K, N, "block", 0.75, (64, 64)))  # 4 channel blocks share tiles: full VNNI tile
        cases.append(Case(K, N, "2:4", 0.5))
    return cases


def _pruned_linear(case: Case, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(case.K, case.N).eval()
    pattern = {"unstructured": "unstructured", "block": "block", "2:4": "2:4"}[case.pattern]
    extra = {"block": case.block} if case.pattern == "block" else {}
    return fastinfer.prune(lin, case.sparsity, pattern=pattern, inplace=True, progress=False, **extra)


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _csr_call(bias: torch.Tensor, w_csr: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.addmm(bias, w_csr, xt).T


def peer_names(pattern: str) -> list[str]:
    """The peers _peers builds for a pattern (for test ids)."""
    names = ["fp32 nn.Linear (dense)", "ours Int8Linear (dense)", "torch CSR fp32"]
    if pattern == "unstructured":
        return names + ["ours SparseLinear (csr fp32)", "ours SparseLinear (ell fp32)", "ours SparseInt8Linear (csr)",
                        "ours SparseInt8Linear (ell)"]  # fmt: skip
    return names + [f"ours SparseInt8Linear ({'block' if pattern == 'block' else '2:4'})"]


def _peers(case: Case, M: int, layers: dict) -> tuple[list[Peer], dict[str, str], dict[str, str]]:
    lin, dense8, sparse_f32, sparse8, w_csr = (layers[k] for k in ("lin", "dense8", "sf32", "s8", "csr"))
    x = torch.randn(M, case.K, generator=torch.Generator().manual_seed(M))
    xt = x.T.contiguous()
    bias = lin.bias.detach()[:, None]
    ref = lin(x)
    ref8 = dense8(x)
    peers: list[Peer] = []
    checks: dict[str, str] = {}
    errors: dict[str, str] = {}

    def add(name, kind, fn, wbytes, check):
        try:
            c = check()
        except Exception as e:  # a peer that cannot run is reported, not fatal
            errors[name] = f"{type(e).__name__}: {e}"
            return
        peers.append(Peer(name=name, kind=kind, fn=fn, weight_bytes=wbytes))
        checks[name] = c

    def close(fn):
        def chk():
            err = _rel_err(fn(), ref)
            if err > 1e-4:
                raise AssertionError(f"max relative error {err:.2e} vs fp32 nn.Linear")
            return f"rel err {err:.1e}"

        return chk

    def exact(fn):
        def chk():
            if not torch.equal(fn(), ref8):
                raise AssertionError("differs from the dense Int8Linear")
            return "= Int8Linear"

        return chk

    nk = case.N * case.K
    add("fp32 nn.Linear (dense)", "float", lambda: lin(x), 4 * nk, lambda: "reference")
    add("ours Int8Linear (dense)", "dense8", lambda: dense8(x), nk, lambda: f"SQNR {sqnr_db(ref8, ref):.1f} dB")
    add("torch CSR fp32", "float", lambda: _csr_call(bias, w_csr, xt), layers["csr_bytes"],
        close(lambda: _csr_call(bias, w_csr, xt)))  # fmt: skip
    for fmt, layer in sparse_f32.items():
        add(f"ours SparseLinear ({fmt} fp32)", "ours", lambda layer=layer: layer(x), layer.sparse_weight.numel(),
            close(lambda layer=layer: layer(x)))  # fmt: skip
    for fmt, layer in sparse8.items():
        add(f"ours SparseInt8Linear ({fmt})", "ours8", lambda layer=layer: layer(x), layer.sparse_weight.numel(),
            exact(lambda layer=layer: layer(x)))  # fmt: skip
    # drop peers too slow to time in rounds (reported with their single-call time)
    kept = []
    for p in peers:
        t0 = time.perf_counter()
        p.fn()
        dt = time.perf_counter() - t0
        if dt > MAX_CALL_S:
            errors[p.name] = f"not timed: {dt:.2f} s per call"
        else:
            kept.append(p)
    return kept, checks, errors


def _layers(case: Case) -> dict:
    lin = _pruned_linear(case)
    dense8 = Int8Linear.from_linear(lin).eval()
    w = lin.weight.detach()
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        csr = w.to_sparse_csr()
    out = {"lin": lin, "dense8": dense8, "csr": csr,
           "csr_bytes": csr.values().numel() * 4 + csr.col_indices().numel() * 8 + csr.crow_indices().numel() * 8}  # fmt: skip
    fp32_fmts = ("csr", "ell") if case.pattern == "unstructured" else ()
    out["sf32"] = {f: SparseLinear.from_linear(lin, f) for f in fp32_fmts}
    fmts = {"unstructured": ("csr", "ell"), "block": ("block",), "2:4": ("2:4",)}[case.pattern]
    out["s8"] = {f: SparseInt8Linear.from_int8linear(dense8, f) for f in fmts}
    return out


def run(cases: Iterable[Case] | None = None, ms: Iterable[int] = MS, progress: bool = True,
        timing: tuple[int, float, float] = TIMING) -> list[dict]:  # fmt: skip
    cases = list(cases) if cases is not None else default_cases()
    ms = list(ms)
    rounds, target_s, settle_s = timing
    rows: list[dict] = []
    with progress_bar(len(cases) * len(ms), "fastinfer bench (sparse)", "case", progress) as bar:
        for case in cases:
            with torch.no_grad():
                layers = _layers(case)
            for M in ms:
                bar.set_postfix_str(f"{case.label} {case.sparsity:.0%} M={M} {case.K}x{case.N}")
                rows += _run_one(case, M, layers, rounds, target_s, settle_s)
                bar.update(1)
    return rows


def _run_one(case: Case, M: int, layers: dict, rounds: int, target_s: float, settle_s: float) -> list[dict]:
    with torch.inference_mode():
        peers, checks, errors = _peers(case, M, layers)
        probes = _read_probes(case.N * case.K) if M <= SMALL_M else []
        guard = CpuGuard()
        samples = time_peers(peers + probes, rounds, target_s, settle_s, guard=guard)
    base = {"K": case.K, "N": case.N, "M": M, "pattern": case.label, "sparsity": case.sparsity}
    verdict = guard.verdict(min_clean_rounds(rounds))
    if verdict:
        return [{**base, "peer": "NOISY", "kind": "error", "error": verdict}]
    read_bw = max((p.read_bytes / statistics.median(samples[p.name]) for p in probes), default=None)
    ref_names = ("fp32 nn.Linear (dense)", "ours Int8Linear (dense)", "torch CSR fp32")
    rows = []
    for p in peers:
        ts = samples[p.name]
        row = {**base, "peer": p.name, "kind": p.kind, "ms": statistics.median(ts) * 1e3,
               "check": checks[p.name], "samples_ms": [t * 1e3 for t in ts]}  # fmt: skip
        if p.kind in ("ours", "ours8"):
            for rn in ref_names:
                if rn in samples:
                    row[f"vs {rn}"] = statistics.median(a / b for a, b in zip(samples[rn], ts))
            if M <= SMALL_M and read_bw:
                row["gbps"] = p.weight_bytes / statistics.median(ts) / 1e9
                row["bw_frac"] = row["gbps"] * 1e9 / read_bw
        rows.append(row)
    for name, err in errors.items():
        rows.append({**base, "peer": name, "kind": "error", "error": err})
    return rows


def format_markdown(rows: list[dict], meta: dict | None = None) -> str:
    meta = meta or {}
    out = ["# fastinfer sparse benchmark", ""]
    if meta:
        out.append(f"- command: `{meta.get('command')}`")
        out.append(f"- CPU: {meta.get('cpu')}; ISA `{meta.get('isa_active')}`; threads {meta.get('threads')}; "
                   f"torch {meta.get('torch')}; date {meta.get('date')}")  # fmt: skip
    out.append(
        f"- method: per case, all peers in one process on the same pruned weights (fastinfer.prune, "
        f"magnitude), {TIMING[0]} interleaved rounds, ratios = median over rounds of t_peer / t_ours "
        "(> 1: ours faster). SparseInt8Linear checked equal to the dense Int8Linear before timing; "
        "float peers within 1e-4 relative of fp32 nn.Linear. GB/s = stored sparse bytes per second "
        "(M <= 16), % = of the read bandwidth of a buffer the size of the dense int8 weights, same rounds."
    )
    out += ["", "| K x N | pattern | sparsity | M | peer | ms | vs fp32 dense | vs Int8Linear | vs torch CSR | GB/s | % read BW | check |",
            "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in rows:
        head = f"| {r['K']}x{r['N']} | {r['pattern']} | {r['sparsity']:.0%} | {r['M']} | {r['peer']} "
        if r["kind"] == "error":
            out.append(head + f"| | | | | | | {r['error']} |")
            continue

        def ratio(key):
            v = r.get(key)
            return "" if v is None else f"{v:.2f}x"

        gb = r.get("gbps")
        pct = r.get("bw_frac")
        check = r["check"]
        if pct is not None and pct > LIMIT_SLACK:  # above the read bandwidth measured in the same rounds
            check += f"; GB/s not printed: {pct * 100:.0f}% of the read bandwidth (cache or noise, not streaming)"
            gb = pct = None
        out.append(
            head + f"| {r['ms']:.3f} | {ratio('vs fp32 nn.Linear (dense)')} | {ratio('vs ours Int8Linear (dense)')} "
            f"| {ratio('vs torch CSR fp32')} | {'' if gb is None else f'{gb:.0f}'} "
            f"| {'' if pct is None else f'{pct * 100:.0f}%'} | {check} |"
        )
    return "\n".join(out) + "\n"
