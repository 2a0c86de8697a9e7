"""Model conversion: walk a module tree by qualified name and swap or rewrite layers (no pointers
here; which kernel a layer gets is fastinfer.plan's decision).

    _select.py    the one target scan: skip patterns, filter_fn, min_features, shared layers
    _swap.py      replacing each target under every name it has
    calibrate.py  running calibration batches with hooks (wanda's input norms)
    quantize.py, prune.py, sparsify.py   the entry points
"""

from fastinfer.config import QuantConfig
from fastinfer.convert.quantize import quantize
from fastinfer.convert.prune import LayerSparsity, format_report, prune, sparsity_report
from fastinfer.convert.sparsify import sparsify

__all__ = ["LayerSparsity", "QuantConfig", "format_report", "prune", "quantize", "sparsify", "sparsity_report"]
