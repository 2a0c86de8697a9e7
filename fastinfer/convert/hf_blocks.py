"""transformers' BERT-style blocks on a shorter road (QuantConfig(rewrite_blocks=True)).

Two rewrites, both of the blocks' classes, never of their code paths' results:

- **Output blocks** (BertSelfOutput, BertOutput and their ~80 copies: RoBERTa, ELECTRA, XLM-R,
  LayoutLM, ...) run `LayerNorm(dropout(dense(h)) + input)`. An Int8Linear adds the input in its
  epilogue (`dense(h, residual=input)`: one pass over the output instead of a write, then torch's
  add reading two tensors and writing a third).
- **Encoder layers** (BertLayer and its copies) run about twenty module calls per layer (three
  projections, the attention call, two output blocks, the intermediate block, dropouts, LayerNorms)
  through nn.Module.__call__, ~100 per MiniLM forward: at 2 threads the second thread waits while
  Python walks them. The fused layer calls the same modules' forward methods in the same order with
  the same arguments (the attention through transformers' own attention registry, exactly as the
  self-attention module does) and skips what is an identity in eval mode (the dropouts).

Each block becomes an instance of a subclass of its own class (`fused_class`) whose forward takes the
short road. The class keeps its name, isinstance, methods, attributes, hooks and state_dict. Its
forward falls back to the class's own wherever the short road could differ:
- dropout active (training);
- hooks on any module it would call directly (forward, pre-forward or backward; global ones too);
- a block's or a part's code patched since (on the class, or a forward set on the instance);
- for layers: a cache, cross-attention inputs, feed-forward chunking, or a deprecated keyword;
- torch.compile and torch.export (they trace the class's own forward);
- an output block's dense layer that does not add a residual in its kernel (weight-only, sparse,
  float, or one with an activation set: the add comes after it) adds it with torch instead.

A class qualifies by its code, not its name. It must come from transformers, and its forward
methods (and the parts' forwards, for a layer) must have a known fingerprint: a hash of the
function's AST with decorators, arguments, defaults and body, without annotations or docstrings.
The fingerprints below are of transformers 5.x's BertLayer, BertAttention, BertSelfAttention,
BertIntermediate and BertSelfOutput / BertOutput. The short road was written against that code and
is tested against it.

The subclasses are made on demand and found by name through this module (`__getattr__`), so a
pickled model unpickles in a fresh process, also one whose transformers has other code (its blocks
then take their own forward). fastinfer.save records the blocks that still qualify, and
fastinfer.load fuses those that qualify in the model it builds (the others run their own forward,
which computes the same).
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import textwrap

import torch
from torch import nn
from torch.nn.modules import module as _module

__all__ = ["block_fits", "fuse_block", "fuse_blocks", "fused_class", "fused_kind", "unfused_class"]

# fingerprints (_fingerprint) of the forwards the short roads reproduce
_OUTPUT = "aa85b8ef7205d0a0"  # h = dense(h); h = dropout(h); return LayerNorm(h + input_tensor)
_INTERMEDIATE = "93645cceeac2c9d0"  # act(dense(h))
_SELF_ATTENTION = "9856a7b5937c7179"  # q, k, v projections, the registry's attention, reshape
_ATTENTION = "3da74e35b3f83dc5"  # self-attention (no cross-attention), then the output block
_LAYER = "157dfc63a76170d7"  # attention, optional cross-attention, chunked feed-forward
_FEED_FORWARD = "464e7a72623313ac"  # BertLayer.feed_forward_chunk: output(intermediate(x), x)

_PREFIX = "_fastinfer_"  # the subclasses' __qualname__: _PREFIX + kind + ":" + module path ("/" for ".") + ":" + class
# transformers' own function wrappers: deprecate_kwarg (keyword renames) and the checkpointing
# wrapper GradientCheckpointingLayer puts on every subclass's forward (the fused classes get theirs)
_KNOWN_WRAPPERS = ("transformers/utils/deprecation.py", "transformers/modeling_layers.py")
_classes: dict[tuple[str, type], type] = {}
_prints: dict[object, str | None] = {}


def _fingerprint(fn) -> str | None:
    """A hash of fn's code as Python parses it: decorators, argument names and defaults, body
    (no annotations, docstring, comments or formatting); None where the source cannot be read."""
    key = fn
    if key in _prints:
        return _prints[key]
    out = None
    inner = fn
    while hasattr(inner, "__wrapped__"):  # a wrapper runs its own code: only transformers' own are known
        code = getattr(inner, "__code__", None)
        if code is None or not code.co_filename.replace("\\", "/").endswith(_KNOWN_WRAPPERS):
            _prints[key] = None
            return None
        inner = inner.__wrapped__
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        f = tree.body[0] if tree.body else None
        if isinstance(f, ast.FunctionDef):
            body = f.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):  # fmt: skip
                body = body[1:]
            a = f.args
            for arg in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg):
                if arg is not None:
                    arg.annotation = None
            parts = [ast.dump(d) for d in f.decorator_list] + [ast.dump(a)] + [ast.dump(s) for s in body]
            out = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    except (OSError, TypeError, SyntaxError):
        out = None
    _prints[key] = out
    return out


def _method_is(cls: type, name: str, print_: str) -> bool:
    fn = cls.__dict__.get(name)
    if fn is None:  # inherited: look where it is defined
        for base in cls.__mro__[1:]:
            if name in base.__dict__:
                fn = base.__dict__[name]
                break
    return fn is not None and cls.__module__.startswith("transformers.") and _fingerprint(fn) == print_


def _is(mod: object, print_: str) -> bool:
    return isinstance(mod, nn.Module) and _method_is(unfused_class(mod), "forward", print_)


def _takes_residual(dense: object) -> bool:
    """A dense layer whose kernel adds the block's input after its own output: one that adds a
    residual in its epilogue, with no activation (the add comes after it in the block's code)."""
    return getattr(type(dense), "_ADDS_RESIDUAL", False) is True and getattr(dense, "activation", None) is None


def _output_fits(block: object) -> bool:
    if not _is(block, _OUTPUT):
        return False
    m = block._modules
    return (type(m.get("dropout")) is nn.Dropout and isinstance(m.get("dense"), nn.Module)
            and isinstance(m.get("LayerNorm"), nn.Module))  # fmt: skip


def _parts(layer: object) -> tuple | None:
    """(attention, its self-attention, its output block, intermediate, output block) of a layer
    whose parts all have known code, else None."""
    mods = getattr(layer, "_modules", {})
    att, inter, out = mods.get("attention"), mods.get("intermediate"), mods.get("output")
    sa = att._modules.get("self") if isinstance(att, nn.Module) else None
    ao = att._modules.get("output") if isinstance(att, nn.Module) else None
    if _is(att, _ATTENTION) and _is(sa, _SELF_ATTENTION) and _output_fits(ao) and _is(inter, _INTERMEDIATE) \
            and _output_fits(out) and isinstance(inter._modules.get("dense"), nn.Module) \
            and isinstance(inter._modules.get("intermediate_act_fn"), nn.Module):  # fmt: skip
        return att, sa, ao, inter, out
    return None


def _layer_code_known(layer: object) -> bool:
    """The layer's own forward and feed_forward_chunk are the known code (checked again at each call:
    the class may have been patched since)."""
    return _is(layer, _LAYER) and _method_is(unfused_class(layer), "feed_forward_chunk", _FEED_FORWARD)


def _layer_fits(layer: object) -> bool:
    return _layer_code_known(layer) and _parts(layer) is not None


def block_fits(block: nn.Module, kind: str, fused: bool = False) -> bool:
    """Whether block qualifies for kind "output" (with a dense layer that takes the residual in its
    kernel) or "layer": a block not yet fused, or with fused=True one fused as that kind (whether it
    still does: a part may have been replaced since)."""
    if kind not in _MIXINS:
        raise ValueError(f"unknown block kind {kind!r}")
    if fused_kind(block) != (kind if fused else None):
        return False
    if kind == "output":
        return _output_fits(block) and _takes_residual(block._modules.get("dense"))
    return _layer_fits(block)


def _global_hooks() -> bool:
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks or _module._global_backward_pre_hooks)  # fmt: skip


