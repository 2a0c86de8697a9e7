"""SmoothQuant (QuantConfig(smoothquant=alpha), fastinfer/convert/smooth.py): exact in float (folded
into pre-norm LayerNorms, or the layer's own input_scale), better int8 fidelity where activations
have outlier channels, files and state_dicts that keep the input scales, clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastinfer
from conftest import ISAS, assert_same, sqnr
from fastinfer import QuantConfig
from fastinfer.convert._select import scan
from fastinfer.convert.smooth import norm_groups, smooth
from fastinfer.nn import Int8Linear, SparseInt8Linear


def _gpt2_with_outliers():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=100, n_positions=64, n_embd=128, n_layer=2, n_head=4)
    gpt = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # LLM-like outlier channels: a few norm gains far above the rest
        for blk in gpt.transformer.h:
            blk.ln_1.weight[:4] *= 40
            blk.ln_2.weight[5:9] *= 40
    ids = [torch.randint(0, 100, (4, 32), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    return gpt, ids


def _float_equivalent(model, targets, done):
    """The smoothed float model with each input-scaled layer's x * input_scale applied by a hook."""
    for t in targets:
        how, inv = done.get(id(t.module), ("", None))
        if inv is not None:
            t.module.register_forward_pre_hook(lambda m, a, inv=inv: (a[0] * inv,))
    return model


def test_smoothing_is_exact_in_float_and_folds_into_pre_norms():
    gpt, ids = _gpt2_with_outliers()
    with torch.inference_mode():
        ref = gpt(ids[0]).logits
    g = copy.deepcopy(gpt)
    targets, _ = scan(g, ())
    assert ("transformer.h.0.ln_1", ["transformer.h.0.attn.c_attn"]) in norm_groups(g)
    done = smooth(g, targets, 0.5, ids[1:])
    rows = {t.name: done[id(t.module)][0] for t in targets}
    assert rows["transformer.h.1.mlp.c_fc"] == "SmoothQuant alpha=0.5 folded into transformer.h.1.ln_2"
    assert rows["transformer.h.1.mlp.c_proj"] == "SmoothQuant alpha=0.5 (input scaling)"
    assert done[id(g.transformer.h[0].attn.c_attn)][1] is None  # folded: nothing to do at run time
    assert not torch.equal(g.transformer.h[0].ln_1.weight, gpt.transformer.h[0].ln_1.weight)
    # lm_head shares the token embedding: smoothing lm_head must not change the embedding
    assert torch.equal(g.transformer.wte.weight, gpt.transformer.wte.weight)
    with torch.inference_mode():
        assert sqnr(ref, _float_equivalent(g, targets, done)(ids[0]).logits) > 90


def test_smoothquant_improves_int8_with_outliers():
    gpt, ids = _gpt2_with_outliers()
    with torch.inference_mode():
        ref = gpt(ids[0]).logits
        plain = sqnr(ref, fastinfer.quantize(gpt)(ids[0]).logits)
        q = fastinfer.quantize(gpt, QuantConfig(smoothquant=0.5), calibration_data=ids[1:])
        smoothed = sqnr(ref, q(ids[0]).logits)
    assert smoothed > plain + 3, (plain, smoothed)
    assert q.transformer.h[0].attn.c_attn.input_scale is None  # folded into ln_1
    assert q.transformer.h[0].attn.c_proj.input_scale is not None
    rep = {r.name: r.detail for r in fastinfer.conversion_report(q)}
    assert "folded into transformer.h.0.ln_1" in rep["transformer.h.0.attn.c_attn"]
    assert "gelu_tanh fused" in rep["transformer.h.0.mlp.c_fc"] and "SmoothQuant" in rep["transformer.h.0.mlp.c_fc"]
    assert "input_scale=SmoothQuant" in repr(q.transformer.h[0].attn.c_proj)


