"""Is the CPU ours while we time? Other processes on a shared machine make figures lie.

`CpuGuard` reads the machine's busy time (/proc/stat: user, nice, system, irq, softirq, steal) and
this process's own CPU time (all its threads) around each timed round. What the machine spent
beyond our own time went to another process (or, as steal, to another guest of the hypervisor).
A round where that exceeds `max_foreign` of the machine's capacity is marked noisy; benchmarks
drop such rounds and refuse to print a figure when too few clean rounds remain.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _machine_busy_s() -> float | None:
    try:
        with open("/proc/stat") as f:
            parts = f.readline().split()
    except OSError:
        return None
    if not parts or parts[0] != "cpu":
        return None
    vals = [int(v) for v in parts[1:9]] + [0] * 8
    user, nice, system, _idle, _iowait, irq, softirq, steal = vals[:8]
    return (user + nice + system + irq + softirq + steal) / _HZ


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


@dataclass
class Round:
    wall_s: float
    foreign_frac: float | None  # share of the machine's capacity used by others; None: unknown


@dataclass
class CpuGuard:
    """Measure with `with guard.round(): ...`; read `guard.rounds` and `guard.verdict()`."""

    max_foreign: float = 0.10  # of all cores' time in the round
    ncpu: int = field(default_factory=lambda: os.cpu_count() or 1)
    rounds: list[Round] = field(default_factory=list)

    class _Ctx:
        def __init__(self, guard: CpuGuard) -> None:
            self.g = guard

        def __enter__(self):
            self.m0, self.o0, self.t0 = _machine_busy_s(), _own_cpu_s(), time.perf_counter()
            return self

        def __exit__(self, *exc) -> None:
            wall = time.perf_counter() - self.t0
            m1, o1 = _machine_busy_s(), _own_cpu_s()
            frac = None
            if self.m0 is not None and m1 is not None and wall > 0:
                # clock ticks are coarse (10 ms): one tick of slack per core
                foreign = max(0.0, (m1 - self.m0) - (o1 - self.o0) - self.g.ncpu / _HZ)
                frac = foreign / (wall * self.g.ncpu)
            self.g.rounds.append(Round(wall, frac))

    def round(self) -> CpuGuard._Ctx:
        return CpuGuard._Ctx(self)

    def clean(self, i: int) -> bool:
        f = self.rounds[i].foreign_frac
        return f is None or f <= self.max_foreign

    def clean_indices(self) -> list[int]:
        return [i for i in range(len(self.rounds)) if self.clean(i)]

    def worst(self) -> float:
        return max((r.foreign_frac or 0.0 for r in self.rounds), default=0.0)

    def verdict(self, min_clean: int) -> str | None:
        """None when at least min_clean rounds were clean, else why the figures cannot be trusted."""
        n_clean = len(self.clean_indices())
        if n_clean >= min_clean:
            return None
        return (
            f"NOISY: another process used up to {self.worst() * 100:.0f}% of the CPU "
            f"({len(self.rounds) - n_clean} of {len(self.rounds)} rounds above {self.max_foreign * 100:.0f}%); "
            "figures not printed, rerun on a quiet machine"
        )
