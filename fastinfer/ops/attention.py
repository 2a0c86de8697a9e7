"""Scaled dot-product attention on the CPU: fastinfer::attention, one fused pass per head (scores,
mask, softmax and the weighted sum of values) in fp32 arithmetic on fp32 or bf16 tensors.

The op returns its output as [batch, q_len, heads, dv] (the layout a transformer's output
projection reads: no transpose copy after it); `attention()` is the SDPA-shaped wrapper and returns
the [batch, heads, q_len, dv] view of it. q, k and v may be any strided views with a unit inner
stride (e.g. heads sliced out of [batch, tokens, heads * d] projections: nothing is copied).
Semantics are torch's scaled_dot_product_attention's: `scale` defaults to 1/sqrt(d), a bool mask
says where to attend, a float mask is added to the scores, `is_causal` masks keys after the query
(top-left aligned), and a row whose every key is masked gives zeros. Grouped-query attention: k
and v may have fewer heads than q when they divide its heads. The backward recomputes the forward
with torch's own ops (exact gradients of the same function, within fp32 rounding).
"""

from __future__ import annotations

import math

import torch

from fastinfer._runtime import _C
from fastinfer.ops._common import DTYPE_CODE, check_device, check_tensor, new_output, register

__all__ = ["attention", "attention_native", "kernel_serves"]

torch.library.define(
    "fastinfer::attention",
    "(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, bool is_causal, bool bf16=False) -> Tensor",
)

_MASK_KIND = {torch.bool: 1, torch.float32: 2, torch.bfloat16: 3}
_F32_MAX = torch.finfo(torch.float32).max
_NAME = "attention"


def attention_native() -> bool:
    """Whether the active ISA has its own attention kernel (AVX-512 today). Without one the op still
    runs, on the scalar reference kernel: correct but slower than torch's SDPA, so the converted
    models keep torch's attention there."""
    return bool(_C.attention_simd())


def kernel_serves(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float = 0.0) -> bool:
    """Whether a model's attention call should run on the fused kernel rather than torch's SDPA:
    CPU tensors of one dtype, fp32 or bf16, no dropout, no autograd to record (SDPA's fused backward
    is the better one), and an ISA with the kernel (under torch.compile the op goes in the graph)."""
    if any(t.device.type != "cpu" for t in (q, k, v)) or not (q.dtype == k.dtype == v.dtype):
        return False
    if q.dtype not in DTYPE_CODE or dropout > 0.0:
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    return torch.compiler.is_compiling() or attention_native()


def _check(q, k, v, mask, scale) -> tuple[int, int, int, int, int, int, int]:
    for arg, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(_NAME, arg, t)
        if t.dim() != 4:
            raise ValueError(f"fastinfer.{_NAME}: {arg} must be 4-D [batch, heads, tokens, head_dim], got shape {tuple(t.shape)}")
        if t.dtype not in DTYPE_CODE:
            raise TypeError(f"fastinfer.{_NAME}: {arg} must be float32 or bfloat16, got {t.dtype}")
    check_device(_NAME, q=q, k=k, v=v, mask=mask)
    if not (q.device == k.device == v.device) or (mask is not None and mask.device != q.device):
        where = ", ".join(str(t.device) for t in (q, k, v, mask) if t is not None)
        raise ValueError(f"fastinfer.{_NAME}: q, k, v and the mask must be on one device, got {where}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"fastinfer.{_NAME}: q, k and v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, h, lq, d = q.shape
    _, hk, lk, dv = v.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"fastinfer.{_NAME}: q, k and v must have one batch size, got {b}, {k.shape[0]}, {v.shape[0]}")
    if tuple(k.shape[1:3]) != (hk, lk) or k.shape[3] != d:
        raise ValueError(f"fastinfer.{_NAME}: k must be [batch, kv_heads, keys, {d}] with v [batch, kv_heads, keys, dv], "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}")  # fmt: skip
    if hk == 0 and h > 0 or hk > 0 and h % hk != 0:
        raise ValueError(f"fastinfer.{_NAME}: the {h} query heads must be a multiple of the {hk} key/value heads")
    if mask is not None:
        check_tensor(_NAME, "mask", mask)
        if mask.dtype not in _MASK_KIND:
            raise TypeError(f"fastinfer.{_NAME}: mask must be bool, float32 or bfloat16, got {mask.dtype}")
        # each dim 1 or the output's (torch.broadcast_shapes would say the same, in ~10 us a call)
        fits = mask.dim() <= 4 and all(n == 1 or n == full for n, full in zip(mask.shape[::-1], (lk, lq, h, b)))
        if not fits:
            raise ValueError(f"fastinfer.{_NAME}: mask of shape {tuple(mask.shape)} does not broadcast to "
                             f"[batch, heads, q_len, keys] = {(b, h, lq, lk)}")  # fmt: skip
    if not isinstance(scale, float) or not math.isfinite(scale) or abs(scale) > _F32_MAX:
        raise ValueError(f"fastinfer.{_NAME}: scale must be a finite float (in float32's range), got {scale!r}")
    return b, h, hk, lq, lk, d, dv


@torch.library.register_fake("fastinfer::attention")
def _attention_fake(q, k, v, mask, scale, is_causal, bf16=False):
    b, h, _, lq, _, _, dv = _check(q, k, v, mask, scale)
    return q.new_empty((b, lq, h, dv))


