"""Side-by-side benchmark of fastinfer's Int8Linear against PyTorch's CPU peers.

Shared by `fastinfer bench --suite dense` (fastinfer/cli.py) and the pytest-benchmark suite under bench/.

Method (the machines we run on are shared and noisy, so we quote ratios, never lone times):
  * every peer of a shape runs in the same process on the same input x (fp32 [M, K]) and the same
    nn.Linear weights;
  * correctness is checked before any timing: float peers by SQNR against the fp32 nn.Linear
    output (Int8Linear must reach MIN_SQNR_DB or the shape is aborted), integer peers exactly;
  * timing goes in rounds; in each round every peer runs one batch of calls (a batch lasts about
    `target_s`), in a rotating order, so slow drifts of the machine hit all peers alike; before
    its batch a peer runs untimed for `settle_s`, so each is timed in its own steady state;
  * a peer's time is the median over rounds of its per-call time in that round; "ours vs peer" is
    the median over rounds of t_peer / t_ours measured in the same round (> 1: ours is faster);
  * for small M (weight-streaming shapes) the same rounds also time a few plain reads of a buffer
    as large as the int8 weights; the fastest of them is "read bandwidth", and our weight bytes/s
    are quoted as a fraction of it.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import fastinfer
from fastinfer import _runtime, ops
from fastinfer._runtime import _C
from fastinfer.bench._progress import progress_bar
from fastinfer.bench.guard import CpuGuard

SHAPES: dict[str, tuple[int, int, int]] = {
    "1x4096x4096": (1, 4096, 4096),  # decode, one token
    "16x4096x4096": (16, 4096, 4096),  # small decode batch
    "128x768x3072": (128, 768, 3072),  # BERT-base FFN up-projection, short sequence
    "512x4096x4096": (512, 4096, 4096),  # prefill
    "2048x1024x4096": (2048, 1024, 4096),  # long prefill, narrow model
}

SMALL_M = 16  # M <= SMALL_M: bandwidth-bound shapes, quoted in GB/s of weights
MIN_SQNR_DB = 30.0  # Int8Linear below this aborts the shape
ENGINES = ("onednn", "x86", "fbgemm")  # torch.backends.quantized engines tried for quantize_dynamic

# (rounds, seconds per timed batch, seconds of untimed calls before each batch)
# The settle time must outlast torch's OpenMP spin-wait after the previous peer: 5 ms is not
# enough here (Int8Linear still 1.5x slower right after a torch peer), 20 ms is.
DEFAULT_TIMING = (15, 0.025, 0.025)
QUICK_TIMING = (5, 0.010, 0.020)


# --------------------------------------------------------------------------------------- helpers


def parse_shape(text: str) -> tuple[str, tuple[int, int, int]]:
    """'512x4096x4096' (M x K x N) -> ('512x4096x4096', (512, 4096, 4096))."""
    parts = text.strip().lower().split("x")
    try:
        m, k, n = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"shape {text!r} must be MxKxN, e.g. 16x4096x4096") from None
    if min(m, k, n) < 1:
        raise ValueError(f"shape {text!r}: M, K and N must be positive")
    return f"{m}x{k}x{n}", (m, k, n)


def default_isas() -> list[str]:
    """Detected ISA first, then each lower one this CPU can run down to avx2 (ref is the test oracle,
    not a peer worth timing), highest first."""
    detected, *lower = reversed(fastinfer.available_isas())
    return [detected] + [i for i in lower if i != "ref"]


def supported_engines() -> list[str]:
    return [e for e in ENGINES if e in torch.backends.quantized.supported_engines]


@contextmanager
def isa(name: str | None) -> Iterator[None]:
    """Runs the block with fastinfer's ISA capped at `name`; restores the previous one."""
    prev = fastinfer.set_isa(name)
    try:
        yield
    finally:
        fastinfer.set_isa(prev)


@contextmanager
def quantized_engine(name: str) -> Iterator[None]:
    prev = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = prev


