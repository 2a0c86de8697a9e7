"""What runs here: loads the compiled modules (fastinfer._C at import, fastinfer._C_cuda on first
use), keeps the ISA cap and the thread count, tunes malloc, and reports it all in info()."""

from __future__ import annotations

import functools
import os
import platform
from importlib.metadata import PackageNotFoundError, version as _pkg_version

import torch  # noqa: F401  (loaded first: _C links the libgomp torch already mapped)

try:
    from fastinfer import _C
except ImportError as e:  # e.g. importing the source tree instead of the installed package
    raise ImportError(
        "fastinfer's compiled module fastinfer._C is missing or broken "
        f"({e}); install the package (pip install .) and import it from outside the source tree"
    ) from e

try:
    __version__ = _pkg_version("fastinfer")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0+unknown"

# The ISA paths by the engine's code (_C.detected_isa() / active_isa()), lowest first: the one list
# of ISA names in Python (tests import it).
ISA_NAMES = ("ref", "avx2", "avx512_vnni", "amx")
_ISA_CODE = {name: i for i, name in enumerate(ISA_NAMES)}

# Thread count: follows torch.get_num_threads() until set_num_threads() pins it. The kernels run on
# torch's own OpenMP team and read omp_get_max_threads() (what torch.set_num_threads sets) per call.
_pinned_threads: int | None = None


def detected_isa() -> str:
    return ISA_NAMES[_C.detected_isa()]


def active_isa() -> str:
    return ISA_NAMES[_C.active_isa()]


def isa_at_least(name: str) -> bool:
    """True when the active ISA is `name` or a higher one."""
    return _C.active_isa() >= _ISA_CODE[name]


def available_isas() -> list[str]:
    """ISA paths that can run here, lowest first (`set_isa` accepts exactly these)."""
    return list(ISA_NAMES[: _C.detected_isa() + 1])


def set_isa(name: str | None) -> str:
    """Use at most ISA `name` for the next calls (lowering only); None restores the detected one.

    Returns the name that was active before, so callers can restore it.
    """
    before = active_isa()
    if name is None:
        _C.set_isa_cap(_C.detected_isa())
        return before
    if not isinstance(name, str) or name not in _ISA_CODE:
        raise ValueError(
            f"unknown ISA {name!r}; valid names: {', '.join(ISA_NAMES)} "
            f"(this CPU supports: {', '.join(available_isas())})"
        )
    if name == "amx" and _C.cpu_flags()["amx_os_enabled"]:
        raise ValueError(
            "ISA 'amx': this CPU has AMX, but this build has no AMX kernels yet (they could not be "
            f"verified on hardware); valid here: {', '.join(available_isas())}"
        )
    if _ISA_CODE[name] > _C.detected_isa():
        raise ValueError(
            f"ISA {name!r} is not supported on this CPU (detected: {detected_isa()}); "
            f"valid here: {', '.join(available_isas())}"
        )
    _C.set_isa_cap(_ISA_CODE[name])
    return before


def set_num_threads(n: int | None) -> None:
    """Pin the kernel thread count; None follows torch.get_num_threads() again."""
    global _pinned_threads
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise ValueError(f"num_threads must be a positive int or None, got {n!r}")
    _pinned_threads = n
    _C.set_num_threads(0 if n is None else n)


def num_threads() -> int:
    """Threads the next kernel call from this Python thread uses."""
    return _C.num_threads()


def openmp_info() -> dict:
    """The OpenMP runtime our kernels run on, every OpenMP runtime mapped into the process, and
    whether ours is the one torch uses (True when the process holds exactly one runtime)."""
    ours = _C.openmp_library()
    loaded = [p for p in _C.openmp_libraries_loaded().split(":") if p]
    same = len(loaded) == 1 and bool(ours) and os.path.realpath(loaded[0]) == os.path.realpath(ours)
    # forked_child: libgomp cannot run a team in a child forked after the parent used one (torch's
    # parallel ops hang there); our kernels run on one thread instead.
    return {"library": ours, "loaded": loaded, "shared_with_torch": same, "forked_child": _C.in_forked_child()}


