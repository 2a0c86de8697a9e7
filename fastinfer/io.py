"""fastinfer.save / fastinfer.load: a converted model in one safetensors file, no pickle.

    fastinfer.save(qmodel, "model.fi.safetensors")
    qmodel = fastinfer.load("model.fi.safetensors", MyModel(config))   # a float model: converted from the file
    qmodel = fastinfer.load("model.fi.safetensors", lambda: MyModel(config))

The file holds the model's state_dict in its portable form (each fastinfer layer's canonical
tensors: int8 [out, in] weights and fp32 scales, sparse buffers, float tensors as they are) and,
in the safetensors header's metadata under "fastinfer", a JSON description: format and fastinfer
versions, every fastinfer layer by qualified name with its kind and configuration, every module a
fusion replaced (fastinfer.nn.Fused), the conversion report, and a CRC-32 of each tensor's bytes.
From that, `load` turns a float model of the same architecture into the optimized one: it replaces
the recorded modules, checks every tensor's dtype, shape and checksum against what the model
expects, and loads one module at a time (each layer packs its kernel layout for the ISA and device
at hand; the file's tensors are read from the memory map as each module needs them, so the whole
file is never held twice). A file that is not a fastinfer file, is truncated or edited, or belongs
to another model raises fastinfer.io.FileFormatError (a ValueError) naming the file and the layer.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fastinfer import _runtime
from fastinfer.convert._swap import route_fused_layers_through_modules, set_module
from fastinfer.convert.attention import HF_NAME, HF_NAME_BF16, enable_fast_attention, is_hf_model
from fastinfer.convert.fuse import REWRITE_KEY, any_hooks, rewrite_residual_blocks
from fastinfer.convert.hf_blocks import block_fits, fuse_block, fused_kind
from fastinfer.convert.hf_quantizer import mark_converted
from fastinfer.convert.quantize import fast_layernorms
from fastinfer.convert.report import ConversionReport, LayerConversion
from fastinfer.nn import (
    DepthwiseConv2d,
    Fused,
    Int8Conv1d,
    Int8Conv2d,
    Int8Linear,
    Int8MultiheadAttention,
    SparseInt8Linear,
    SparseLinear,
    StaticInt8Linear,
    WeightOnlyInt8Linear,
    linear_weight_and_bias,
)
from fastinfer.nn import LayerNorm as FastLayerNorm

__all__ = ["FORMAT_VERSION", "FileFormatError", "load", "read_metadata", "save"]

# Of the file's layout and metadata; load reads this version and older. 2: blocks rewritten by
# quantize() ("rewritten": their convs fuse the residual add and relu that the block's forward,
# rebuilt by a reader of format 1, would apply again), so only files holding such a block say 2
# and a reader of format 1 refuses them rather than build the wrong model.
FORMAT_VERSION = 2
STATE_VERSION = 2  # of the layers' state_dicts (1: Int8Linear held its packed layout)
_KEY = "fastinfer"  # the safetensors metadata entry holding our JSON


class FileFormatError(ValueError):
    """A file fastinfer.load cannot take: not a fastinfer file, damaged, edited, written by a newer
    fastinfer, or made for another model. The message names the file and, where one is at fault,
    the layer."""


# ------------------------------------------------------------------------------------- layer kinds


def _linear_config(m) -> dict:
    return {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}


_OUTPUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "uint8": torch.uint8}


def _output_config(m) -> dict:
    """A conv layer's output dtype (QuantConfig.conv_handoff): None, "float32", "bfloat16" or "uint8",
    whether it follows the model's casts, and whether it takes uint8 from the conv before it."""
    dt = m.output_dtype
    return {"output_dtype": None if dt is None else str(dt).replace("torch.", ""),
            "follows_model_dtype": bool(m._follows_model_dtype), "takes_u8": bool(m._takes_u8)}


def _set_output(layer, c: dict):
    if c["output_dtype"] is not None:
        if c["output_dtype"] not in _OUTPUT_DTYPES:
            raise ValueError(f"output_dtype {c['output_dtype']!r} is not float32, bfloat16, uint8 or null")
        layer.output_dtype = _OUTPUT_DTYPES[c["output_dtype"]]
    layer._follows_model_dtype = c["follows_model_dtype"]
    layer._takes_u8 = c["takes_u8"]
    return layer


