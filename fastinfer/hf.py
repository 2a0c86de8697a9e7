"""Hugging Face folders: fastinfer.save_pretrained / fastinfer.from_pretrained.

    fastinfer.save_pretrained(qmodel, "out/")          # config.json + fastinfer.safetensors
    qmodel = fastinfer.from_pretrained("out/")         # the class named in config.json's architectures

The folder holds the model's config.json (with a `quantization_config` whose quant_method is
"fastinfer", naming the weights file) and the model in fastinfer's file format (fastinfer.save).
It has no model.safetensors on purpose: transformers' own from_pretrained on it fails instead of
silently returning a float model whose int8 layers were "newly initialized" (in a process that
imported fastinfer, the "fastinfer" quantization method refuses it with the way out, as it refuses
a folder transformers' save_pretrained wrote from a converted model: convert/hf_quantizer.py;
elsewhere, for the missing weights file). A folder written by transformers'
save_pretrained from a fastinfer model (int8 keys in model.safetensors, no layer descriptions) is
recognised by from_pretrained here and refused with the way out.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from fastinfer import io

__all__ = ["WEIGHTS_NAME", "from_pretrained", "save_pretrained"]

WEIGHTS_NAME = "fastinfer.safetensors"


def save_pretrained(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Writes a converted transformers model (anything with a `.config` that has save_pretrained)
    to `directory`: config.json (marked quant_method "fastinfer") and fastinfer.safetensors.
    Returns the weights file's path."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise TypeError("fastinfer.save_pretrained expects a transformers model (with a .config); "
                        "for any other nn.Module use fastinfer.save(model, path)")  # fmt: skip
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stale = directory / "model.safetensors"
    if stale.exists():
        raise FileExistsError(f"{directory} already holds a model.safetensors: transformers would load that file "
                              "instead; save into an empty folder")  # fmt: skip
    had = "quantization_config" in config.__dict__
    before = config.__dict__.get("quantization_config")
    config.quantization_config = {"quant_method": "fastinfer", "weights": WEIGHTS_NAME,
                                  "format_version": io.FORMAT_VERSION,
                                  "load_with": "fastinfer.from_pretrained(folder)"}  # fmt: skip
    try:
        config.save_pretrained(directory)
    finally:
        if had:
            config.quantization_config = before
        else:
            del config.quantization_config
    path = directory / WEIGHTS_NAME
    io.save(model, path)
    return path


def from_pretrained(directory: str | os.PathLike, model_class=None, **config_kwargs) -> nn.Module:
    """The model fastinfer.save_pretrained wrote to `directory`.

    model_class: a transformers class (BertModel, AutoModelForCausalLM, ...) to build the float
    skeleton with; by default the first of config.json's `architectures`. config_kwargs are passed
    to AutoConfig.from_pretrained."""
    import transformers

    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"fastinfer.from_pretrained: no config.json in {str(directory)!r}")
    try:
        raw = json.loads(config_path.read_text())
    except ValueError as e:
        raise io.FileFormatError(f"{config_path}: not valid JSON ({e})") from None
    qc = raw.get("quantization_config") if isinstance(raw, dict) else None
    # fastinfer.save_pretrained names its weights file; quantize()'s mark alone (a folder written by
    # transformers' save_pretrained) does not
    if not (isinstance(qc, dict) and qc.get("quant_method") == "fastinfer" and "weights" in qc):
        if _holds_fastinfer_keys(directory):
            raise io.FileFormatError(
                f"{directory}: written by transformers' save_pretrained from a fastinfer model: its int8 tensors are "
                "there but not the description of the layers, so no loader (transformers' included) can rebuild it. "
                "Convert the float model again and save it with fastinfer.save_pretrained(model, folder)"
            )
        raise io.FileFormatError(f"{directory}: config.json has no fastinfer quantization_config (not written by "
                                 "fastinfer.save_pretrained; a float model loads with transformers' from_pretrained)")  # fmt: skip
    weights = directory / str(qc.get("weights", WEIGHTS_NAME))
    if weights.parent != directory:
        raise io.FileFormatError(f"{config_path}: quantization_config.weights must name a file in the folder")
    config = transformers.AutoConfig.from_pretrained(directory, **config_kwargs)
    config.__dict__.pop("quantization_config", None)  # the skeleton is a plain float model
    if model_class is None:
        model_class = architecture_class(config)
        if model_class is None:
            raise ValueError(f"{config_path}: architectures {getattr(config, 'architectures', None)!r} names no "
                             "transformers class; pass model_class")  # fmt: skip
    if hasattr(model_class, "config_class"):  # a model class: BertModel(config)
        build = model_class
    else:  # an Auto class: AutoModel.from_config(config)
        build = model_class.from_config
    return io.load(weights, lambda: build(config))


def architecture_class(config):
    """The transformers class named first in a config's `architectures`, or None."""
    import transformers

    names = getattr(config, "architectures", None) or []
    return getattr(transformers, names[0], None) if names else None


def _holds_fastinfer_keys(directory: Path) -> bool:
    path = directory / "model.safetensors"
    if not path.is_file():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return any(k.endswith((".weight_int8", ".sparse_weight")) for k in f.keys())
    except Exception:  # noqa: BLE001 (an unreadable file: not ours to judge here)
        return False
