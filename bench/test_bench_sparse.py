"""Sparse layers vs dense fp32, dense Int8Linear and torch CSR, one pytest-benchmark group per case.

    pytest bench/test_bench_sparse.py --benchmark-only --benchmark-columns=min,median

A reduced grid of fastinfer.bench.sparse (4096 x 4096, M in {1, 16, 512}); every peer is checked
before it is timed (SparseInt8Linear equal to Int8Linear, float peers within 1e-4 relative; the
check goes to extra_info). Cases run back to back, not interleaved: for the ratios we quote use
`fastinfer bench --suite sparse`.
"""

from __future__ import annotations

import pytest
import torch

from fastinfer.bench import sparse as bs

pytestmark = [pytest.mark.benchmark(min_rounds=5, warmup=True, warmup_iterations=2)]

CASES = [bs.Case(4096, 4096, "unstructured", 0.9), bs.Case(4096, 4096, "block", 0.75), bs.Case(4096, 4096, "2:4", 0.5)]
MS = (1, 16, 512)
PARAMS = [
    pytest.param(case, M, name, id=f"{case.pattern}-{case.sparsity:.0%}-M{M}-{name}")
    for case in CASES
    for M in MS
    for name in bs.peer_names(case.pattern)
]

_layers_cache: dict[bs.Case, dict] = {}


def _peers(case: bs.Case, M: int):
    if case not in _layers_cache:
        _layers_cache.clear()
        with torch.no_grad():
            _layers_cache[case] = bs._layers(case)
    with torch.inference_mode():
        return bs._peers(case, M, _layers_cache[case])


@pytest.mark.parametrize(("case", "M", "peer_name"), PARAMS)
def test_sparse(benchmark, case: bs.Case, M: int, peer_name: str) -> None:
    peers, checks, errors = _peers(case, M)
    if peer_name in errors:
        if peer_name.startswith("ours"):
            pytest.fail(f"{peer_name}: {errors[peer_name]}")
        pytest.skip(errors[peer_name])
    peer = next(p for p in peers if p.name == peer_name)
    benchmark.group = f"{case.pattern} {case.sparsity:.0%} {case.K}x{case.N} M={M}"
    benchmark.extra_info["check"] = checks[peer_name]
    with torch.inference_mode():
        benchmark(peer.fn)
