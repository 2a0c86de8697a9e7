"""fastinfer: exact int8 inference kernels for PyTorch models.

    import fastinfer
    qmodel = fastinfer.quantize(model)      # nn.Linear -> fastinfer.nn.Int8Linear
    pruned = fastinfer.prune(model, 0.5, pattern="2:4", method="wanda", calibration_data=batches)
    fast = fastinfer.sparsify(fastinfer.quantize(pruned))   # -> SparseInt8Linear where it pays
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version as _pkg_version

import torch  # noqa: F401  (the ops below register with torch.library)

from fastinfer import nn, ops
from fastinfer._backend import available_isas, set_isa, set_num_threads
from fastinfer.convert import QuantConfig, quantize
from fastinfer.prune import LayerSparsity, prune, sparsity_report
from fastinfer.sparsify import SparseRule, sparsify

try:
    __version__ = _pkg_version("fastinfer")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0+unknown"

__all__ = [
    "LayerSparsity", "QuantConfig", "SparseRule", "__version__", "available_isas", "info", "nn", "ops",
    "prune", "quantize", "set_isa", "set_num_threads", "sparsify", "sparsity_report",
]  # fmt: skip


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def info() -> dict:
    """What this installation can do here: version, ISA (detected and active), CUDA, threads and
    the OpenMP runtime they run on (one runtime, shared with torch, is what makes models fast)."""
    from fastinfer import _backend, _C, _cuda_ops

    return {
        "version": __version__,
        "isa_detected": _backend.detected_isa(),
        "isa": _backend.active_isa(),
        "isa_available": _backend.available_isas(),
        "cpu": _cpu_model(),
        "cpu_flags": _C.cpu_flags(),
        "cuda": _cuda_ops.status(),
        "num_threads": _backend.num_threads(),
        "openmp": _backend.openmp_info(),
        "malloc": _backend.malloc_info(),
        "torch": torch.__version__,
    }