def _conv_config(m: Int8Conv2d) -> dict:
    return {"in_channels": m.in_channels, "out_channels": m.out_channels, "kernel_size": list(m.kernel_size),
            "stride": list(m.stride), "padding": list(m.padding), "dilation": list(m.dilation),
            "groups": m.groups, "bias": m.bias is not None, "activation": m.activation}  # fmt: skip


def _dw_config(m: DepthwiseConv2d) -> dict:
    return {"channels": m.in_channels, "kernel_size": list(m.kernel_size), "stride": list(m.stride),
            "padding": list(m.padding), "dilation": list(m.dilation), "bias": m.bias is not None,
            "activation": m.activation, **_output_config(m)}  # fmt: skip


def _fits_linear(mod: nn.Module, cfg: dict) -> bool:
    if isinstance(mod, (Int8Linear, SparseInt8Linear, SparseLinear)):
        return (mod.in_features, mod.out_features) == (cfg["in_features"], cfg["out_features"])
    weight, _ = linear_weight_and_bias(mod)
    return weight is not None and list(weight.shape) == [cfg["out_features"], cfg["in_features"]]


def _fits_conv2d(mod: nn.Module, cfg: dict, depthwise: bool) -> bool:
    if isinstance(mod, (Int8Conv2d, DepthwiseConv2d)) or (isinstance(mod, nn.Conv2d) and mod.padding_mode == "zeros"):
        cin = cfg["channels"] if depthwise else cfg["in_channels"]
        cout = cfg["channels"] if depthwise else cfg["out_channels"]
        groups = cfg["channels"] if depthwise else cfg["groups"]
        return (mod.in_channels, mod.out_channels, mod.groups, list(mod.kernel_size), list(mod.stride),
                list(mod.dilation)) == (cin, cout, groups, cfg["kernel_size"], cfg["stride"], cfg["dilation"])  # fmt: skip
    return False


def _fits_conv1d(mod: nn.Module, cfg: dict) -> bool:
    if isinstance(mod, Int8Conv1d):
        mod = mod.conv2d
    elif isinstance(mod, nn.Conv1d) and mod.padding_mode == "zeros":
        return (mod.in_channels, mod.out_channels, mod.groups, [1, *mod.kernel_size], [1, *mod.stride],
                [1, *mod.dilation]) == (cfg["in_channels"], cfg["out_channels"], cfg["groups"], cfg["kernel_size"],
                                        cfg["stride"], cfg["dilation"])  # fmt: skip
    return _fits_conv2d(mod, cfg, depthwise=False)


def _mha_config(m: Int8MultiheadAttention) -> dict:
    return {"embed_dim": m.embed_dim, "num_heads": m.num_heads, "bias": m.in_proj.bias is not None,
            "batch_first": m.batch_first, "dropout": m.dropout, "fused_attention": m.fused_attention}  # fmt: skip


def _fits_mha(mod: nn.Module, cfg: dict) -> bool:
    return (isinstance(mod, (nn.MultiheadAttention, Int8MultiheadAttention))
            and (mod.embed_dim, mod.num_heads, mod.batch_first) == (cfg["embed_dim"], cfg["num_heads"], cfg["batch_first"]))  # fmt: skip


def _int8_linear_config(m: Int8Linear) -> dict:
    return {**_linear_config(m), "activation": m.activation, "input_scale": m.input_scale is not None}


def _build_int8_linear(cls: type, c: dict) -> Int8Linear:
    layer = cls(c["in_features"], c["out_features"], bias=c["bias"], activation=c["activation"])
    if c["input_scale"]:
        layer.input_scale = torch.ones(c["in_features"])
    return layer


# Config keys added after files were written: a config without one reads as this value.
_DEFAULTS = {"input_scale": False, "output_dtype": None, "follows_model_dtype": False, "takes_u8": False}


def _build_conv2d(cfg: dict) -> Int8Conv2d:
    return Int8Conv2d(cfg["in_channels"], cfg["out_channels"], tuple(cfg["kernel_size"]), tuple(cfg["stride"]),
                      tuple(cfg["padding"]), tuple(cfg["dilation"]), cfg["groups"], bias=cfg["bias"],
                      activation=cfg["activation"])  # fmt: skip


@dataclass(frozen=True)
class _Kind:
    cls: type
    config: Callable[[nn.Module], dict]
    build: Callable[[dict], nn.Module]
    fits: Callable[[nn.Module, dict], bool]  # can the module found at the layer's place become it?
    on_meta: bool  # built on the meta device (its tensors then come from the file alone)
    types: dict  # config key -> the JSON type(s) it must have


