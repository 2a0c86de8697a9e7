"""Loads the compiled module and keeps the ISA choice and thread count in one place."""

from __future__ import annotations

import os

import torch

try:
    from fastinfer import _C
except ImportError as e:  # e.g. importing the source tree instead of the installed package
    raise ImportError(
        "fastinfer's compiled module fastinfer._C is missing or broken "
        f"({e}); install the package (pip install .) and import it from outside the source tree"
    ) from e

ISA_NAMES = ("ref", "avx2", "avx512_vnni", "amx")
_ISA_CODE = {name: i for i, name in enumerate(ISA_NAMES)}

# Thread count: follows torch.get_num_threads() until set_num_threads() pins it.
_pinned_threads: int | None = None
_last_threads = -1


def detected_isa() -> str:
    return ISA_NAMES[_C.detected_isa()]


def active_isa() -> str:
    return ISA_NAMES[_C.active_isa()]


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
    global _pinned_threads, _last_threads
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise ValueError(f"num_threads must be a positive int or None, got {n!r}")
    _pinned_threads = n
    _last_threads = -1
    sync_threads()


def sync_threads() -> None:
    """Called before each kernel: cheap when nothing changed."""
    global _last_threads
    n = _pinned_threads if _pinned_threads is not None else torch.get_num_threads()
    if n != _last_threads:
        _C.set_num_threads(n)
        _last_threads = n


def num_threads() -> int:
    sync_threads()
    return _C.num_threads()


def _apply_env() -> None:
    name = os.environ.get("FASTINFER_ISA")
    if name:
        try:
            set_isa(name.strip())
        except ValueError as e:
            raise ValueError(f"FASTINFER_ISA: {e}") from None


_apply_env()
