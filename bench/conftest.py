"""pytest-benchmark suite: `pytest bench/ --benchmark-only` (see bench/README.md)."""

from __future__ import annotations

import pytest
import torch

BENCH_THREADS = 2


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(BENCH_THREADS)  # fastinfer follows torch's thread count


@pytest.fixture(autouse=True)
def _bench_threads():
    """Keeps every benchmark on BENCH_THREADS even if something in between changed it."""
    torch.set_num_threads(BENCH_THREADS)
    yield
