"""`fastinfer bench --suite attention`: the fused attention kernel beside torch's SDPA on the shapes
real models hand it.

Each case takes q, k and v the way a transformer does: heads sliced out of one [batch, tokens,
3 * heads * d] projection (strided views), a padding mask where the model has one, and the output
wanted as [batch, tokens, heads, d] (what the output projection reads). The peers:

  torch SDPA   F.scaled_dot_product_attention on the views, then .transpose(1, 2).contiguous()
               (exactly what transformers' "sdpa" attention does)
  fastinfer    fastinfer's kernel on the same views (it writes that layout directly), called as the
               converted models call it (fastinfer.convert.attention: the op's CPU kernel without
               the dispatcher in eager calls)

Both run in fp32 and in bf16, and fastinfer once more on fp32 tensors with its products in bf16
(QuantConfig(attention="bf16"); SDPA in fp32 there). The limit quoted is a matmul's: torch's fp32 (or bf16) matmul of
1024^3 measured in the same rounds, GFLOP/s; attention does 4 * b * h * lq * lk * d FLOPs (2 for
q.k, 2 for p.v; causal: about half). Rounds interleave the peers; a round in which another process
used the CPU is dropped (fastinfer.bench.guard). Each case is checked against float64 SDPA first.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastinfer.bench._progress import progress_bar
from fastinfer.bench.guard import CpuGuard
from fastinfer.bench.ops import Peer, min_clean_rounds, report_header, time_peers
from fastinfer.convert import attention as hf_attention

__all__ = ["CASES", "format_markdown", "run"]


@dataclass(frozen=True)
class Case:
    label: str  # where the shape comes from
    b: int
    h: int
    lq: int
    lk: int
    d: int
    padded: bool = False  # a bool padding mask (rows of real tokens of varying length)
    causal: bool = False


CASES = (
    Case("MiniLM 8x128 (padded)", 8, 12, 128, 128, 32, padded=True),
    Case("MiniLM 32x16 (padded)", 32, 12, 16, 16, 32, padded=True),
    Case("BERT-base 8x128 (padded)", 8, 12, 128, 128, 64, padded=True),
    Case("GPT-2 prompt 1x512, causal", 1, 12, 512, 512, 64, causal=True),
    Case("GPT-2 decode b1, 1 query over 48 keys", 1, 12, 1, 48, 64),
    Case("GPT-2 decode b8, 1 query over 48 keys", 8, 12, 1, 48, 64),
)

DEFAULT_TIMING = (9, 0.05, 0.02)  # rounds, seconds per timed batch, settle seconds
QUICK_TIMING = (3, 0.02, 0.01)


def _inputs(c: Case, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    if c.lq == c.lk:
        x = torch.randn(c.b, c.lq, 3 * c.h * c.d, generator=g).to(dtype)
        q, k, v = (t.view(c.b, c.lq, c.h, c.d).transpose(1, 2) for t in x.split(c.h * c.d, -1))
    else:  # decoding: one new query, keys and values from a cache [batch, heads, keys, d]
        q = torch.randn(c.b, c.lq, c.h * c.d, generator=g).to(dtype).view(c.b, c.lq, c.h, c.d).transpose(1, 2)
        k, v = (torch.randn(c.b, c.h, c.lk, c.d, generator=g).to(dtype) for _ in range(2))
    mask = None
    if c.padded:
        lengths = torch.randint(c.lk // 3, c.lk + 1, (c.b,), generator=g)
        lengths[0] = c.lk
        mask = (torch.arange(c.lk)[None, :] < lengths[:, None])[:, None, None, :].expand(c.b, 1, c.lq, c.lk).contiguous()
    return q, k, v, mask


def _flops(c: Case) -> float:
    pairs = c.lq * c.lk if not c.causal else c.lq * (c.lq + 1) / 2
    return 4.0 * c.b * c.h * pairs * c.d


def run(quick: bool = False, rounds: int | None = None, progress: bool = True,
        cases: tuple[Case, ...] = CASES) -> list[dict]:  # fmt: skip
    d_rounds, target_s, settle_s = QUICK_TIMING if quick else DEFAULT_TIMING
    rounds = rounds or d_rounds
    results = []
    n = 1024
    mm = {dt: (torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)) for dt in (torch.float32, torch.bfloat16)}
    # fp32, bf16, and fp32 tensors with bf16 products (ops.attention's bf16=True; matmul limit: bf16's)
    modes = ((torch.float32, False), (torch.bfloat16, False), (torch.float32, True))
    with progress_bar(len(modes) * len(cases) * rounds, "fastinfer bench attention", "round", progress) as bar:
        for c in cases:
            for dtype, bf16 in modes:
                bar.set_postfix_str(f"{c.label} {str(dtype)[6:]}{' bf16 math' if bf16 else ''}")
                limit = mm[torch.bfloat16 if bf16 else dtype]
                results.append(_run_case(c, dtype, rounds, target_s, settle_s, limit, bar.update, bf16))
    return results


def _run_case(c: Case, dtype, rounds, target_s, settle_s, mm, tick: Callable, bf16: bool = False) -> dict:
    from fastinfer.ops.attention import attention_native

    q, k, v, mask = _inputs(c, dtype)
    scale = c.d**-0.5

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=c.causal).transpose(1, 2).contiguous()

    def ours():
        return hf_attention._kernel(q, k, v, mask, scale, c.causal, bf16)

    with torch.inference_mode():
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask,
                                             is_causal=c.causal).transpose(1, 2)  # fmt: skip
        err = {name: (fn().double() - ref).abs().max().item() for name, fn in (("torch SDPA", sdpa), ("fastinfer", ours))}
        a, b = mm
        peers = [Peer("torch SDPA", "float", sdpa), Peer("fastinfer", "ours", ours),
                 Peer("matmul", "limit", lambda: a @ b)]  # fmt: skip
        guard = CpuGuard()
        samples = time_peers(peers, rounds, target_s, settle_s, tick=tick, guard=guard)
    verdict = guard.verdict(min_clean_rounds(rounds))
    row = {"case": c.label, "dtype": str(dtype).replace("torch.", "") + (" (bf16 math)" if bf16 else ""), "shape": f"{c.b}x{c.h}x{c.lq}x{c.lk}x{c.d}",
           "err": err, "verdict": verdict, "native": attention_native()}  # fmt: skip
    if verdict is None and samples["fastinfer"]:
        t = {name: statistics.median(v) for name, v in samples.items()}
        row["ms"] = {name: t[name] * 1e3 for name in ("torch SDPA", "fastinfer")}
        row["speedup"] = statistics.median(s / o for s, o in zip(samples["torch SDPA"], samples["fastinfer"]))
        limit = _matmul_flops(mm) / t["matmul"]
        row["gflops"] = {name: _flops(c) / t[name] / 1e9 for name in ("torch SDPA", "fastinfer")}
        row["limit_gflops"] = limit / 1e9
    return row


def _matmul_flops(mm) -> float:
    a, b = mm
    return 2.0 * a.shape[0] * a.shape[1] * b.shape[1]


def format_markdown(rows: list[dict], meta: dict | None = None) -> str:
    meta = meta or {}
    out = report_header("fastinfer benchmark: attention, fused kernel vs torch's SDPA", meta)
    out += [
        "- shape = batch x heads x queries x keys x head size; q/k/v are strided views of one projection (or a "
        "cache), output [batch, tokens, heads, d] for both peers; speedup = median over interleaved rounds of "
        "t(SDPA) / t(fastinfer); GFLOP/s counts 4 b h lq lk d (causal: half); limit = torch's 1024^3 matmul "
        "in the same dtype and rounds (bf16 for the bf16-math rows); max err = vs float64 SDPA; \"float32 (bf16 "
        "math)\": fp32 tensors, the kernel's products in bf16 (QuantConfig(attention='bf16')), SDPA in fp32.",
        "",
        "| case | dtype | shape | SDPA ms | fastinfer ms | speedup | SDPA GFLOP/s | ours GFLOP/s | % of matmul | "
        "max err SDPA / ours |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        err = f"{r['err']['torch SDPA']:.1e} / {r['err']['fastinfer']:.1e}"
        if r.get("verdict") or "ms" not in r:
            out.append(f"| {r['case']} | {r['dtype']} | {r['shape']} | | | {r.get('verdict') or 'no clean rounds'} | | | | {err} |")
            continue
        ms, gf = r["ms"], r["gflops"]
        out.append(
            f"| {r['case']} | {r['dtype']} | {r['shape']} | {ms['torch SDPA']:.3f} | {ms['fastinfer']:.3f} "
            f"| {r['speedup']:.2f}x | {gf['torch SDPA']:.0f} | {gf['fastinfer']:.0f} "
            f"| {gf['fastinfer'] / r['limit_gflops'] * 100:.0f}% | {err} |"
        )
    if rows and not rows[0].get("native", True):
        out += ["", "The active ISA has no attention kernel of its own: the fastinfer rows ran the scalar reference "
                "(converted models keep torch's SDPA on such a CPU)."]  # fmt: skip
    return "\n".join(out) + "\n"