def _hooked(mod: nn.Module) -> bool:
    """Hooks that calling mod.forward directly would skip. transformers' own output-capturing hooks
    (installed for good the first time a call asks for hidden states or attentions) do nothing
    while no call collects outputs: those are not counted then."""
    if mod._forward_pre_hooks or mod._backward_hooks or mod._backward_pre_hooks:
        return True
    hooks = mod._forward_hooks
    if not hooks:
        return False
    if not all(_is_capture_hook(h) for h in hooks.values()):
        return True
    return _collecting()


def _is_capture_hook(hook) -> bool:
    return (getattr(hook, "__module__", "") == "transformers.utils.output_capturing"
            and getattr(hook, "__name__", "") == "output_capturing_hook")  # fmt: skip


def _collecting() -> bool:
    """Whether transformers is collecting outputs in this call (True when that cannot be told)."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return True
    return bool(_active_collector.get())


def _output(block: nn.Module, h, residual):
    """An output block's forward in eval mode, its dropout (an identity there) skipped and the add
    in the dense layer's kernel where it has one."""
    m = block._modules
    dense = m["dense"]
    y = dense.forward(h, residual=residual) if _takes_residual(dense) else dense.forward(h) + residual
    return m["LayerNorm"].forward(y)


class _FusedOutput:
    """The forward of a fused output block (mixed in before the transformers class)."""

    def forward(self, hidden_states, input_tensor):
        m = self._modules
        dense, dropout = m.get("dense"), m.get("dropout")
        # the compiler first (it traces the class's own forward, and refuses the class-dict reads
        # below), then _output_fits: the class's code (patched since?) and a real nn.Dropout, dense
        # and LayerNorm
        if torch.compiler.is_compiling() or not _output_fits(self) or (dropout.training and dropout.p > 0) \
                or not _takes_residual(dense) or _hooked(dense) or _hooked(dropout) or _global_hooks():  # fmt: skip
            return super().forward(hidden_states, input_tensor)
        return m["LayerNorm"](dense(hidden_states, residual=input_tensor))


