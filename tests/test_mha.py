"""nn.MultiheadAttention and nn.TransformerEncoder(Layer) through fastinfer.quantize:
Int8MultiheadAttention (int8 in/out projections, the fused attention kernel)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fastinfer
from fastinfer.nn import Int8Linear, Int8MultiheadAttention


def _mha(batch_first=True, e=64, h=4, seed=0, **kw):
    torch.manual_seed(seed)
    return nn.MultiheadAttention(e, h, batch_first=batch_first, **kw).eval()


def _x(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_the_int8_module_is_its_int8_layers_around_the_kernel():
    """Bit for bit: in_proj (one Int8Linear, q k v together), the fused attention (torch's SDPA on
    an ISA without the kernel), out_proj."""
    q = fastinfer.quantize(_mha())
    assert type(q) is Int8MultiheadAttention and type(q.in_proj) is Int8Linear and q.in_proj.out_features == 192
    x = _x(3, 11, 64)
    mask = torch.rand(11, 11, generator=torch.Generator().manual_seed(2)) > 0.8  # True: may not attend
    kpm = torch.zeros(3, 11, dtype=torch.bool)
    kpm[2, 7:] = True
    with torch.inference_mode():
        out, w = q(x, x, x, key_padding_mask=kpm, attn_mask=mask, need_weights=False)
        qkv = q.in_proj(x).view(3, 11, 3, 4, 16)
        qh, kh, vh = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        keep = ~mask.view(1, 1, 11, 11) & ~kpm.view(3, 1, 1, 11)
        if fastinfer.ops.attention_native():
            att = fastinfer.ops.attention(qh, kh, vh, keep, scale=0.25)
        else:  # no kernel of its own on this ISA: torch's SDPA is the faster one there
            att = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=keep, scale=0.25)
        want = q.out_proj(att.transpose(1, 2).reshape(3, 11, 64))
    assert w is None and torch.equal(out, want)


@pytest.mark.parametrize("batch_first", [True, False])
def test_close_to_the_float_module(batch_first):
    mha = _mha(batch_first)
    q = fastinfer.quantize(mha)
    x = _x(3, 9, 64) if batch_first else _x(9, 3, 64)
    mem = _x(3, 13, 64, seed=3) if batch_first else _x(13, 3, 64, seed=3)
    kpm = torch.zeros(3, 13, dtype=torch.bool)
    kpm[1, 10:] = True
    fmask = torch.randn(9, 13)
    with torch.inference_mode():
        for args, kw in [((x, x, x), {}), ((x, mem, mem), {"key_padding_mask": kpm}),
                         ((x, mem, mem), {"attn_mask": fmask}), ((x, x, x), {"need_weights": False})]:  # fmt: skip
            got, gw = q(*args, **kw)
            want, ww = mha(*args, **kw)
            assert got.shape == want.shape and _rel(got, want) < 0.02, kw
            assert (gw is None) == (ww is None)
            if ww is not None:
                assert gw.shape == ww.shape and (gw - ww).abs().max().item() < 0.01
        # causal: is_causal with its mask (torch's contract) and alone
        causal = nn.Transformer.generate_square_subsequent_mask(9)
        want, _ = mha(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)
        for kw in ({"attn_mask": causal}, {}):
            got, _ = q(x, x, x, is_causal=True, need_weights=False, **kw)
            assert _rel(got, want) < 0.02
        # unbatched input
        got, _ = q(x[0] if batch_first else x[:, 0], mem[0] if batch_first else mem[:, 0], mem[0] if batch_first else mem[:, 0])
        want, _ = mha(x[0] if batch_first else x[:, 0], mem[0] if batch_first else mem[:, 0], mem[0] if batch_first else mem[:, 0])
        assert got.shape == want.shape and _rel(got, want) < 0.02


def test_attention_false_takes_torch_sdpa_with_the_same_int8_layers():
    mha = _mha()
    fused = fastinfer.quantize(mha)
    plain = fastinfer.quantize(mha, fastinfer.QuantConfig(attention=False))
    assert not plain.fused_attention and "torch SDPA" in repr(plain)
    assert torch.equal(plain.in_proj.packed_weight, fused.in_proj.packed_weight)
    x = _x(2, 10, 64)
    with torch.inference_mode():
        a, _ = fused(x, x, x, need_weights=False)
        b, _ = plain(x, x, x, need_weights=False)
    assert (a - b).abs().max().item() < 1e-5


def test_transformer_encoder_with_padding_and_bf16():
    """Quantized encoders used to crash in eval with a padding mask: torch's nested-tensor path
    reads layers[0].linear1.weight. It is off for them now, and results match the float model."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 128, batch_first=True, dropout=0.0), 2).eval()
    assert enc.use_nested_tensor
    q = fastinfer.quantize(enc)
    assert not q.use_nested_tensor and enc.use_nested_tensor
    rep = fastinfer.conversion_report(q)
    assert [r.result for r in rep] == ["Int8MultiheadAttention", "Int8Linear", "Int8Linear"] * 2
    x = _x(3, 10, 64)
    kpm = torch.zeros(3, 10, dtype=torch.bool)
    kpm[1, 6:] = True
    with torch.inference_mode():
        got, want = q(x, src_key_padding_mask=kpm), enc(x, src_key_padding_mask=kpm)
        assert _rel(got[~kpm], want[~kpm]) < 0.02
        qb = fastinfer.quantize(enc.bfloat16())
        gb = qb(x.bfloat16(), src_key_padding_mask=kpm)
    assert gb.dtype == torch.bfloat16 and _rel(gb.float()[~kpm], want[~kpm]) < 0.03


