"""Int8Linear vs PyTorch's CPU peers, one pytest-benchmark group per shape.

    pytest bench/ --benchmark-only --benchmark-columns=min,median,mean

Each case checks its peer before timing it: float peers by SQNR against fp32 nn.Linear
(Int8Linear must reach fastinfer.bench.ops.MIN_SQNR_DB), integer peers exactly. The SQNR is stored in
the benchmark's extra_info. For the interleaved, ratio-based report use `fastinfer bench`.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastinfer.bench import ops as bench_ops

pytestmark = [pytest.mark.benchmark(min_rounds=5, warmup=True, warmup_iterations=2)]

CASES = [
    pytest.param(label, name, id=f"{label}-{name}")
    for label, (M, _K, _N) in bench_ops.SHAPES.items()
    for name in bench_ops.peer_names(M)
]

_cache: dict[str, bench_ops.ShapeCase] = {}


def _case(label: str) -> bench_ops.ShapeCase:
    """Peers of one shape, built once; cases run shape by shape, so only one shape is kept."""
    if label not in _cache:
        _cache.clear()
        M, K, N = bench_ops.SHAPES[label]
        _cache[label] = bench_ops.build_peers(M, K, N, label=label)
    return _cache[label]


@pytest.mark.parametrize(("shape", "peer_name"), CASES)
def test_linear(benchmark, shape: str, peer_name: str) -> None:
    case = _case(shape)
    if peer_name in case.errors:
        pytest.skip(f"{peer_name} unavailable: {case.errors[peer_name]}")
    peer = next(p for p in case.peers if p.name == peer_name)

    result = peer.check()
    if "sqnr" in result:
        benchmark.extra_info["sqnr_db"] = round(result["sqnr"], 2) if math.isfinite(result["sqnr"]) else "inf"
        if peer.kind == "ours":
            assert result["sqnr"] >= bench_ops.MIN_SQNR_DB, f"{peer_name}: SQNR {result['sqnr']:.1f} dB"
        else:
            assert result["sqnr"] > 0, f"{peer_name}: output unrelated to the fp32 reference"
    else:
        assert result["exact"], f"{peer_name}: not equal to the exact integer matmul"
        benchmark.extra_info["exact"] = True

    M, K, N = case.M, case.K, case.N
    benchmark.group = shape
    benchmark.extra_info.update(shape=shape, peer=peer_name, kind=peer.kind, note=peer.note)
    with torch.inference_mode(), peer.context():  # quantized engine / fastinfer ISA for this peer
        # torch's OpenMP threads spin for a while after the previous case; let them go to sleep
        bench_ops.settle(peer)
        benchmark(peer.fn)
    stats = benchmark.stats.stats if benchmark.stats is not None else None
    if stats is not None:
        benchmark.extra_info["tops_median"] = round(2.0 * M * N * K / stats.median / 1e12, 4)
        if M <= bench_ops.SMALL_M:
            benchmark.extra_info["weight_gbps_median"] = round(peer.weight_bytes / stats.median / 1e9, 2)