def _layer_parts(layer: nn.Module) -> tuple | None:
    """The modules the fused layer calls directly, or None where it must take the class's forward
    (a part replaced or subclassed, training, hooks, chunking, cross-attention)."""
    if layer.chunk_size_feed_forward or _global_hooks() or "feed_forward_chunk" in layer.__dict__ \
            or not _layer_code_known(layer):  # fmt: skip
        return None
    parts = _parts(layer)
    if parts is None:
        return None
    att, sa, ao, inter, out = parts
    if any("forward" in p.__dict__ for p in (att, sa, ao, inter, out)):  # a forward set on the instance runs
        return None
    if getattr(att, "is_cross_attention", False):
        return None
    q, k, v = sa._modules.get("query"), sa._modules.get("key"), sa._modules.get("value")
    for p in (att, sa, q, k, v, ao, *ao._modules.values(), inter, *inter._modules.values(), out, *out._modules.values()):
        if p is None or p.training or _hooked(p):  # (a part set to None: the class's forward says what that means)
            return None
    return sa, q, k, v, ao, inter, out


class _FusedLayer:
    """The forward of a fused encoder layer (mixed in before the transformers class): the class's
    own forward's module calls made as direct forward() calls, for an encoder without a cache."""

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                cache=None, **kwargs):  # fmt: skip
        parts = None
        # (torch.compile and export trace the class's own forward: the compiler removes the calls'
        # Python cost itself, and the checks below read class dicts its tracer refuses)
        if encoder_hidden_states is None and cache is None and "past_key_values" not in kwargs \
                and not torch.compiler.is_compiling():  # fmt: skip
            parts = _layer_parts(self)
        if parts is None:
            return super().forward(hidden_states, attention_mask, encoder_hidden_states,
                                   encoder_attention_mask=encoder_attention_mask, cache=cache, **kwargs)  # fmt: skip
        sa, q, k, v, ao, inter, out = parts
        # BertSelfAttention.forward: the projections as [batch, heads, tokens, head size] views
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, sa.attention_head_size)
        query = q.forward(hidden_states).view(*hidden_shape).transpose(1, 2)
        key = k.forward(hidden_states).view(*hidden_shape).transpose(1, 2)
        value = v.forward(hidden_states).view(*hidden_shape).transpose(1, 2)
        registry, eager = _attention_registry(sa)
        attention = registry.get_interface(sa.config._attn_implementation, eager)
        attn, _ = attention(sa, query, key, value, attention_mask, dropout=0.0, scaling=sa.scaling,
                            encoder_hidden_states=None, **kwargs)  # fmt: skip
        attn = attn.reshape(*input_shape, -1).contiguous()
        # BertAttention's output block, then BertLayer.feed_forward_chunk (no chunking)
        attention_output = _output(ao, attn, hidden_states)
        im = inter._modules
        intermediate = im["intermediate_act_fn"].forward(im["dense"].forward(attention_output))
        return _output(out, intermediate, attention_output)