def test_training_mode_and_gradients():
    """Dropout in training goes through torch's SDPA; the input gradient flows (never None)."""
    q = fastinfer.quantize(_mha(dropout=0.5))
    x = _x(2, 6, 64).requires_grad_(True)
    out, _ = q(x, x, x, need_weights=False)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    q.train()
    a, _ = q(x, x, x, need_weights=False)
    b, _ = q(x, x, x, need_weights=False)
    assert not torch.equal(a, b)  # dropout is on


def test_modules_left_float_say_why():
    model = nn.ModuleDict({"kv": nn.MultiheadAttention(32, 2, add_bias_kv=True), "dims": nn.MultiheadAttention(32, 2, kdim=16, vdim=16),
                           "skipped": nn.MultiheadAttention(32, 2), "ok": nn.MultiheadAttention(32, 2)})  # fmt: skip
    q = fastinfer.quantize(model, fastinfer.QuantConfig(skip=["skipped"]))
    rows = {r.name: r for r in fastinfer.conversion_report(q)}
    assert rows["kv"].result == "float" and "add_bias_kv" in rows["kv"].detail
    assert rows["dims"].result == "float" and "kdim" in rows["dims"].detail
    assert rows["skipped"].detail == "skipped by QuantConfig.skip"
    assert rows["ok"].result == "Int8MultiheadAttention" and type(q["ok"]) is Int8MultiheadAttention
    assert type(q["kv"]) is nn.MultiheadAttention


def test_save_load_and_compile(tmp_path):
    def build():
        torch.manual_seed(3)
        return nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0), 1, enable_nested_tensor=False).eval()

    q = fastinfer.quantize(build())
    fastinfer.save(q, tmp_path / "enc.safetensors")
    loaded = fastinfer.load(tmp_path / "enc.safetensors", build)
    assert type(loaded.layers[0].self_attn) is Int8MultiheadAttention
    x = _x(7, 2, 32)
    with torch.inference_mode():
        assert torch.equal(loaded(x), q(x))
    mha = fastinfer.quantize(_mha(e=32, h=2))
    fn = torch.compile(lambda t: mha(t, t, t, need_weights=False)[0], fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(fn(x), mha(x, x, x, need_weights=False)[0], atol=1e-6)


def test_a_fully_masked_row_gives_zeros_like_torch():
    mha = _mha()
    q = fastinfer.quantize(mha)
    x = _x(1, 5, 64)
    mask = torch.zeros(5, 5, dtype=torch.bool)
    mask[2] = True  # query 2 may attend nothing
    with torch.inference_mode():
        for need in (True, False):
            out, _ = q(x, x, x, attn_mask=mask, need_weights=need)
            assert torch.isfinite(out).all()
            assert torch.equal(out[0, 2], q.out_proj(torch.zeros(1, 64))[0]), need  # only out_proj's bias
    assert math.isfinite(_rel(out, mha(x, x, x, attn_mask=mask, need_weights=False)[0].nan_to_num()))