@contextmanager
def _quiet_torch_ao() -> Iterator[None]:
    """torch.ao.quantization warns that it is deprecated (and about quantized tensor creation)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\..*")
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization.*")
        warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*")
        yield


def sqnr_db(y: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    err = (y.double() - ref).pow(2).sum().item()
    sig = ref.pow(2).sum().item()
    if err == 0.0:
        return math.inf
    if not math.isfinite(err):
        return -math.inf
    return 10.0 * math.log10(sig / err)


def exact_int_reference(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a int8 [M, K] @ w int8 [N, K]^T, exactly.

    float64 GEMM is exact here: every product is an integer below 2^14 in magnitude and every
    partial sum stays below K * 128 * 128 < 2^53, so the BLAS result equals the int64 matmul
    (which torch runs without BLAS, too slowly for these shapes).
    """
    k = a.shape[1]
    if k * 128 * 128 >= 2**53:
        return (a.long() @ w.long().T)
    return (a.double() @ w.double().T).round().long()


# ------------------------------------------------------------------------------------------ peers


@dataclass
class Peer:
    name: str
    kind: str  # "float": fp32 in/out peer; "int": integer-only peer; "ours"; "ours-int"; "bw": read probe
    fn: Callable[[], Any]
    context: Callable[[], Any] = nullcontext  # entered around every call and every timed batch
    weight_bytes: int = 0  # bytes of weights streamed per call (for GB/s)
    check: Callable[[], dict] | None = None  # -> {"sqnr": dB} or {"exact": bool}; before timing
    note: str = ""
    isa: str | None = None
    read_bytes: int = 0  # "bw" probes: bytes read per call

    def call(self) -> Any:
        with self.context():
            return self.fn()


@dataclass
class ShapeCase:
    label: str
    M: int
    K: int
    N: int
    peers: list[Peer] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # peer name -> why it could not be built


