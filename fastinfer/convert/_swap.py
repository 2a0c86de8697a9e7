"""Swapping layers: each target replaced by its converted module under every name it has."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from fastinfer.convert._select import Target, progress_bar


def set_module(root: nn.Module, fqn: str, module: nn.Module) -> nn.Module:
    """Puts `module` at the qualified name `fqn` of `root`; returns the model, which is `module`
    itself when fqn is "" (the model replaced)."""
    if fqn == "":
        return module
    parent, _, child = fqn.rpartition(".")
    setattr(root.get_submodule(parent), child, module)
    return root


def swap(model: nn.Module, targets: list[Target], convert: Callable[[nn.Module], nn.Module],
         progress: bool | None, desc: str) -> nn.Module:  # fmt: skip
    """Replaces each target by convert(layer), called once per layer and set under each of its names
    (a layer registered under two names stays one layer), with a progress bar. A target named ""
    is the model itself: its conversion is returned."""
    with progress_bar(len(targets), progress, desc) as bar:
        for target in targets:
            if target.name == "":
                return convert(model)
            new = convert(target.module)
            for fqn in target.names:
                set_module(model, fqn, new)
            bar.update(1)
    route_fused_layers_through_modules(model)
    return model


def _keep_module_path(module, args):
    """No-op forward pre-hook; its presence is what turns torch's fused fast path off."""
    return None


def route_fused_layers_through_modules(model: nn.Module) -> None:
    """nn.TransformerEncoderLayer has a fused inference fast path (batch_first, eval, no grad) that
    reads linear1.weight / linear2.weight / self_attn.in_proj_weight and never calls those modules.
    With fastinfer layers there it would fail (they hold no float weights). torch skips that path
    when a submodule has a forward hook, so give the swapped layers a no-op pre-hook: the layer then
    calls our modules. nn.TransformerEncoder's nested-tensor path (eval, with a key padding mask)
    reads the first layer's float weights too and has no such switch: it is turned off on encoders
    whose layers hold fastinfer layers (use_nested_tensor = False, what enable_nested_tensor=False
    gives)."""
    def swapped(layer: nn.TransformerEncoderLayer) -> list[nn.Module]:  # the submodules no longer torch's float ones
        subs = (getattr(layer, n, None) for n in ("linear1", "linear2", "self_attn"))
        return [s for s in subs if s is not None and type(s) not in (nn.Linear, nn.MultiheadAttention)]

    for mod in model.modules():
        if isinstance(mod, nn.TransformerEncoderLayer):
            for sub in swapped(mod):
                if _keep_module_path not in sub._forward_pre_hooks.values():
                    sub.register_forward_pre_hook(_keep_module_path)
        if isinstance(mod, nn.TransformerEncoder) and getattr(mod, "use_nested_tensor", False) and len(mod.layers):
            if isinstance(mod.layers[0], nn.TransformerEncoderLayer) and swapped(mod.layers[0]):
                mod.use_nested_tensor = False