_INT, _BOOL, _ACT, _PAIR, _QUAD = (int,), (bool,), (str, type(None)), "pair", "quad"

_KINDS: dict[str, _Kind] = {
    "Int8Linear": _Kind(
        Int8Linear, _int8_linear_config, lambda c: _build_int8_linear(Int8Linear, c), _fits_linear, True,
        {"in_features": _INT, "out_features": _INT, "bias": _BOOL, "activation": _ACT, "input_scale": _BOOL}),
    "WeightOnlyInt8Linear": _Kind(
        WeightOnlyInt8Linear, _int8_linear_config, lambda c: _build_int8_linear(WeightOnlyInt8Linear, c), _fits_linear,
        True, {"in_features": _INT, "out_features": _INT, "bias": _BOOL, "activation": _ACT, "input_scale": _BOOL}),
    "StaticInt8Linear": _Kind(
        StaticInt8Linear, _int8_linear_config, lambda c: _build_int8_linear(StaticInt8Linear, c), _fits_linear,
        True, {"in_features": _INT, "out_features": _INT, "bias": _BOOL, "activation": _ACT, "input_scale": _BOOL}),
    "SparseInt8Linear": _Kind(
        SparseInt8Linear, lambda m: {**_linear_config(m), "activation": m.activation},
        lambda c: SparseInt8Linear(c["in_features"], c["out_features"], bias=c["bias"], activation=c["activation"]),
        _fits_linear, False, {"in_features": _INT, "out_features": _INT, "bias": _BOOL, "activation": _ACT}),
    "SparseLinear": _Kind(
        SparseLinear, _linear_config, lambda c: SparseLinear(c["in_features"], c["out_features"], bias=c["bias"]),
        _fits_linear, False, {"in_features": _INT, "out_features": _INT, "bias": _BOOL}),
    "Int8Conv2d": _Kind(
        Int8Conv2d, lambda m: {**_conv_config(m), **_output_config(m)}, lambda c: _set_output(_build_conv2d(c), c),
        lambda m, c: _fits_conv2d(m, c, depthwise=False), True,
        {"in_channels": _INT, "out_channels": _INT, "kernel_size": _PAIR, "stride": _PAIR, "padding": _QUAD,
         "dilation": _PAIR, "groups": _INT, "bias": _BOOL, "activation": _ACT, "output_dtype": _ACT,
         "follows_model_dtype": _BOOL, "takes_u8": _BOOL}),
    "DepthwiseConv2d": _Kind(
        DepthwiseConv2d, _dw_config,
        lambda c: _set_output(DepthwiseConv2d(c["channels"], tuple(c["kernel_size"]), tuple(c["stride"]),
                                              tuple(c["padding"]), tuple(c["dilation"]), bias=c["bias"],
                                              activation=c["activation"]), c),
        lambda m, c: _fits_conv2d(m, c, depthwise=True), True,
        {"channels": _INT, "kernel_size": _PAIR, "stride": _PAIR, "padding": _QUAD, "dilation": _PAIR,
         "bias": _BOOL, "activation": _ACT, "output_dtype": _ACT, "follows_model_dtype": _BOOL, "takes_u8": _BOOL}),
    "Int8Conv1d": _Kind(
        Int8Conv1d, lambda m: _conv_config(m.conv2d), lambda c: Int8Conv1d(_build_conv2d(c)), _fits_conv1d, True,
        {"in_channels": _INT, "out_channels": _INT, "kernel_size": _PAIR, "stride": _PAIR, "padding": _QUAD,
         "dilation": _PAIR, "groups": _INT, "bias": _BOOL, "activation": _ACT}),
    "Int8MultiheadAttention": _Kind(
        Int8MultiheadAttention, _mha_config, lambda c: Int8MultiheadAttention(**c), _fits_mha, True,
        {"embed_dim": _INT, "num_heads": _INT, "bias": _BOOL, "batch_first": _BOOL, "dropout": (float,),
         "fused_attention": _BOOL}),
    "Fused": _Kind(
        Fused, lambda m: {"was": m.was, "into": m.into}, lambda c: Fused(c["was"], c["into"]),
        lambda m, c: isinstance(m, nn.Identity) or type(m).__name__ == c["was"], False,
        {"was": (str,), "into": (str,)}),
}  # fmt: skip
_KIND_OF = {k.cls: name for name, k in _KINDS.items()}