def _read_probes(nbytes: int) -> list[Peer]:
    """Plain reads of a buffer the size of the int8 weights, a few ways; the fastest one counts.

    The buffer is filled with 0x3F bytes: as float32/float64 those are ordinary numbers (no
    denormals, NaNs or overflow to slow the sums down).
    """
    n = max(nbytes // 256 * 256, 256)  # whole rows of the [64, n] view
    buf = torch.full((n,), 0x3F, dtype=torch.uint8)
    f32 = buf.view(torch.float32)
    f64 = buf.view(torch.float64)
    i64 = buf.view(torch.int64)
    rows = f32.view(64, -1)
    probes = {
        "sum(float32 view)": lambda: f32.sum(),
        "sum(float64 view)": lambda: f64.sum(),
        "sum(float32 [64, n], dim=1)": lambda: rows.sum(dim=1),
        "amax(int64 view)": lambda: i64.amax(),
    }
    return [
        Peer(name=f"read-bw: {k}", kind="bw", fn=fn, read_bytes=n, note=f"{n / 2**20:.1f} MiB buffer")
        for k, fn in probes.items()
    ]


def _ours_name(isa_name: str) -> str:
    kind = "detected" if isa_name == _runtime.detected_isa() else "forced"
    return f"ours Int8Linear [{isa_name}, {kind}]"


def _ours_int_name(isa_name: str) -> str:
    return f"ours int8_matmul_packed [{isa_name}]"


WEIGHT_ONLY = "ours WeightOnlyInt8Linear"
STATIC = "ours StaticInt8Linear"


def _qdyn_name(engine: str) -> str:
    return f"quantize_dynamic [{engine}]"


def peer_names(M: int, isas: Iterable[str] | None = None) -> list[str]:
    """Names of the peers build_peers makes for a shape with M rows (without read-bw probes)."""
    isas = list(isas) if isas is not None else default_isas()
    names = [_ours_name(i) for i in isas]
    names += [STATIC, WEIGHT_ONLY, _ours_int_name(isas[0]), "fp32 nn.Linear", "bf16 nn.Linear"]
    names += [_qdyn_name(e) for e in supported_engines()]
    if M > 16:
        names.append("torch._int_mm")
    return names


def build_peers(
    M: int, K: int, N: int, isas: Iterable[str] | None = None, seed: int = 0, label: str | None = None
) -> ShapeCase:
    """All peers for one shape, on one input and one set of nn.Linear weights.

    Ours: Int8Linear (fp32 in/out, activation quantization included) per ISA in `isas` (default:
    detected, then forced avx512_vnni and avx2 where available), StaticInt8Linear (same int8
    weights, one activation scale), WeightOnlyInt8Linear (same int8 weights, fp32 activations) and the integer core alone (ops.int8_matmul_packed on the same
    packed weights), both on the first of `isas`.
    Peers: fp32 nn.Linear, bf16 nn.Linear, quantize_dynamic per quantized engine, torch._int_mm
    (M > 16 only; integer-only, no activation quantization).
    """
    isas = list(isas) if isas is not None else default_isas()
    label = label or f"{M}x{K}x{N}"
    case = ShapeCase(label, M, K, N)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG alone
        torch.manual_seed(seed)
        lin = nn.Linear(K, N).eval()
        x = torch.randn(M, K)

    with torch.inference_mode():
        ref = lin(x)
    ref_c = ref.clone()

    def float_check(fn: Callable[[], torch.Tensor]) -> Callable[[], dict]:
        def check() -> dict:
            with torch.inference_mode():
                y = fn()
            return {"sqnr": sqnr_db(y.float(), ref_c)}

        return check

    peers: list[Peer] = []

    # --- ours: Int8Linear per ISA
    ours = fastinfer.nn.Int8Linear.from_linear(lin).eval()
    for name in isas:
        peers.append(Peer(
            name=_ours_name(name), kind="ours", isa=name, fn=lambda: ours(x),
            context=lambda n=name: isa(n), weight_bytes=N * K,
            note="fp32 in/out, per-token activation quantization included",
        ))  # fmt: skip
        peers[-1].check = float_check(peers[-1].call)

    # --- ours: static int8 (the same int8 weights, one input scale: max|x| / 127 of this input), detected ISA
    st = fastinfer.nn.StaticInt8Linear.from_int8linear(ours, float(x.abs().max()) / 127.0).eval()
    peers.append(Peer(
        name=STATIC, kind="ours-static", isa=isas[0], fn=lambda: st(x), context=lambda n=isas[0]: isa(n),
        weight_bytes=N * K, note="fp32 in/out, one calibrated activation scale (static): one pass over x",
    ))  # fmt: skip
    peers[-1].check = float_check(peers[-1].call)

    # --- ours: weight-only int8 (the same int8 weights, activations not quantized), detected ISA
    wo = fastinfer.nn.WeightOnlyInt8Linear.from_linear(lin).eval()
    peers.append(Peer(
        name=WEIGHT_ONLY, kind="ours-wo", isa=isas[0], fn=lambda: wo(x), context=lambda n=isas[0]: isa(n),
        weight_bytes=N * K, note="fp32 in/out, int8 weights widened to fp32 (W8A32), activations not quantized",
    ))  # fmt: skip
    peers[-1].check = float_check(peers[-1].call)

    # --- integer operands shared by the integer-only peers
    a_q, _ = ops.quantize_per_token(x)
    w_q = ours.weight_int8
    packed = ours.packed_weight
    int_ref: dict[str, torch.Tensor] = {}

    def exact_check(fn: Callable[[], torch.Tensor]) -> Callable[[], dict]:
        def check() -> dict:
            if "ref" not in int_ref:
                int_ref["ref"] = exact_int_reference(a_q, w_q)
            with torch.inference_mode():
                y = fn()
            return {"exact": bool(y.dtype == torch.int32 and torch.equal(y.long(), int_ref["ref"]))}

        return check

    p = Peer(
        name=_ours_int_name(isas[0]), kind="ours-int", isa=isas[0],
        fn=lambda: ops.int8_matmul_packed(a_q, packed, N), context=lambda n=isas[0]: isa(n),
        weight_bytes=N * K, note="integer core only: int8 in, int32 out (no quantization)",
    )  # fmt: skip
    p.check = exact_check(p.call)
    peers.append(p)

    # --- fp32 / bf16 nn.Linear
    peers.append(Peer(name="fp32 nn.Linear", kind="float", fn=lambda: lin(x), weight_bytes=4 * N * K))
    peers[-1].check = float_check(peers[-1].call)
    lin_bf16 = copy.deepcopy(lin).to(torch.bfloat16)
    x_bf16 = x.to(torch.bfloat16)
    peers.append(Peer(
        name="bf16 nn.Linear", kind="float", fn=lambda: lin_bf16(x_bf16), weight_bytes=2 * N * K,
        note="module and input in bf16",
    ))  # fmt: skip
    peers[-1].check = float_check(peers[-1].call)

    # --- torch.ao dynamic quantization, packed and run under each engine
    for eng in supported_engines():
        try:
            with quantized_engine(eng), _quiet_torch_ao():
                qmod = torch.ao.quantization.quantize_dynamic(
                    nn.Sequential(copy.deepcopy(lin)), {nn.Linear}, dtype=torch.qint8
                ).eval()
        except Exception as e:  # an engine that is listed but cannot pack here
            case.errors[_qdyn_name(eng)] = f"{type(e).__name__}: {e}"
            continue
        p = Peer(
            name=_qdyn_name(eng), kind="float", fn=lambda q=qmod: q(x),
            context=lambda e=eng: quantized_engine(e), weight_bytes=N * K,
            note="qint8 per-tensor weights, dynamic activation quantization",
        )  # fmt: skip
        p.check = float_check(p.call)
        peers.append(p)

    # --- torch._int_mm (needs M > 16)
    if M > 16:
        w_t = w_q.T  # [K, N] column-major view of the same int8 weights
        peers.append(Peer(
            name="torch._int_mm", kind="int", fn=lambda: torch._int_mm(a_q, w_t), weight_bytes=N * K,
            note="integer-only: int8 in, int32 out, no activation quantization",
        ))  # fmt: skip
        peers[-1].check = exact_check(peers[-1].call)

    if M <= SMALL_M:
        peers += _read_probes(N * K)

    case.peers = peers
    return case


# ----------------------------------------------------------------------------------------- timing


def _settle(fn: Callable[[], Any], seconds: float) -> None:
    """Calls fn untimed for at least `seconds` (at least once)."""
    t0 = time.perf_counter()
    fn()
    while time.perf_counter() - t0 < seconds:
        fn()


def settle(peer: Peer, seconds: float = DEFAULT_TIMING[2]) -> None:
    """Runs a peer untimed for `seconds` (inside its context), so what follows sees its steady state."""
    with peer.context():
        _settle(peer.fn, seconds)


def _time_batch(peer: Peer, inner: int, settle_s: float) -> float:
    """Seconds per call for `inner` back-to-back calls (context entered once, around the batch).

    Before timing, the peer runs untimed for at least `settle_s` (one call at least): a call right
    after another library's call can be slower for a while (another runtime's threads still spinning,
    caches holding the other peer's weights), and we time every peer in its own steady state. How a
    layer runs right after a torch op is measured separately (fastinfer/bench/interleaved.py).
    """
    with peer.context():
        _settle(peer.fn, settle_s)
        t0 = time.perf_counter()
        for _ in range(inner):
            peer.fn()
        return (time.perf_counter() - t0) / inner


def calibrate(peer: Peer, target_s: float, settle_s: float) -> int:
    """Calls per batch so that a batch lasts about target_s (after warming the peer up)."""
    est = _time_batch(peer, 1, settle_s)
    if est < target_s / 4:
        est = min(est, _time_batch(peer, 3, 0.0))
    return max(1, round(target_s / max(est, 1e-7)))


def time_peers(
    peers: list[Peer],
    rounds: int,
    target_s: float,
    settle_s: float = DEFAULT_TIMING[2],
    tick: Callable[[], None] | None = None,
    guard: CpuGuard | None = None,
) -> dict[str, list[float]]:
    """Per-call seconds of every peer in every round, peers interleaved in a rotating order. With a
    guard, each round is watched for other processes on the CPU and only clean rounds are returned
    (the caller asks guard.verdict whether enough remain)."""
    plan = {p.name: calibrate(p, target_s, settle_s) for p in peers}
    samples: dict[str, list[float]] = {p.name: [] for p in peers}
    n = len(peers)
    for r in range(rounds):
        order = peers[r % n :] + peers[: r % n]
        with guard.round() if guard is not None else nullcontext():
            for p in order:
                samples[p.name].append(_time_batch(p, plan[p.name], settle_s))
        if tick is not None:
            tick()
    if guard is not None:
        keep = guard.clean_indices()
        samples = {k: [v[i] for i in keep] for k, v in samples.items()}
    return samples


def min_clean_rounds(rounds: int) -> int:
    """Clean rounds a figure needs: half of them, at least 3 (or all, when fewer were asked for)."""
    return min(rounds, max(3, (rounds + 1) // 2))


# A figure this far above a limit measured in the same run is an artefact of the machine (a clock
# that changed speed, another process), not a result: it is reported, never printed as a figure.
LIMIT_SLACK = 1.05


def untrusted(row: dict, peak_tops: dict | None) -> str | None:
    """Why a row's figures exceed what this machine can do (None when they do not)."""
    frac = row.get("bw_frac")
    if row.get("kind") != "bw" and frac is not None and frac > LIMIT_SLACK:
        return f"{frac * 100:.0f}% of the read bandwidth measured in the same rounds"
    peaks = {k: v for k, v in (peak_tops or {}).items() if v}  # an ISA without a probe has None
    peak = peaks.get(row.get("isa") or "") or max(peaks.values(), default=None)
    if row.get("kind") in ("ours", "ours-int", "int") and peak and row.get("tops", 0) > peak * LIMIT_SLACK:
        return f"{row['tops'] / peak * 100:.0f}% of the measured int8 compute ceiling ({peak:.2f} TOPS)"
    return None


# ------------------------------------------------------------------------------------------- run


def _fmt_check(chk: dict) -> str:
    if "sqnr" in chk:
        s = chk["sqnr"]
        return "SQNR inf dB" if s == math.inf else f"SQNR {s:.1f} dB"
    if "exact" in chk:
        return "exact" if chk["exact"] else "NOT EXACT"
    return ""


def run(
    shapes: Iterable[tuple[int, int, int]] | dict[str, tuple[int, int, int]] | None = None,
    isas: Iterable[str] | None = None,
    progress: bool = True,
    quick: bool = False,
    rounds: int | None = None,
    target_s: float | None = None,
) -> list[dict]:
    """Benchmarks every shape; returns one dict per (shape, peer) row (see format_markdown).

    A shape whose Int8Linear misses MIN_SQNR_DB on any ISA is not timed: it yields one row with
    peer "ABORTED" and the reason in "error".
    """
    if shapes is None:
        shapes = SHAPES
    items = list(shapes.items()) if isinstance(shapes, dict) else [(f"{m}x{k}x{n}", (m, k, n)) for m, k, n in shapes]
    d_rounds, d_target, settle_s = QUICK_TIMING if quick else DEFAULT_TIMING
    rounds = rounds or d_rounds
    target_s = target_s or d_target
    isas = list(isas) if isas is not None else default_isas()
    for name in isas:
        if name not in fastinfer.available_isas():
            raise ValueError(f"ISA {name!r} is not available here (available: {fastinfer.available_isas()})")

    results: list[dict] = []
    with progress_bar(len(items) * rounds, "fastinfer bench", "round", progress) as bar:
        for label, (M, K, N) in items:
            bar.set_postfix_str(f"{label}: building peers")
            results += _run_shape(label, M, K, N, isas, rounds, target_s, settle_s, bar)
    return results


def _run_shape(label, M, K, N, isas, rounds, target_s, settle_s, bar) -> list[dict]:
    base = {"shape": label, "M": M, "K": K, "N": N}
    case = build_peers(M, K, N, isas=isas, label=label)
    rows: list[dict] = []

    # correctness first; Int8Linear below MIN_SQNR_DB aborts the shape
    checks: dict[str, dict] = {}
    for p in case.peers:
        if p.check is None:
            continue
        try:
            checks[p.name] = p.check()
        except Exception as e:
            case.errors[p.name] = f"{type(e).__name__}: {e}"
    for p in case.peers:
        if p.kind == "ours" and p.name not in case.errors and checks[p.name]["sqnr"] < MIN_SQNR_DB:
            case.errors[p.name] = f"SQNR {checks[p.name]['sqnr']:.1f} dB < {MIN_SQNR_DB} dB"
    ours_bad = [n for n in case.errors if n.startswith("ours Int8Linear")]
    if ours_bad:
        bar.update(rounds)
        why = "; ".join(f"{n}: {case.errors[n]}" for n in ours_bad)
        return [{**base, "peer": "ABORTED", "kind": "error", "error": f"not timed: {why}"}]

    peers = [p for p in case.peers if p.name not in case.errors]
    bar.set_postfix_str(label)
    guard = CpuGuard()
    with torch.inference_mode():
        samples = time_peers(peers, rounds, target_s, settle_s, tick=bar.update, guard=guard)
    verdict = guard.verdict(min_clean_rounds(rounds))
    if verdict:
        return [{**base, "peer": "NOISY", "kind": "error", "error": verdict}]

    ours_name = next(p.name for p in peers if p.kind == "ours")
    ours_t = samples[ours_name]
    flops = 2.0 * M * N * K
    bw_peers = [p for p in peers if p.kind == "bw"]
    read_bw = max((p.read_bytes / statistics.median(samples[p.name]) for p in bw_peers), default=None)

    for p in peers:
        ts = samples[p.name]
        med = statistics.median(ts)
        row = {
            **base, "peer": p.name, "kind": p.kind, "isa": p.isa, "note": p.note,
            "ms_median": med * 1e3, "ms_min": min(ts) * 1e3, "rounds": len(ts),
            "samples_ms": [t * 1e3 for t in ts], "settle_ms": settle_s * 1e3,
            "baseline": p.name == ours_name,
            "check": _fmt_check(checks.get(p.name, {})), **checks.get(p.name, {}),
        }  # fmt: skip
        if p.kind == "bw":
            row["gbps"] = p.read_bytes / med / 1e9
            row["bw_frac"] = (p.read_bytes / med) / read_bw if read_bw else None
        else:
            row["tops"] = flops / med / 1e12
            # side by side: the ratio in each round, then the median of those ratios
            row["ratio"] = statistics.median(tp / to for tp, to in zip(ts, ours_t))
            if M <= SMALL_M:
                row["gbps"] = p.weight_bytes / med / 1e9
                if p.weight_bytes == N * K and read_bw:
                    row["bw_frac"] = (p.weight_bytes / med) / read_bw
        rows.append(row)
    for name, err in case.errors.items():
        rows.append({**base, "peer": name, "kind": "error", "error": err})
    if read_bw:
        for r in rows:
            r["read_bw_gbps"] = read_bw / 1e9
    return rows


# ---------------------------------------------------------------------------------------- report


def _l3_bytes() -> int | None:
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            s = f.read().strip().upper()
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(s[-1], 1)
        return int(s.rstrip("KMG")) * mult
    except (OSError, ValueError, IndexError):
        return None


def dram_read_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """GB/s of sum() over a float32 view of a buffer far larger than the caches (context only)."""
    buf = torch.full((nbytes,), 0x3F, dtype=torch.uint8).view(torch.float32)
    buf.sum()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def int8_peak_tops(isa_name: str | None = None, seconds: float = 0.05, repeats: int = 5) -> float | None:
    """Register-only int8 multiply-add rate of the active (or given) ISA's dot instruction on all of
    fastinfer's threads (vpdpbusd chains for avx512_vnni, vpmaddwd for avx2), in TOPS (2 ops per
    multiply-add). The compute ceiling a large-M GEMM can approach; None for the ref path."""
    with isa(isa_name) if isa_name else nullcontext():
        if _runtime.active_isa() == "ref":
            return None
        iters = 1000
        while True:
            t0 = time.perf_counter()
            _C.dot_peak(iters)
            if time.perf_counter() - t0 > seconds / 4 or iters > 1 << 30:
                break
            iters *= 4
        best = 0.0
        for _ in range(repeats):
            t0 = time.perf_counter()
            macs = _C.dot_peak(iters)
            best = max(best, 2.0 * macs / (time.perf_counter() - t0) / 1e12)
        return best


def environment_meta(command: str | None = None, dram: bool = True, peaks: bool = True) -> dict:
    info = fastinfer.info()
    meta = {
        "command": command,
        "cpu": info["cpu"],
        "isa_detected": info["isa_detected"],
        "isa_active": info["isa"],
        "isa_available": info["isa_available"],
        "threads": torch.get_num_threads(),
        "fastinfer_threads": info["num_threads"],
        "torch": torch.__version__,
        "fastinfer": info["version"],
        "quantized_engines": supported_engines(),
        "l3_bytes": _l3_bytes(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if dram:
        meta["dram_read_gbps"] = dram_read_bandwidth()
    if peaks:
        meta["peak_tops"] = {name: int8_peak_tops(name) for name in info["isa_available"] if name != "ref"}
    return meta


def report_header(title: str, meta: dict | None) -> list[str]:
    """The first lines of a suite's markdown: its title, the command and the machine (from
    environment_meta)."""
    out = [f"# {title}", ""]
    meta = meta or {}
    if meta.get("command"):
        out.append(f"- command: `{meta['command']}`")
    if meta:
        out.append(f"- CPU: {meta.get('cpu')}; ISA `{meta.get('isa_active')}`; threads {meta.get('threads')}; "
                   f"torch {meta.get('torch')}; fastinfer {meta.get('fastinfer')}; date {meta.get('date')}")  # fmt: skip
    return out


def _f(v: float | None, spec: str, suffix: str = "") -> str:
    return "" if v is None else f"{v:{spec}}{suffix}"


def format_markdown(results: list[dict], meta: dict | None = None) -> str:
    meta = meta or {}
    out: list[str] = ["# fastinfer benchmark: Int8Linear vs PyTorch CPU peers", ""]
    if meta:
        if meta.get("command"):
            out.append(f"- command: `{meta['command']}`")
        out.append(
            f"- CPU: {meta.get('cpu')}; fastinfer ISA detected `{meta.get('isa_detected')}`, "
            f"available {', '.join(meta.get('isa_available', []))}"
        )
        out.append(
            f"- threads: {meta.get('threads')} (torch), {meta.get('fastinfer_threads')} (fastinfer); "
            f"torch {meta.get('torch')}; fastinfer {meta.get('fastinfer')}; quantized engines tried: "
            f"{', '.join(meta.get('quantized_engines', []))}"
        )
        extra = []
        if meta.get("l3_bytes"):
            extra.append(f"L3 {meta['l3_bytes'] / 2**20:.0f} MiB")
        if meta.get("dram_read_gbps"):
            extra.append(f"read bandwidth of a 256 MiB buffer (DRAM, context only): {meta['dram_read_gbps']:.0f} GB/s")
        if extra:
            out.append("- " + "; ".join(extra))
        if meta.get("peak_tops"):
            peaks = ", ".join(f"{k} {v:.2f} TOPS" for k, v in meta["peak_tops"].items() if v)
            out.append(f"- int8 compute ceiling (register-only dot instructions on all threads, this run): {peaks}")
        if meta.get("date"):
            out.append(f"- date: {meta['date']}")
        rounds = next((r.get("rounds") for r in results if r.get("rounds")), None)
        settle = next((r.get("settle_ms") for r in results if r.get("settle_ms")), None)
        out.append(
            f"- method: all peers of a shape in one process, same fp32 input and nn.Linear weights, "
            f"{rounds} rounds with the peers interleaved (rotating order), each peer's timed batch "
            f"preceded by >= {settle or 0:g} ms of its own untimed calls; ms = median per-call time "
            "over rounds; **ours vs peer = median over rounds of t_peer / t_ours** (same round, "
            "> 1 = ours faster), ours = the baseline Int8Linear row (first ISA given; default the detected one). Correctness checked before "
            f"timing (float peers: SQNR vs fp32 nn.Linear, Int8Linear must be >= {MIN_SQNR_DB:.0f} dB; "
            "integer peers: exact vs the integer matmul)."
        )
        out.append("")

    out.append("| shape (MxKxN) | peer | ms (median) | ms (min) | TOPS | ours vs peer | GB/s | % read BW | check |")
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        if r.get("kind") == "error":
            label = "" if r["peer"] == "NOISY" else "ERROR: "
            out.append(f"| {r['shape']} | {r['peer']} | | | | | | | {label}{r['error']} |")
            continue
        why = untrusted(r, meta.get("peak_tops"))
        if why:
            out.append(f"| {r['shape']} | {r['peer']} | | | | | | | NOT TRUSTED, not printed: {why} |")
            continue
        ratio = r.get("ratio")
        ratio_s = "" if ratio is None else ("1.00x (baseline)" if r.get("baseline") else f"{ratio:.2f}x")
        pct = r.get("bw_frac")
        out.append(
            f"| {r['shape']} | {r['peer']} | {r['ms_median']:.3f} | {r['ms_min']:.3f} | {_f(r.get('tops'), '.3f')} "
            f"| {ratio_s} | {_f(r.get('gbps'), '.1f')} | {_f(pct * 100 if pct is not None else None, '.0f', '%')} "
            f"| {r.get('check', '')} |"
        )
    out.append("")
    out += _summary(results, meta)
    out += [
        "",
        "Notes:",
        "- GB/s (M <= 16) = weight bytes per call / time: 1 byte per weight for the int8 peers, 2 for "
        "bf16, 4 for fp32. % read BW is given for the int8-weight rows only: their weights are exactly "
        "as large as the read-bw buffer, which is timed in the same rounds (fastest of the read-bw rows).",
        "- Every peer is timed in its steady state, after the settle time of its own calls. fastinfer's "
        "kernels run on torch's own OpenMP team, so a layer right after a torch op runs as fast as "
        "alone: the interleaved rows below measure it.",
        "- Every peer is timed warm (its weights reused call after call). Where the int8 weights fit in "
        "the L3 cache and the fp32 ones do not, small-M results are partly a cache effect: in a model "
        "with many layers the weights come from DRAM.",
        "- torch._int_mm is integer-only (int8 in, int32 out, no activation quantization, no scales); "
        "compare it with `ours int8_matmul_packed`, the same integer work, not with Int8Linear. "
        "It needs M > 16, so it is absent for the small shapes.",
        "- quantize_dynamic is packed and run with torch.backends.quantized.engine set to the named "
        "engine (set again before every timed batch).",
    ]
    return "\n".join(out) + "\n"


def _paired_ratio(peer: dict, ours: dict) -> float:
    """Median over rounds of t_peer / t_ours (both rows from the same rounds)."""
    return statistics.median(a / b for a, b in zip(peer["samples_ms"], ours["samples_ms"]))


def _summary(results: list[dict], meta: dict) -> list[str]:
    lines = ["Summary (ours = the baseline Int8Linear row):", ""]
    shapes = list(dict.fromkeys(r["shape"] for r in results))
    for s in shapes:
        rows = [r for r in results if r["shape"] == s]
        if any(r.get("kind") == "error" and r["peer"] in ("ABORTED", "NOISY") for r in rows):
            lines.append(f"- {s}: {rows[0]['peer']} ({rows[0]['error']})")
            continue
        ours = next((r for r in rows if r.get("baseline")), None)
        if ours is None:
            continue
        bad = [f"{r['peer']}: {why}" for r in rows if (why := untrusted(r, meta.get("peak_tops")))]
        if bad:
            lines.append(f"- {s}: figures not trusted ({'; '.join(bad)})")
            continue
        M = ours["M"]
        floats = [r for r in rows if r["kind"] == "float"]
        best = max(floats, key=lambda r: r["tops"], default=None)
        txt = f"- {s}: ours {ours['ms_median']:.3f} ms, {ours['tops']:.2f} TOPS"
        peak = (meta.get("peak_tops") or {}).get(ours.get("isa") or "")
        if peak and M > SMALL_M:
            txt += f" = {ours['tops'] / peak * 100:.0f}% of the {ours['isa']} ceiling ({peak:.2f} TOPS)"
        if best is not None:
            txt += f"; best fp32-in/out peer {best['peer']} ({best['tops']:.2f} TOPS): ours {best['ratio']:.2f}x"
        if M <= SMALL_M and ours.get("bw_frac") is not None:
            txt += (
                f"; ours streams weights at {ours['gbps']:.0f} GB/s = {ours['bw_frac'] * 100:.0f}% of "
                f"read bandwidth ({ours['read_bw_gbps']:.0f} GB/s, same-size buffer)"
            )
        oi = next((r for r in rows if r["kind"] == "ours-int"), None)
        im = next((r for r in rows if r["kind"] == "int"), None)
        if oi is not None and im is not None:
            txt += (
                f"; integer-only: ours int8_matmul_packed {oi['tops']:.2f} TOPS vs torch._int_mm "
                f"{im['tops']:.2f} TOPS: ours {_paired_ratio(im, oi):.2f}x"
            )
        lines.append(txt)
    return lines
