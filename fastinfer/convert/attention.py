"""Hugging Face models' attention on fastinfer's fused kernel (fastinfer.ops.attention).

transformers dispatches every attention module of a model through one registry
(`AttentionInterface`, chosen by `config._attn_implementation`). fastinfer registers itself there
as "fastinfer" and switches a model that uses torch's SDPA ("sdpa", transformers' default) to it:
the modules keep their own code (projections, rotary embeddings, caches) and only the
softmax(q k^T) v step changes. The call takes torch's own path instead, calling exactly what "sdpa"
would, where the fused kernel does not apply: autograd recording (training, saliency), dropout,
extras SDPA handles itself (softcap, position bias, attention sinks, output_attentions), tensors off
the CPU, or a CPU without the kernel's ISA (the reference kernel is slower than torch's there).
"""

from __future__ import annotations

import math
import sys

import torch
from torch import nn

from fastinfer.ops._common import eager_fast_path
from fastinfer.ops.attention import attention_cpu, kernel_serves

__all__ = ["HF_NAME", "HF_NAME_BF16", "enable_fast_attention", "hf_attention_forward", "is_hf_model",
           "register_hf_attention"]  # fmt: skip

HF_NAME = "fastinfer"
# the same kernel with fp32 q, k, v rounded to bf16 for its two products (fastinfer.ops.attention's bf16)
HF_NAME_BF16 = "fastinfer_bf16"
# attn_implementation values fastinfer replaces: torch's SDPA. "eager" (often chosen to read the
# attention weights), flash and flex attention are a user's choice and are kept.
_REPLACES = ("sdpa",)
_registered = False


def _sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def _fused_applies(query, key, value, attention_mask, dropout, kwargs) -> bool:
    """kernel_serves, and a call the kernel takes as transformers' SDPA path would: 4-D tensors of
    one batch, a mask of the kernel's dtypes that broadcasts to the scores, none of the extras
    SDPA handles itself."""
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4 or query.shape[0] != key.shape[0]:
        return False  # (SDPA broadcasts a batch of one, e.g. learned queries; the kernel does not)
    if attention_mask is not None:
        b, h, lq, lk = query.shape[0], query.shape[1], query.shape[2], key.shape[2]
        if attention_mask.device.type != "cpu" or attention_mask.dtype not in (torch.bool, torch.float32, torch.bfloat16):
            return False
        if attention_mask.dim() > 4 or any(n not in (1, full) for n, full in zip(attention_mask.shape[::-1], (lk, lq, h, b))):
            return False
    if kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None or kwargs.get("output_attentions"):
        return False
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        return False
    return kernel_serves(query, key, value, dropout or 0.0)


def hf_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                         is_causal: bool | None = None, *, _bf16: bool = False, **kwargs) -> tuple[torch.Tensor, None]:  # fmt: skip
    """transformers' attention-function contract (that of its sdpa_attention_forward): q [batch,
    heads, q_len, d], k / v [batch, kv_heads, keys, d] -> ([batch, q_len, heads, dv], None)."""
    if not _fused_applies(query, key, value, attention_mask, dropout, kwargs):
        return _sdpa()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                       is_causal=is_causal, **kwargs)  # fmt: skip
    q_len = query.shape[2]
    # the causal rule of transformers' sdpa_attention_forward: a mask, when given, already holds it
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = bool(q_len > 1 and attention_mask is None and is_causal)
    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    return _kernel(query, key, value, attention_mask, scale, is_causal, _bf16), None


def hf_attention_forward_bf16(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0,
                              scaling: float | None = None, is_causal: bool | None = None, **kwargs):  # fmt: skip
    """hf_attention_forward with fp32 q, k, v rounded to bf16 for the kernel's products."""
    return hf_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, _bf16=True,
                                **kwargs)  # fmt: skip


def _kernel(q, k, v, mask, scale: float, is_causal: bool, bf16: bool = False) -> torch.Tensor:
    """The fused op (one name the tests can watch); in plain eager calls its CPU kernel directly,
    as the layers' fast path does (the dispatcher adds ~12 us, a decoding step's whole attention)."""
    if eager_fast_path(q):
        return attention_cpu(q, k, v, mask, scale, is_causal, bf16)
    return torch.ops.fastinfer.attention(q, k, v, mask, scale, is_causal, bf16)


def register_hf_attention() -> bool:
    """Registers "fastinfer" with transformers' attention and attention-mask registries (once);
    False when transformers is not installed."""
    global _registered
    if _registered:
        return True
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return False
    AttentionInterface.register(HF_NAME, hf_attention_forward)
    AttentionInterface.register(HF_NAME_BF16, hf_attention_forward_bf16)
    AttentionMaskInterface.register(HF_NAME, sdpa_mask)  # the same masks SDPA gets
    AttentionMaskInterface.register(HF_NAME_BF16, sdpa_mask)
    _registered = True
    return True


def is_hf_model(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return hasattr(model, "set_attn_implementation") and config is not None and hasattr(config, "_attn_implementation")


def enable_fast_attention(model: nn.Module, bf16: bool = False) -> str | None:
    """Switches a transformers model that runs torch's SDPA to fastinfer's attention kernel, in
    place (bf16: with fp32 q, k, v rounded to bf16 for its products, "fastinfer_bf16"). Returns what
    was done, for the conversion report: "fastinfer kernel (was sdpa)", or why nothing changed; None
    for a model that is not a transformers model (left as it is). A model already on one of the two
    is switched to the one asked for."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"enable_fast_attention expects an nn.Module, got {type(model).__name__}")
    if not is_hf_model(model):
        return None
    current = model.config._attn_implementation
    name, what = (HF_NAME_BF16, "fastinfer kernel, bf16 arithmetic") if bf16 else (HF_NAME, "fastinfer kernel")
    if current == name:
        return what
    if current not in (*_REPLACES, HF_NAME, HF_NAME_BF16):
        return f"kept: the model's config chose attn_implementation={current!r}"
    if not getattr(model, "_can_set_attn_implementation", lambda: False)():
        return f"kept ({current}): {type(model).__name__} does not dispatch through transformers' AttentionInterface"
    if not register_hf_attention():  # pragma: no cover - a transformers model without transformers
        return "kept: transformers is not importable"
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        return f"kept ({current}): transformers refused attn_implementation={name!r}"
    return f"{what} (was {current})"


# A model converted in another process (pickled, or deep-copied into a worker) names "fastinfer" in its
# config: where transformers is already loaded, the name is registered as fastinfer is imported.
if "transformers" in sys.modules:
    register_hf_attention()