def _check_config(where: str, kind: _Kind, cfg: object) -> dict:
    if isinstance(cfg, dict):
        for key, default in _DEFAULTS.items():
            if key in kind.types and key not in cfg:
                cfg[key] = default
    if not isinstance(cfg, dict) or set(cfg) != set(kind.types):
        keys = sorted(cfg) if isinstance(cfg, dict) else type(cfg).__name__
        raise FileFormatError(f"{where}: config must have the keys {sorted(kind.types)}, got {keys}")
    for key, want in kind.types.items():
        v = cfg[key]
        if want in (_PAIR, _QUAD):
            n = 2 if want == _PAIR else 4
            ok = isinstance(v, list) and len(v) == n and all(type(i) is int for i in v)
        else:
            ok = type(v) in want  # exact: True is not an int here, 1 is not a bool
        if not ok:
            raise FileFormatError(f"{where}: config {key}={v!r} has the wrong type")
    return cfg


# ------------------------------------------------------------------------------------------- save


def _tensor_bytes(t: torch.Tensor):
    """The bytes of a contiguous CPU tensor, for the checksum (no copy)."""
    return t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b""


def save(model: nn.Module, path: str | os.PathLike, *, metadata: dict[str, str] | None = None) -> None:
    """Writes `model` (a fastinfer-converted model, or any nn.Module) to `path` as safetensors.

    What `load` needs to rebuild it from a float model of the same architecture goes with it (see
    the module docstring); `metadata` adds string pairs of your own (read back by read_metadata).
    The file is written next to `path` and renamed over it at the end, so a failed save leaves an
    existing file untouched. Tensors are saved from the CPU (a CUDA model's are copied)."""
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"fastinfer.save expects an nn.Module, got {type(model).__name__}")
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):  # fmt: skip
        raise TypeError("fastinfer.save: metadata must be a dict of str -> str")
    path = Path(path)
    layers: dict[str, dict] = {}
    inside: list[str] = []  # prefixes of recorded layers: their children are part of them
    first_name: dict[int, str] = {}  # id(module) -> its first name
    same_as: dict[str, str] = {}  # a later name of a module registered under several: its tensors stored once
    for name, mod in model.named_modules(remove_duplicate=False):
        if first_name.setdefault(id(mod), name) != name:
            same_as[name] = first_name[id(mod)]
        if any(name.startswith(p) for p in inside):
            continue
        kind = _KIND_OF.get(type(mod))
        if kind is not None:
            layers[name] = {"kind": kind, "config": _KINDS[kind].config(mod)}
            inside.append(name + "." if name else "")  # the model itself: nothing else to record
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}  # a key whose tensor is another key's (tied weights): stored once
    exact: dict[tuple, str] = {}
    storages: set[tuple] = set()
    for key, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"fastinfer.save: state_dict entry {key!r} is a {type(t).__name__}, not a tensor "
                            "(modules with extra state are not supported)")  # fmt: skip
        if t.device.type == "meta":
            raise ValueError(f"fastinfer.save: {key!r} is on the meta device (no data to save)")
        owner, _, local = key.rpartition(".")
        if owner in same_as:
            first = f"{same_as[owner]}.{local}" if same_as[owner] else local
            if first in tensors or first in aliases:
                aliases[key] = aliases.get(first, first)
                continue
        t = t.detach()
        ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and ident in exact:
            aliases[key] = exact[ident]
            continue
        if t.numel():
            exact[ident] = key
        storage = (t.device, t.untyped_storage().data_ptr())
        t = t.cpu().contiguous()
        if t.numel() and storage in storages:
            t = t.clone()  # another view of a storage already stored (safetensors stores each storage once)
        storages.add(storage)
        tensors[key] = t
    versions = {k: v["version"] for k, v in getattr(state, "_metadata", {}).items() if isinstance(v, dict) and "version" in v}
    report = model.__dict__.get("_fastinfer_report")
    rewritten = _rewrite_records(model)
    info = {
        "format": "fastinfer", "format_version": 2 if rewritten else 1, "state_version": STATE_VERSION,
        "fastinfer_version": _runtime.__version__, "torch_version": torch.__version__,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}", "training": model.training,
        "layers": layers, "aliases": aliases, "versions": versions,
        "crc32": {k: zlib.crc32(_tensor_bytes(t)) for k, t in tensors.items()},
        "report": None if report is None else {"entry": report.entry, "attention": report.attention, "layernorm": report.layernorm,
                                               "blocks": report.blocks,
                                               "rows": [[r.name, r.kind, r.result, r.detail] for r in report]},
        # the attention implementation of a transformers model, put back on load ("fastinfer": its kernel)
        "attention": getattr(getattr(model, "config", None), "_attn_implementation", None),
        # every name of a LayerNorm on fastinfer's kernel: put back on load
        "layernorm": [n for n, m in model.named_modules(remove_duplicate=False) if type(m) is FastLayerNorm],
        # blocks whose forward quantize() rewrote (fastinfer.convert.fuse.rewrite_residual_blocks):
        # {block: {conv in it: the activation it took, or None}}, rewritten again on load
        "rewritten": rewritten,
        # transformers blocks on fastinfer's short road (fastinfer.convert.hf_blocks): {name: "output"
        # or "layer"}, fused again on load; a reader that ignores it gets the blocks' own forward,
        # which computes the same
        "hf_blocks": {n: k for n, m in model.named_modules() if (k := fused_kind(m)) and block_fits(m, k, fused=True)},
    }  # fmt: skip
    meta = dict(metadata or {})
    meta[_KEY] = json.dumps(info, separators=(",", ":"))
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# ------------------------------------------------------------------------------------------- load