# glibc malloc: keep freed memory instead of trimming it back to the OS after every large free (see
# csrc/cpu/runtime/malloc_tune.h: a layer's few-MiB output freed at the top of the heap each step
# was re-faulted the next step, ~1 us a page). Up to MALLOC_TRIM_THRESHOLD of free memory stays
# mapped; allocations below MALLOC_MMAP_THRESHOLD come from the heap. FASTINFER_MALLOC_TUNE=0
# leaves malloc alone; glibc's own settings (MALLOC_TRIM_THRESHOLD_, MALLOC_MMAP_THRESHOLD_,
# GLIBC_TUNABLES) are never overridden.
MALLOC_TRIM_THRESHOLD = 128 << 20
MALLOC_MMAP_THRESHOLD = 32 << 20
_malloc: dict = {"tuned": False, "reason": "not applied yet"}


def _tune_malloc() -> None:
    global _malloc
    own = [v for v in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_") if os.environ.get(v)]
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        own.append("GLIBC_TUNABLES")
    if os.environ.get("FASTINFER_MALLOC_TUNE", "1").strip() == "0":
        _malloc = {"tuned": False, "reason": "FASTINFER_MALLOC_TUNE=0"}
    elif own:
        _malloc = {"tuned": False, "reason": f"left to the process's own settings ({', '.join(own)})"}
    else:
        why = _C.tune_malloc(MALLOC_TRIM_THRESHOLD, MALLOC_MMAP_THRESHOLD)
        if why:
            _malloc = {"tuned": False, "reason": why}
        else:  # "reason" says why it is not tuned; a tuned process says how to turn it off
            _malloc = {"tuned": True, "trim_threshold": MALLOC_TRIM_THRESHOLD,
                       "mmap_threshold": MALLOC_MMAP_THRESHOLD, "opt_out": "FASTINFER_MALLOC_TUNE=0"}  # fmt: skip


def malloc_info() -> dict:
    """Whether fastinfer tuned glibc malloc at import (and why not, where it did not)."""
    return dict(_malloc)


@functools.cache
def cuda_module():
    """(fastinfer._C_cuda, None), or (None, why it is unavailable). Imported on the first CUDA call
    only: CPU-only use never loads it."""
    try:
        from fastinfer import _C_cuda
    except ImportError as e:
        return None, f"fastinfer was built without the CUDA backend ({e})"
    return _C_cuda, None


def cuda_status() -> dict:
    """What info() reports under "cuda"."""
    mod, why = cuda_module()
    if mod is None:
        return {"built": False, "available": False, "reason": why}
    n = mod.device_count()
    usable = n > 0 and torch.cuda.is_available()
    out = {"built": True, "available": usable, "devices": n, "archs": ["sm_80", "sm_90a", "compute_80 (PTX)"]}
    if usable:
        out["device"] = torch.cuda.get_device_name(0)
    else:
        out["reason"] = "no usable CUDA device (driver or GPU missing)"
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def info() -> dict:
    """What this installation can do here: version, ISA (detected and active), CUDA, threads and
    the OpenMP runtime they run on (one runtime, shared with torch, is what makes models fast)."""
    return {
        "version": __version__,
        "isa_detected": detected_isa(),
        "isa": active_isa(),
        "isa_available": available_isas(),
        "attention_kernel": _C.attention_kernel(),
        "cpu": _cpu_model(),
        "cpu_flags": _C.cpu_flags(),
        "cuda": cuda_status(),
        "num_threads": num_threads(),
        "openmp": openmp_info(),
        "malloc": malloc_info(),
        "torch": torch.__version__,
    }


def _apply_env() -> None:
    name = os.environ.get("FASTINFER_ISA")
    if name:
        try:
            set_isa(name.strip())
        except ValueError as e:
            raise ValueError(f"FASTINFER_ISA: {e}") from None


_tune_malloc()
_apply_env()