def _unit_inner(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def run_attention(q, k, v, mask, scale: float, is_causal: bool, sizes, bf16: bool = False) -> torch.Tensor:
    """The marshalling of _C.attention on checked arguments: the [batch, q_len, heads, dv] output."""
    b, h, hk, lq, lk, d, dv = sizes
    out = new_output((b, lq, h, dv), q.dtype)
    if out.numel() == 0:
        return out
    q, k, v = _unit_inner(q), _unit_inner(k), _unit_inner(v)
    mptr, kind, ms = 0, 0, [0, 0, 0]
    if mask is not None and lk > 0:  # with no keys there is nothing to mask (and no mask data)
        mask = mask.expand(b, h, lq, lk)
        if lk > 1 and mask.stride(-1) != 1:
            mask = mask.contiguous()
        mptr, kind, ms = mask.data_ptr(), _MASK_KIND[mask.dtype], list(mask.stride()[:3])
    strides = [*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *ms, out.stride(0), out.stride(1), out.stride(2)]
    _C.attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), DTYPE_CODE[q.dtype], [b, h, hk, lq, lk, d, dv], strides,
                 mptr, kind, scale, bool(is_causal), out.data_ptr(), bool(bf16))  # fmt: skip
    return out


@register(_NAME, "CPU")
def attention_cpu(q, k, v, mask, scale: float, is_causal: bool, bf16: bool = False) -> torch.Tensor:
    """The op's CPU kernel: checks, then run_attention. Called directly (without the dispatcher,
    ~12 us a call) by eager callers that record no autograd (fastinfer.convert.attention)."""
    sizes = _check(q, k, v, mask, scale)
    return run_attention(q, k, v, mask, scale, is_causal, sizes, bf16)


@register(_NAME, "cuda")
def _attention_cuda(q, k, v, mask, scale, is_causal, bf16=False):
    raise RuntimeError(
        "fastinfer.attention runs on the CPU only; on CUDA use torch's scaled_dot_product_attention "
        "(the models fastinfer converts take it for CUDA tensors)"
    )


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None, *,
              is_causal: bool = False, scale: float | None = None, bf16: bool = False) -> torch.Tensor:  # fmt: skip
    """torch.nn.functional.scaled_dot_product_attention on fastinfer's CPU kernel (no dropout):
    q [batch, heads, q_len, d], k [batch, kv_heads, keys, d], v [batch, kv_heads, keys, dv] ->
    [batch, heads, q_len, dv] (a view of the op's [batch, q_len, heads, dv] output).
    bf16=True: fp32 q, k, v are rounded to bf16 for the two products, as bf16 tensors are (the
    probabilities too; scores, softmax and sums stay fp32; the output is fp32): on a CPU with
    AVX512_BF16 the bf16 kernel then runs on fp32 tensors, 1.3-1.6x the fp32 one here, with bf16's
    error (~4e-3 on values ~N(0, 1)). Elsewhere, and for fewer than 4 query rows, the fp32 kernel
    runs as without it."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if isinstance(q, torch.Tensor) and q.dim() == 4 and q.shape[-1] > 0 else 1.0
    if is_causal and attn_mask is not None:
        raise ValueError("fastinfer.attention: pass either attn_mask or is_causal=True, not both (as torch's SDPA)")
    return torch.ops.fastinfer.attention(q, k, v, attn_mask, float(scale), bool(is_causal), bool(bf16)).transpose(1, 2)


# ------------------------------------------------------------------------------------- backward


def _setup_context(ctx, inputs, output):
    q, k, v, mask, scale, is_causal, *_ = inputs  # (bf16: the gradients are fp32 SDPA's)
    ctx.save_for_backward(q, k, v, mask)
    ctx.meta = (scale, is_causal)


def _backward(ctx, grad):
    """Gradients of the same function through torch's SDPA, on inputs it takes in every case: the
    mask (and is_causal) as one additive float mask [.., lq, lk] in q's dtype, grouped-query heads
    repeated. The mask's own gradient too, where it is a float tensor that asks for one."""
    q, k, v, mask = ctx.saved_tensors
    scale, is_causal = ctx.meta
    lq, lk = q.shape[2], k.shape[2]
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(t.requires_grad) for t in (q, k, v)]
        m = None
        if mask is not None:
            m = mask.detach().requires_grad_(mask.requires_grad and mask.is_floating_point())
            leaves.append(m)
        qq, kk, vv = leaves[:3]
        hq, hk = q.shape[1], k.shape[1]
        if hk != hq:  # grouped-query: each key/value head serves hq / hk query heads
            kk, vv = kk.repeat_interleave(hq // hk, 1), vv.repeat_interleave(hq // hk, 1)
        add = None
        if m is not None:
            add = m.to(q.dtype) if m.is_floating_point() else torch.zeros(m.shape, dtype=q.dtype).masked_fill(~m, -math.inf)
        if is_causal:
            causal = torch.zeros(lq, lk, dtype=q.dtype).masked_fill(torch.ones(lq, lk, dtype=torch.bool).triu(1), -math.inf)
            add = causal if add is None else add + causal
        if add is not None:
            add = add.expand(q.shape[0], hq, lq, lk)
        out = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, attn_mask=add, scale=scale).transpose(1, 2)
        need = [t for t in leaves if t.requires_grad]
        grads = iter(torch.autograd.grad(out, need, grad)) if need else iter(())
    gq, gk, gv, *gm = (next(grads) if t.requires_grad else None for t in leaves)
    return gq, gk, gv, (gm[0] if gm else None), None, None, None


torch.library.register_autograd("fastinfer::attention", _backward, setup_context=_setup_context)