class _File:
    """An open fastinfer file: its parsed metadata and lazy access to its tensors."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = path
        if not path.is_file():
            raise FileNotFoundError(f"fastinfer.load: no file at {str(path)!r}")
        try:
            self._f = safe_open(str(path), framework="pt", device="cpu")
            meta = self._f.metadata() or {}
            self.keys = set(self._f.keys())
        except Exception as e:  # noqa: BLE001 (safetensors' own error types; a damaged header)
            raise FileFormatError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
        self.user = {k: v for k, v in meta.items() if k != _KEY}
        self.info = self._parse(meta.get(_KEY))

    def error(self, what: str) -> FileFormatError:
        return FileFormatError(f"{self.path}: {what}")

    def _parse(self, text: str | None) -> dict:
        if text is None:
            raise self.error("a safetensors file without fastinfer metadata (not written by fastinfer.save; "
                             "a plain state_dict file loads with safetensors.torch.load_file + load_state_dict)")  # fmt: skip
        try:
            info = json.loads(text)
        except ValueError as e:
            raise self.error(f"the fastinfer metadata is not valid JSON ({e})") from None
        if not isinstance(info, dict) or info.get("format") != "fastinfer":
            raise self.error("the fastinfer metadata is not a fastinfer file description")
        version = info.get("format_version")
        if type(version) is not int or version < 1:
            raise self.error(f"bad format_version {version!r}")
        if version > FORMAT_VERSION:
            raise self.error(f"written by fastinfer {info.get('fastinfer_version')!r} in file format {version}; "
                             f"this fastinfer ({_runtime.__version__}) reads format {FORMAT_VERSION} and older")  # fmt: skip
        shapes = {"layers": dict, "aliases": dict, "versions": dict, "crc32": dict, "training": bool}
        for key, typ in shapes.items():
            if type(info.get(key)) is not typ:
                raise self.error(f"the fastinfer metadata's {key!r} is missing or not a {typ.__name__}")
        for name, entry in info["layers"].items():
            where = f"layer {name or '<model>'!r}"
            if not isinstance(entry, dict) or entry.get("kind") not in _KINDS:
                kind = entry.get("kind") if isinstance(entry, dict) else entry
                raise self.error(f"{where}: unknown layer kind {kind!r} (known: {', '.join(_KINDS)})")
            _check_config(f"{self.path}: {where}", _KINDS[entry["kind"]], entry.get("config"))
        for key, target in info["aliases"].items():
            if not isinstance(target, str) or target not in self.keys or key in self.keys:
                raise self.error(f"alias {key!r} -> {target!r} does not name a stored tensor")
        if set(info["crc32"]) != self.keys or not all(type(v) is int for v in info["crc32"].values()):
            raise self.error("the checksums do not cover exactly the stored tensors")
        return info

    def tensor(self, key: str, layer: str) -> torch.Tensor:
        stored = self.info["aliases"].get(key, key)
        try:
            t = self._f.get_tensor(stored)
        except Exception as e:  # noqa: BLE001 (safetensors' own error types)
            raise self.error(f"tensor {stored!r} cannot be read ({type(e).__name__}: {e})") from None
        if zlib.crc32(_tensor_bytes(t)) != self.info["crc32"][stored]:
            raise self.error(f"tensor {stored!r} (layer {layer or '<model>'!r}) fails its checksum: the file "
                             "is damaged or was edited")  # fmt: skip
        return t

    def dtype_and_shape(self, key: str) -> tuple[str, list[int]]:
        s = self._f.get_slice(self.info["aliases"].get(key, key))
        return s.get_dtype(), list(s.get_shape())


_ST_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
             torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
             torch.bool: "BOOL"}  # fmt: skip
_VARIABLE_SIZE = {"sparse_weight"}  # 1-D buffers whose length depends on the weights (checked by the layer)


def read_metadata(path: str | os.PathLike) -> dict:
    """The fastinfer description of a saved file (versions, layers, report) and the user's metadata
    under "user", without loading a tensor."""
    f = _File(Path(path))
    return {**f.info, "user": f.user}


def load(path: str | os.PathLike, model: nn.Module | Callable[[], nn.Module] | None = None, *,
         strict: bool = True) -> nn.Module:  # fmt: skip
    """The model saved at `path` by fastinfer.save, built in `model`:

    - a float model of the saved model's architecture (its weights need not be trained: the
      file's replace them): each recorded layer is replaced by its fastinfer layer, then every
      tensor is loaded; an already-converted model of the same structure works too;
    - a callable with no arguments that builds that model (`lambda: MyModel(config)`);
    - None, when the saved model is itself one fastinfer layer.

    `model` is modified in place and returned, in the training mode it was saved in, with its
    conversion report (fastinfer.conversion_report) when it had one. strict=False loads a file
    whose tensors cover only part of the model (the rest keeps its values) and ignores file
    tensors the model has no place for; dtype, shape and checksum checks stay. Raises
    FileFormatError naming the file and layer for a file that is not a fastinfer file, is
    damaged or edited, or does not fit the model: a file for another model before `model` is
    changed; a tensor found bad while loading (a checksum, a layer's own validation) after some
    layers were loaded, so build a fresh model to retry."""
    f = _File(Path(path))
    info = f.info
    if model is None:
        root = info["layers"].get("")
        if root is None:
            raise TypeError(f"fastinfer.load: {path} holds a {info.get('model_class')!r}; pass a float model of "
                            "that architecture (or a callable that builds one) as `model`")  # fmt: skip
        model = _build(f, "", root)
    elif not isinstance(model, nn.Module):
        if not callable(model):
            raise TypeError(f"fastinfer.load: model must be an nn.Module, a callable building one, or None; "
                            f"got {type(model).__name__}")  # fmt: skip
        built = model()
        if not isinstance(built, nn.Module):
            raise TypeError(f"fastinfer.load: the model callable returned a {type(built).__name__}, not an nn.Module")
        model = built
    model = _install_layers(f, model)
    _load_tensors(f, model, strict)
    _rewrite_blocks(f, model, info.get("rewritten", {}))
    model.train(info["training"])
    report = info.get("report")
    if isinstance(report, dict) and isinstance(report.get("rows"), list):
        rows = [LayerConversion(*map(str, r)) for r in report["rows"] if isinstance(r, list) and len(r) == 4]
        attention, norms, blocks = report.get("attention"), report.get("layernorm"), report.get("blocks")
        model.__dict__["_fastinfer_report"] = ConversionReport(str(report.get("entry", "fastinfer.quantize")), rows,
                                                               attention if isinstance(attention, str) else None,
                                                               norms if isinstance(norms, str) else None,
                                                               blocks if isinstance(blocks, str) else None)  # fmt: skip
    if info.get("attention") in (HF_NAME, HF_NAME_BF16):
        enable_fast_attention(model, bf16=info["attention"] == HF_NAME_BF16)
    model = _install_layernorms(f, model, info.get("layernorm", []))
    _fuse_hf_blocks(f, model, info.get("hf_blocks", {}))
    if info["layers"] and is_hf_model(model):
        mark_converted(model)  # as quantize() does: transformers' own from_pretrained refuses its folders
    return model


def _rewrite_records(model: nn.Module) -> dict[str, dict]:
    """{block: its rewrite record} of every block quantize() rewrote; a GraphModule that passes a
    residual to a conv without a record (built some other way) cannot be saved: its convs' configs
    would not say what the block's own forward must stop doing."""
    records = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.fx.GraphModule):
            continue
        record = getattr(mod, REWRITE_KEY, None)
        if isinstance(record, dict):
            records[name] = dict(record)
        elif any(n.op == "call_module" and "residual" in n.kwargs for n in mod.graph.nodes):
            raise ValueError(f"fastinfer.save: {name or 'the model'} is a torch.fx GraphModule passing residuals "
                             "to its convs without fastinfer's rewrite record; save the model quantize() returned")  # fmt: skip
    return records


