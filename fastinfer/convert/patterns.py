"""Which activation follows which linear layer: the small pattern registry behind
QuantConfig(fuse_activations=True). A pattern says that a parent module's forward applies one
activation child to one linear child's output, and to nothing else, so the activation can move into
the int8 layer's epilogue and the child become fastinfer.nn.Fused:

  nn.Sequential             a layer, then the activation module right after it
  BERT-style blocks         `dense` + `intermediate_act_fn` of transformers' *Intermediate classes
                            (BertIntermediate and its many copies)
  transformers MLP classes  _MLP_PATTERNS below, read from their forward(): GPT-2's c_fc -> act, the
                            gate projection of LLaMA-style gated MLPs -> act_fn (the SiLU that
                            multiplies the up projection afterwards)

Where torch.fx can trace the model, the trace must also show act(layer(x)) with neither module used
anywhere else. Activations are matched by exact type, so a subclass that may compute something else is never
fused: erf GELU, the tanh GELU (torch's approximate="tanh", transformers' gelu_new / fast /
pytorch_tanh), SiLU, ReLU, ReLU6 and Hardswish.
"""

from __future__ import annotations

from torch import nn
from torch.nn import functional as F

from fastinfer.convert._select import Target
from fastinfer.convert.fuse import FxGraph, activation_name as conv_activation_name

__all__ = ["MLP_PATTERNS", "is_erf_gelu", "linear_activation", "linear_activation_fusions"]

# transformers class name -> (linear child, activation child) its forward() fuses as act(linear(x)).
MLP_PATTERNS: dict[str, tuple[str, str]] = {
    "GPT2MLP": ("c_fc", "act"),
    **{name: ("gate_proj", "act_fn") for name in ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "GemmaMLP")},
}

# transformers.activations classes that compute GELU's tanh form exactly as torch's approximate="tanh"
_HF_TANH_GELU = {"NewGELUActivation", "GELUTanh", "FastGELUActivation"}


def _from_transformers(mod: object, names: set[str]) -> bool:
    t = type(mod)
    return t.__name__ in names and t.__module__ == "transformers.activations"


def is_erf_gelu(mod: object) -> bool:
    """Whether mod is an erf GELU module: torch's nn.GELU(approximate="none"), or transformers'
    GELUActivation (BERT's "gelu"; its tanh / "new" / quick / fast relatives are other classes)."""
    if type(mod) is nn.GELU:
        return mod.approximate == "none"
    if _from_transformers(mod, {"GELUActivation"}):
        act = getattr(mod, "act", None)
        return act is F.gelu or getattr(act, "__name__", None) == "_gelu_python"
    return False


def linear_activation(mod: object) -> str | None:
    """The epilogue name ("gelu", "gelu_tanh", "silu", "relu", "relu6", "hardswish") of an
    activation module an int8 linear layer can fuse, else None."""
    if is_erf_gelu(mod):
        return "gelu"
    if (type(mod) is nn.GELU and mod.approximate == "tanh") or _from_transformers(mod, _HF_TANH_GELU):
        return "gelu_tanh"
    if _from_transformers(mod, {"SiLUActivation"}):
        return "silu"
    return conv_activation_name(mod)


def _usable(act: nn.Module | None, uses: dict[int, int]) -> bool:
    """Registered once in the model and without hooks (replacing it must not change anything else)."""
    return act is not None and uses.get(id(act), 0) == 1 and not (act._forward_hooks or act._forward_pre_hooks)


def linear_activation_fusions(model: nn.Module, targets: list[Target],
                              graph: FxGraph | None = None) -> dict[int, tuple[nn.Module, str, str, str]]:  # fmt: skip
    """id(layer) -> (its parent, the parent's child name of the activation that follows it, the
    activation's epilogue name, a note for the report) for each target a pattern shows is followed
    by an activation applied to its output only. graph: the model's torch.fx trace (fuse.fx_graph);
    where there is one it must confirm act(layer(x)) with neither module used anywhere else (a
    parent that also calls a Sequential's member itself, say). Without a trace the transformers
    classes are trusted (their forward is known) and nn.Sequential order is, with a note in the
    report. A target registered under several names is left alone (its other users would get the
    activation too), as is one that is the model itself."""
    uses: dict[int, int] = {}
    for _, mod in model.named_modules(remove_duplicate=False):
        uses[id(mod)] = uses.get(id(mod), 0) + 1
    fused: dict[int, tuple[nn.Module, str, str, str]] = {}
    for target in targets:
        if len(target.names) != 1 or target.name == "":
            continue
        parent_name, _, child = target.name.rpartition(".")
        parent = model.get_submodule(parent_name)
        cls, slot, sequential = type(parent), None, False
        if isinstance(parent, nn.Sequential) and cls.forward is nn.Sequential.forward:
            keys = list(parent._modules)
            i = keys.index(child)
            slot, sequential = (keys[i + 1] if i + 1 < len(keys) else None), True
        elif cls.__module__.startswith("transformers."):
            if child == "dense" and cls.__name__.endswith("Intermediate"):  # BertIntermediate and its copies
                slot = "intermediate_act_fn"
            elif MLP_PATTERNS.get(cls.__name__, ("",))[0] == child:
                slot = MLP_PATTERNS[cls.__name__][1]
        act = parent._modules.get(slot) if slot else None
        name = linear_activation(act)
        if name is None or not _usable(act, uses):
            continue
        if graph is not None and not graph.feeds_only(target.module, act):
            continue
        note = " (from nn.Sequential order: the model has no fx trace)" if graph is None and sequential else ""
        fused[id(target.module)] = (parent, slot, name, note)
    return fused