def _attention_registry(sa: nn.Module):
    """(ALL_ATTENTION_FUNCTIONS, eager_attention_forward) as the self-attention's module sees them."""
    g = inspect.unwrap(unfused_class(sa).forward).__globals__
    return g["ALL_ATTENTION_FUNCTIONS"], g["eager_attention_forward"]


_MIXINS = {"output": _FusedOutput, "layer": _FusedLayer}


def fused_class(base: type, kind: str, strict: bool = True) -> type:
    """The fused subclass (kind "output" or "layer") of a transformers class (made once, found again
    by name). strict=False (unpickling) makes it for a class whose code is not the known one too:
    its forward then always takes the class's own, as every call checks the code first."""
    mixin = _MIXINS.get(kind)
    if mixin is None:
        raise ValueError(f"unknown block kind {kind!r}")
    fits = _method_is(base, "forward", _OUTPUT if kind == "output" else _LAYER)
    if strict and (not fits or (kind == "layer" and not _method_is(base, "feed_forward_chunk", _FEED_FORWARD))):
        raise TypeError(f"fastinfer: {base.__module__}.{base.__qualname__} is not a BERT-style {kind} block")
    cls = _classes.get((kind, base))
    if cls is None:
        qual = f"{_PREFIX}{kind}:{base.__module__.replace('.', '/')}:{base.__qualname__}"
        cls = type(base.__name__, (mixin, base), {"__module__": __name__, "__qualname__": qual,
                                                  "_fastinfer_base": base, "_fastinfer_kind": kind})  # fmt: skip
        _classes[(kind, base)] = cls
    return cls


def fused_kind(block: object) -> str | None:
    """"output" or "layer" for a fused block, else None."""
    return getattr(type(block), "_fastinfer_kind", None) if isinstance(block, (_FusedOutput, _FusedLayer)) else None


def unfused_class(block: nn.Module) -> type:
    """The transformers class of a block (the base of a fused one)."""
    return type(block)._fastinfer_base if fused_kind(block) else type(block)


def fuse_block(block: nn.Module, kind: str) -> bool:
    """Makes block an instance of its fused class of kind, in place, where it qualifies."""
    if not block_fits(block, kind):
        return False
    block.__class__ = fused_class(type(block), kind)
    return True


def fuse_blocks(model: nn.Module) -> dict[str, str]:
    """fuse_block on every output block and encoder layer of model. Returns {block name: kind}
    (the first name of a block registered under several)."""
    return {name: kind for name, block in model.named_modules() for kind in ("output", "layer") if fuse_block(block, kind)}


def __getattr__(name: str) -> type:
    """pickle's lookup of a fused class by its __qualname__ (in a process that has not made it yet)."""
    if name.startswith(_PREFIX):
        kind, _, rest = name[len(_PREFIX):].partition(":")
        module, _, qual = rest.rpartition(":")
        if kind in _MIXINS and module.startswith("transformers/"):
            base = importlib.import_module(module.replace("/", "."))
            for part in qual.split("."):
                base = getattr(base, part)
            if isinstance(base, type):
                # unpickling a converted transformers model in a process that imported fastinfer
                # first: its config names fastinfer's attention, registered once transformers is in
                from fastinfer.convert.attention import register_hf_attention

                register_hf_attention()
                return fused_class(base, kind, strict=False)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