def _rewrite_blocks(f: _File, model: nn.Module, rewritten: object) -> None:
    """The file's block rewrites again: each block's convs are installed with the activation they
    took (their recorded config); it is taken back out of them, the block traced and rewritten as
    quantize() did, and the result must be the file's. A block that is already a rewritten graph
    (an already-converted model given to load) is left as it is."""
    if not isinstance(rewritten, dict) or not all(isinstance(k, str) and isinstance(v, dict) for k, v in rewritten.items()):
        raise f.error("'rewritten' must map block names to {conv: activation} dicts")
    todo = set()
    for name, convs in rewritten.items():
        try:
            block = model.get_submodule(name)
        except AttributeError:
            raise f.error(f"rewritten block {name!r} has no module at that name in the given model") from None
        if isinstance(block, torch.fx.GraphModule):
            continue
        if any(any_hooks(m) for m in block.modules()):
            raise f.error(f"block {name!r} of the given model has hooks: its rewrite (residual add and relu moved "
                          "into its convs) cannot be redone on it; register them after loading")  # fmt: skip
        for target, act in convs.items():
            conv = block.get_submodule(target) if isinstance(target, str) else None
            if not isinstance(conv, Int8Conv2d) or (act is not None and conv.activation != act):
                raise f.error(f"rewritten block {name!r}: {target!r} is not the Int8Conv2d with activation {act!r} "
                              "the file describes")  # fmt: skip
            conv.activation = None  # what the block's own forward applies, until it is rewritten
        todo.add(name)
    if not todo:
        return
    done = {b.name: b for b in rewrite_residual_blocks(model, Int8Conv2d, only=todo)}
    for name in todo:
        got = getattr(model.get_submodule(name), REWRITE_KEY, None) if name in done else None
        if got != rewritten[name]:
            raise f.error(f"block {name!r}: the model's forward does not rewrite as the file's block did "
                          f"(file: {rewritten[name]}, now: {got}): the file is for another model")  # fmt: skip


