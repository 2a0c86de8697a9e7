"""fastinfer: exact int8 inference kernels for PyTorch models.

    import fastinfer
    qmodel = fastinfer.quantize(model)      # nn.Linear -> Int8Linear, nn.Conv2d -> Int8Conv2d
    print(fastinfer.conversion_report(qmodel))
    fast, plan = fastinfer.optimize(model, example_batch)   # per layer: the fastest kernel within min_sqnr_db
    print(fastinfer.report(fast))                            # kernel, SQNR, us per call vs float, per layer
    pruned = fastinfer.prune(model, 0.5, pattern="2:4", method="wanda", calibration_data=batches)
    fast = fastinfer.sparsify(fastinfer.quantize(pruned))   # -> SparseInt8Linear where it pays
    fastinfer.save(fast, "model.safetensors"); fast = fastinfer.load("model.safetensors", float_model)
"""

from __future__ import annotations

from fastinfer._runtime import __version__, available_isas, info, set_isa, set_num_threads
from fastinfer import nn, ops
from fastinfer.config import QuantConfig
from fastinfer.convert import LayerSparsity, prune, quantize, sparsify, sparsity_report
from fastinfer.convert.report import ConversionReport, conversion_report
from fastinfer.plan import SparseRule
from fastinfer.plan.planner import optimize
from fastinfer.plan.report import LayerPlan, PlanReport, report
from fastinfer.io import load, save
from fastinfer.hf import from_pretrained, save_pretrained

__all__ = [
    "ConversionReport", "LayerPlan", "LayerSparsity", "PlanReport", "QuantConfig", "SparseRule", "__version__", "available_isas", "conversion_report", "from_pretrained", "info", "load", "nn", "ops",
    "optimize", "prune", "quantize", "report", "save", "save_pretrained", "set_isa", "set_num_threads", "sparsify", "sparsity_report",
]  # fmt: skip