def test_llama_and_encoder_norm_first_groups():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    llama = transformers.LlamaForCausalLM(cfg).eval()
    groups = dict(norm_groups(llama))
    assert groups["model.layers.0.input_layernorm"] == [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    assert groups["model.layers.0.post_attention_layernorm"] == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    ids = [torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    q = fastinfer.quantize(llama, QuantConfig(smoothquant=0.5), calibration_data=ids[1:])
    with torch.inference_mode():
        assert sqnr(llama(ids[0]).logits, q(ids[0]).logits) > 20
    enc = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True, norm_first=True).eval()
    assert dict(norm_groups(enc)) == {"norm2": ["linear1"]}
    post = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True).eval()  # post-norm: nothing to fold into
    assert norm_groups(post) == []


def test_input_scale_layer_files_state_dict_every_isa(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 16)).eval()
    calib = [torch.randn(8, 64) * torch.tensor([30.0] * 4 + [1.0] * 60) for _ in range(3)]
    x = calib[0][:5].clone()
    with torch.inference_mode():
        ref = model(x)
        plain = sqnr(ref, fastinfer.quantize(model)(x))
    q = fastinfer.quantize(model, QuantConfig(smoothquant=0.5), calibration_data=calib[1:])
    assert q[0].input_scale is not None and q[0].input_scale.shape == (64,) and (q[0].input_scale > 0).all()
    with torch.inference_mode():
        want = q(x)
    assert sqnr(ref, want) > plain
    # the layer equals x * input_scale through a plain Int8Linear of the same weights
    bare = Int8Linear(64, 128, activation="relu")
    bare.set_weight(q[0].weight_int8, q[0].weight_scale.clone())
    bare.bias.copy_(q[0].bias)
    assert_same(q[0](x), bare(x * q[0].input_scale), "input_scale")
    torch.testing.assert_close(q[0].dequantized_weight(), bare.dequantized_weight() * q[0].input_scale, rtol=0, atol=0)
    path = tmp_path / "sq.safetensors"
    fastinfer.save(q, path)
    for name in ISAS:
        fastinfer.set_isa(name)
        back = fastinfer.load(path, nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 16)))
        assert back[0].input_scale is not None
        with torch.inference_mode():
            if name == ISAS[0]:
                assert_same(back(x), want, "load")
            else:  # another ISA: the int8 part is exact, the epilogue the same operations
                assert_same(back(x), q(x), f"load on {name}")
    fastinfer.set_isa(ISAS[0])
    fresh = Int8Linear(64, 128, activation="relu")
    fresh.load_state_dict({k[2:]: v for k, v in q.state_dict().items() if k.startswith("0.")})
    assert_same(fresh(x), q[0](x), "state_dict")
    bad = {k[2:]: v.clone() for k, v in q.state_dict().items() if k.startswith("0.")}
    bad["input_scale"][3] = float("nan")
    with pytest.raises(RuntimeError, match="input scales must be finite and > 0"):
        Int8Linear(64, 128).load_state_dict(bad)
    # gradients flow through the input scaling
    xg = x.clone().requires_grad_(True)
    q(xg).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
    # sparsify keeps a smoothed layer dense (the sparse layers have no input scale)
    pruned = fastinfer.prune(q, 0.9)
    assert type(fastinfer.sparsify(pruned)[0]) is Int8Linear


def test_errors_and_layers_not_reached():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    with pytest.raises(ValueError, match="calibration_data"):
        fastinfer.quantize(model, QuantConfig(smoothquant=0.5))
    for bad in (-0.1, 1.5, True, "half"):
        with pytest.raises(ValueError, match="smoothquant"):
            QuantConfig(smoothquant=bad)
    with pytest.raises(ValueError, match="activations='dynamic'"):
        QuantConfig(smoothquant=0.5, activations="none")

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            return self.a(x)  # b is never called

    q = fastinfer.quantize(Branchy(), QuantConfig(smoothquant=0.5), calibration_data=[torch.randn(4, 16)])
    rows = {r.name: r.detail for r in fastinfer.conversion_report(q)}
    assert "(input scaling)" in rows["a"] and "never reached" in rows["b"]
    assert q.b.input_scale is None
