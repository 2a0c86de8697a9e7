"""A guard for transformers' own save_pretrained / from_pretrained round trip of a converted model.

transformers' from_pretrained cannot rebuild fastinfer's layers: on a folder that its own
save_pretrained wrote from a converted model it would build the float model, find int8 keys it does
not know, leave the layers "newly initialized" (random) and return it with only a warning. So
quantize() marks a converted transformers model's config (`quantization_config = {"quant_method":
"fastinfer", ...}`, written into config.json by any save_pretrained), and fastinfer registers
"fastinfer" as a transformers quantization method whose loader refuses with the way out. That works
in every process that imported fastinfer; one that did not still gets transformers' warning only.
"""

from __future__ import annotations

import sys

from torch import nn

__all__ = ["QUANT_METHOD", "mark_converted", "register_transformers_quantizer"]

QUANT_METHOD = "fastinfer"
REFUSAL = (
    "this model was converted by fastinfer (config.json: quantization_config.quant_method = 'fastinfer'): "
    "transformers' from_pretrained cannot rebuild its int8 layers and would return a float model with random "
    "weights in their place. Save the converted model with fastinfer.save_pretrained(model, folder) and load it with "
    "fastinfer.from_pretrained(folder), or load the float model and convert it again with fastinfer.quantize"
)
_registered = False


def register_transformers_quantizer() -> bool:
    """Registers the "fastinfer" quantization method with transformers (once); False without
    transformers (or one without the quantizer registry)."""
    global _registered
    if _registered:
        return True
    try:
        from transformers.quantizers import HfQuantizer
        from transformers.quantizers.auto import (
            AUTO_QUANTIZER_MAPPING,
            register_quantization_config,
            register_quantizer,
        )
        from transformers.utils.quantization_config import QuantizationConfigMixin
    except ImportError:
        return False
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:

        @register_quantization_config(QUANT_METHOD)
        class FastinferQuantizationConfig(QuantizationConfigMixin):
            def __init__(self, **kwargs) -> None:
                for key, value in kwargs.items():
                    setattr(self, key, value)
                self.quant_method = QUANT_METHOD

        @register_quantizer(QUANT_METHOD)
        class FastinferRefusingQuantizer(HfQuantizer):
            requires_calibration = False

            def validate_environment(self, *args, **kwargs) -> None:
                raise ValueError(REFUSAL)

            def is_serializable(self, *args, **kwargs) -> bool:
                return False

            @property
            def is_trainable(self) -> bool:
                return False

    _registered = True
    return True


def mark_converted(model: nn.Module) -> None:
    """Marks a converted transformers model's config (see the module docstring) and registers the
    quantization method that refuses to load it."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict") or not register_transformers_quantizer():
        return
    config.quantization_config = {"quant_method": QUANT_METHOD,
                                  "load_with": "fastinfer.from_pretrained(a folder written by fastinfer.save_pretrained)"}  # fmt: skip


# A process that imported transformers before fastinfer refuses such folders from the start.
if "transformers" in sys.modules:
    register_transformers_quantizer()