def _install_layernorms(f: _File, model: nn.Module, names: object) -> nn.Module:
    """The file's LayerNorms on fastinfer's kernel again: each name must hold an nn.LayerNorm (or
    already a fastinfer one)."""
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise f.error("'layernorm' must be a list of module names")
    for name in names:
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise f.error(f"LayerNorm {name or '<model>'!r} (on fastinfer's kernel) has no module at that name "
                          "in the given model") from None  # fmt: skip
        if type(mod) not in (nn.LayerNorm, FastLayerNorm):
            raise f.error(f"{name or '<model>'!r} is a LayerNorm in the file, a {type(mod).__name__} in the given model")
    model, _ = fast_layernorms(model, set(names))
    return model


def _fuse_hf_blocks(f: _File, model: nn.Module, blocks: object) -> None:
    """The file's transformers blocks on the short road again, where the block at each name
    qualifies for its kind in the model built (an output block's dense layer, loaded from the file,
    taking the residual). One that does not (another transformers whose code differs, a part
    replaced) keeps its class's own forward, which computes the same."""
    if not isinstance(blocks, dict) or not all(isinstance(n, str) and k in ("output", "layer") for n, k in blocks.items()):
        raise f.error("'hf_blocks' must map module names to 'output' or 'layer'")
    for name, kind in blocks.items():
        try:
            block = model.get_submodule(name)
        except AttributeError:
            raise f.error(f"{kind} block {name or '<model>'!r} (fused by fastinfer) has no module at that name in the "
                          "given model") from None  # fmt: skip
        fuse_block(block, kind)


def _build(f: _File, name: str, entry: dict) -> nn.Module:
    kind = _KINDS[entry["kind"]]
    try:
        if kind.on_meta:
            with torch.device("meta"):
                return kind.build(entry["config"])
        return kind.build(entry["config"])
    except (TypeError, ValueError) as e:
        raise f.error(f"layer {name or '<model>'!r}: its config cannot build a {entry['kind']} ({e})") from None


