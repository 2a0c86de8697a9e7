"""Int8MultiheadAttention: nn.MultiheadAttention with int8 projections and the fused attention kernel."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from fastinfer.nn.linear import Int8Linear, quantize_weight_per_channel
from fastinfer.ops._common import eager_fast_path
from fastinfer.ops.attention import attention_cpu, kernel_serves


def mha_float_reason(mha: nn.MultiheadAttention) -> str | None:
    """Why an nn.MultiheadAttention cannot become an Int8MultiheadAttention (None: it can)."""
    if type(mha).forward is not nn.MultiheadAttention.forward:
        return f"subclass {type(mha).__name__} of nn.MultiheadAttention with its own forward"
    if not mha._qkv_same_embed_dim:
        return "kdim / vdim differ from embed_dim (separate q/k/v projection weights)"
    if mha.bias_k is not None or mha.add_zero_attn:
        return "add_bias_kv / add_zero_attn (extra key and value rows)"
    if not mha.in_proj_weight.is_floating_point() or mha.in_proj_weight.is_meta:
        return "its weights are not float values"
    return None


class Int8MultiheadAttention(nn.Module):
    """nn.MultiheadAttention (same forward signature and results within int8 error) whose input
    projection (the fused [3 * embed_dim, embed_dim] in_proj_weight) and output projection are
    Int8Linear layers, with softmax(q k^T / sqrt(d) + mask) v on fastinfer's fused kernel.

    Self-attention (query is key is value) runs one int8 GEMM for q, k and v together; cross
    attention projects each distinct input through the same layer and keeps the rows it needs.
    torch's SDPA takes the attention step where the kernel does not serve: autograd recording,
    dropout in training, a CPU without the kernel's ISA, or fused_attention=False (what
    QuantConfig(attention=False) gives). need_weights=True (nn.MultiheadAttention's default)
    computes the attention weights it returns with plain torch ops, as torch's own module does.
    """

    def __init__(self, embed_dim: int, num_heads: int, bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, fused_attention: bool = True) -> None:  # fmt: skip
        super().__init__()
        if embed_dim < 1 or num_heads < 1 or embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.fused_attention = fused_attention
        self._qkv_same_embed_dim = True  # read by nn.TransformerEncoderLayer's fast-path checks
        self.in_proj = Int8Linear(embed_dim, 3 * embed_dim, bias=bias)
        self.out_proj = Int8Linear(embed_dim, embed_dim, bias=bias)

    @property
    def in_proj_bias(self) -> torch.Tensor | None:  # nn.TransformerEncoderLayer reads it
        return self.in_proj.bias

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, fused_attention: bool = True) -> Int8MultiheadAttention:
        """Quantizes an nn.MultiheadAttention's projections (per output channel); the float module
        is left untouched."""
        why = mha_float_reason(mha) if isinstance(mha, nn.MultiheadAttention) else "not an nn.MultiheadAttention"
        if why:
            raise TypeError(f"Int8MultiheadAttention.from_mha: {why}")
        mod = cls(mha.embed_dim, mha.num_heads, bias=mha.in_proj_bias is not None, batch_first=mha.batch_first,
                  dropout=mha.dropout, fused_attention=fused_attention)  # fmt: skip
        for layer, weight, bias in ((mod.in_proj, mha.in_proj_weight, mha.in_proj_bias),
                                    (mod.out_proj, mha.out_proj.weight, mha.out_proj.bias)):  # fmt: skip
            layer.set_weight(*quantize_weight_per_channel(weight.detach().cpu()))
            if bias is not None:
                layer.bias.copy_(bias.detach().float())
        mod.train(mha.training)
        return mod

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}, "
                f"attention={'fastinfer' if self.fused_attention else 'torch SDPA'}")  # fmt: skip

    # ---------------------------------------------------------------------------------- forward

    def _project(self, query, key, value):
        """q, k, v [batch, heads, tokens, head_dim] (strided views of the projections)."""
        e, h, d = self.embed_dim, self.num_heads, self.head_dim
        if query is key and key is value:
            parts = self.in_proj(query).split(e, dim=-1)
        else:
            cache: dict[int, torch.Tensor] = {}

            def part(x, i):
                if id(x) not in cache:
                    cache[id(x)] = self.in_proj(x)
                return cache[id(x)][..., i * e : (i + 1) * e]

            parts = (part(query, 0), part(key, 1), part(value, 2))
        return [t.unflatten(-1, (h, d)).transpose(1, 2) for t in parts]

    def _mask(self, attn_mask, key_padding_mask, b, lq, lk, dtype):
        """torch's masks (True = may NOT attend; floats added) as one mask for SDPA semantics
        (True = may attend; floats added), broadcastable to [batch, heads, lq, lk]."""
        masks = []
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                attn_mask = attn_mask.view(1, 1, lq, lk)
            elif attn_mask.dim() == 3:
                attn_mask = attn_mask.view(b, self.num_heads, lq, lk)
            else:
                raise ValueError(f"attn_mask must be 2-D or 3-D, got shape {tuple(attn_mask.shape)}")
            masks.append(attn_mask)
        if key_padding_mask is not None:
            masks.append(key_padding_mask.view(b, 1, 1, lk))
        if not masks:
            return None
        if all(m.dtype == torch.bool for m in masks):
            keep = ~masks[0]
            return keep if len(masks) == 1 else keep & ~masks[1]
        out = None
        for m in masks:
            m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(m, -math.inf) if m.dtype == torch.bool else m.to(dtype)
            out = m if out is None else out + m
        return out

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        batched = query.dim() == 3
        if not batched:  # [tokens, embed]
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # [tokens, batch, embed]
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        b, lq, lk = query.shape[0], query.shape[1], key.shape[1]
        q, k, v = self._project(query, key, value)
        scale = 1.0 / math.sqrt(self.head_dim)
        # is_causal is a hint that attn_mask is the causal mask (torch's contract); alone, it means causal
        causal = is_causal and attn_mask is None and key_padding_mask is None
        if is_causal and not causal and attn_mask is None:
            attn_mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).triu_(1)
        mask = self._mask(attn_mask, key_padding_mask, b, lq, lk, q.dtype)
        weights = None
        if need_weights:
            scores = (q.float() @ k.float().transpose(-2, -1)) * scale
            if causal:
                scores = scores.masked_fill(torch.ones(lq, lk, dtype=torch.bool, device=q.device).triu_(1), -math.inf)
            if mask is not None:
                scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask.float()
            weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a fully masked row: zeros, as SDPA
            # (out of place: softmax's backward reads its own output)
            if self.training and self.dropout > 0:
                weights = F.dropout(weights, self.dropout)
            out = (weights @ v.float()).to(q.dtype).transpose(1, 2)
            weights = (weights.mean(dim=1) if average_attn_weights else weights).to(q.dtype)  # torch: the input's dtype
        elif self.fused_attention and kernel_serves(q, k, v, self.dropout if self.training else 0.0):
            out = (attention_cpu if eager_fast_path(q) else torch.ops.fastinfer.attention)(q, k, v, mask, scale, causal)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                                 dropout_p=self.dropout if self.training else 0.0).transpose(1, 2)  # fmt: skip
        out = self.out_proj(out.reshape(b, lq, self.embed_dim))
        if not batched:
            out = out.squeeze(0)
            weights = None if weights is None else weights.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1).contiguous()
        return out, weights