def _install_layers(f: _File, model: nn.Module) -> nn.Module:
    """Replaces the module at each recorded layer's name by that layer (built empty; its tensors
    come from the file). A module registered under several names stays one module."""
    found: list[tuple[str, dict, nn.Module]] = []
    for name, entry in sorted(f.info["layers"].items(), key=lambda kv: kv[0].count(".") if kv[0] else -1):
        where = f"layer {name or '<model>'!r}"
        try:
            current = model.get_submodule(name)
        except AttributeError:
            raise f.error(f"{where} ({entry['kind']}) has no module at that name in the given "
                          f"{type(model).__name__}: the file is for another model") from None  # fmt: skip
        if not _KINDS[entry["kind"]].fits(current, entry["config"]):
            raise f.error(f"{where}: the file holds {entry['kind']}({_describe(entry['config'])}), the model "
                          f"has {_short_repr(current)} there: the file is for another model")  # fmt: skip
        found.append((name, entry, current))
    # every layer fits: only now is the model changed
    built: dict[int, nn.Module] = {}  # id(module replaced) -> its replacement
    for name, entry, current in found:
        if id(current) in built:
            new = built[id(current)]
        else:
            new = _build(f, name, entry)
            new.train(current.training)
            built[id(current)] = new
        model = set_module(model, name, new)
    route_fused_layers_through_modules(model)
    return model


def _describe(cfg: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in cfg.items())


def _short_repr(mod: nn.Module) -> str:
    text = repr(mod).splitlines()[0]
    return text if len(text) < 120 else text[:117] + "..."


def _load_tensors(f: _File, model: nn.Module, strict: bool) -> None:
    expected = model.state_dict(keep_vars=True)
    stored = f.keys | set(f.info["aliases"])
    missing = [k for k in expected if k not in stored]
    unexpected = sorted(stored - set(expected))
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensor(s) of the model are not in the file ({', '.join(missing[:4])}"
                         + (", ..." if len(missing) > 4 else "") + ")")  # fmt: skip
        if unexpected:
            parts.append(f"{len(unexpected)} tensor(s) of the file have no place in the model ({', '.join(unexpected[:4])}"
                         + (", ..." if len(unexpected) > 4 else "") + ")")  # fmt: skip
        raise f.error("; ".join(parts) + ": the file is for another model (strict=False loads the overlap)")
    by_module: dict[str, list[str]] = {}
    for key in expected:
        if key not in stored:
            continue
        owner, _, local = key.rpartition(".")
        dtype, shape = f.dtype_and_shape(key)
        want = expected[key]
        want_dtype = _ST_DTYPE.get(want.dtype, str(want.dtype))
        shape_ok = len(shape) == want.dim() if local in _VARIABLE_SIZE else shape == list(want.shape)
        if dtype != want_dtype or not shape_ok:
            raise f.error(f"tensor {key!r} (layer {owner or '<model>'!r}) is {dtype} {shape} in the file, the model "
                          f"expects {want_dtype} {list(want.shape)}")  # fmt: skip
        by_module.setdefault(owner, []).append(key)
    versions = f.info["versions"]
    modules = dict(model.named_modules(remove_duplicate=False))
    for owner, keys in by_module.items():
        mod = modules.get(owner)
        if mod is None:  # a key a state_dict hook made up: not a module's own tensor
            raise f.error(f"the model's state_dict has {keys[0]!r}, which is no module's tensor (a state_dict hook?); "
                          "fastinfer.load places tensors module by module")  # fmt: skip
        prefix = owner + "." if owner else ""
        local = {k: f.tensor(k, owner) for k in keys}
        own = [t for t in (*mod._parameters.values(), *mod._buffers.values()) if t is not None]
        meta = {"assign_to_params_buffers": any(t.device.type == "meta" for t in own)}
        if isinstance(versions.get(owner), int):
            meta["version"] = versions[owner]
        errors: list[str] = []
        with torch.no_grad():
            mod._load_from_state_dict(local, prefix, meta, True, [], [], errors)
        if errors:
            raise f.error(f"layer {owner or '<model>'!r} ({type(mod).__name__}): " + "; ".join(errors))
        del local
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise f.error(f"{len(left)} tensor(s) of the model got no data from the file ({', '.join(left[:4])})")
