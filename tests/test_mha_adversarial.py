"""Adversarial checks of Int8MultiheadAttention (fastinfer/nn/attention.py), nn.Transformer*
conversion, the linear->activation fusion patterns (fastinfer/convert/patterns.py) and the fused
activations' gradients (fastinfer/ops/_common.py activation_grad).

The defects a review found are tests here too, now passing (each says what went wrong before the
fix); the others pin edge cases that behaved correctly already."""

from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fastinfer
from fastinfer.nn import Int8Linear, Int8MultiheadAttention
from fastinfer.ops._common import activation_grad



@pytest.fixture(autouse=True)
def _quiet_conversions():
    """No summary line per conversion here (restored after each test: other tests read the log)."""
    log = logging.getLogger("fastinfer")
    level = log.level
    log.setLevel(logging.ERROR)
    yield
    log.setLevel(level)

E, H = 32, 4
NOFUSE = fastinfer.QuantConfig(fuse_activations=False)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _mha(batch_first=True, **kw):
    torch.manual_seed(0)
    m = nn.MultiheadAttention(E, H, batch_first=batch_first, **kw).eval()
    return m, fastinfer.quantize(m)


def _inputs(batch_first=True):
    x, y, z = (torch.randn(2, n, E, generator=_g(s)) for s, n in ((1, 5), (2, 7), (3, 7)))
    if not batch_first:
        x, y, z = (t.transpose(0, 1) for t in (x, y, z))
    return x, y, z


# --------------------------------------------------------------- Int8MultiheadAttention: defects


@pytest.mark.parametrize("cross", [False, True])
def test_backward_with_need_weights_default(cross):
    m, q = _mha()
    x, y, z = _inputs()
    args_f = [x.clone().requires_grad_()] + ([y.clone().requires_grad_(), z.clone().requires_grad_()] if cross else [])
    args_q = [t.detach().clone().requires_grad_() for t in args_f]
    full_f = args_f if cross else args_f * 3
    full_q = args_q if cross else args_q * 3
    m(*full_f)[0].square().sum().backward()
    q(*full_q)[0].square().sum().backward()  # need_weights=True: the default
    for a, b in zip(args_f, args_q):
        assert b.grad is not None and _rel(b.grad, a.grad) < 5e-2


def test_backward_need_weights_training_dropout():
    torch.manual_seed(0)
    q = fastinfer.quantize(nn.MultiheadAttention(E, H, batch_first=True, dropout=0.1))
    assert q.training
    x = _inputs()[0].requires_grad_()
    q(x, x, x)[0].sum().backward()
    assert x.grad is not None


# ------------------------------------------------------------ Int8MultiheadAttention: edge cases


def test_backward_without_weights_matches_float():
    m, q = _mha()
    x, y, z = _inputs()
    a = [t.clone().requires_grad_() for t in (x, y, z)]
    b = [t.clone().requires_grad_() for t in (x, y, z)]
    m(*a, need_weights=False)[0].square().sum().backward()
    q(*b, need_weights=False)[0].square().sum().backward()
    for ta, tb in zip(a, b):
        assert _rel(tb.grad, ta.grad) < 5e-2


def _masks():
    bm = torch.rand(5, 7, generator=_g(4)) > 0.7
    fm = torch.randn(5, 7, generator=_g(5))
    m3 = torch.randn(2 * H, 5, 7, generator=_g(6))
    kb = torch.zeros(2, 7, dtype=torch.bool)
    kb[1, 4:] = True
    kf = torch.zeros(2, 7).masked_fill(kb, -1e4)
    return {
        "none": {},
        "bool2d": {"attn_mask": bm},
        "float2d": {"attn_mask": fm},
        "float3d": {"attn_mask": m3},
        "noncontig3d": {"attn_mask": m3.transpose(1, 2).contiguous().transpose(1, 2)},
        "expanded3d": {"attn_mask": fm.expand(2 * H, 5, 7)},
        "kpm_bool": {"key_padding_mask": kb},
        "kpm_float": {"key_padding_mask": kf},
        "kpm_bool+3d": {"key_padding_mask": kb, "attn_mask": m3},
        "kpm_float+bool2d": {"key_padding_mask": kf, "attn_mask": bm},
    }


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("mask", list(_masks()))
def test_masks_cross_attention_close_to_float(batch_first, need_weights, mask):
    m, q = _mha(batch_first)
    x, y, z = _inputs(batch_first)
    kw = _masks()[mask]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: mismatched mask types are deprecated
        r = m(x, y, z, need_weights=need_weights, **kw)
        s = q(x, y, z, need_weights=need_weights, **kw)
    assert s[0].shape == r[0].shape and _rel(s[0], r[0]) < 3e-2
    if need_weights:
        assert s[1].shape == r[1].shape and _rel(s[1], r[1]) < 2e-2
    else:
        assert s[1] is None


def test_unbatched_and_per_head_weights():
    m, q = _mha(False)
    x, y, _ = _inputs()
    kb = torch.zeros(7, dtype=torch.bool)
    kb[5:] = True
    with torch.no_grad():
        r = m(x[0], y[0], y[0], key_padding_mask=kb, average_attn_weights=False)
        s = q(x[0], y[0], y[0], key_padding_mask=kb, average_attn_weights=False)
    assert s[0].shape == r[0].shape == (5, E) and s[1].shape == r[1].shape == (H, 5, 7)
    assert _rel(s[0], r[0]) < 3e-2 and _rel(s[1], r[1]) < 2e-2


def test_is_causal_hint_with_padding_mask():
    m, q = _mha()
    x = _inputs()[0]
    cm = torch.ones(5, 5, dtype=torch.bool).triu(1)
    kb = torch.zeros(2, 5, dtype=torch.bool)
    kb[1, 3:] = True
    with torch.no_grad():
        r = m(x, x, x, attn_mask=cm, key_padding_mask=kb, need_weights=False)[0]
        s1 = q(x, x, x, attn_mask=cm, is_causal=True, key_padding_mask=kb, need_weights=False)[0]
        s2 = q(x, x, x, is_causal=True, key_padding_mask=kb, need_weights=False)[0]
        s3 = q(x, x, x, is_causal=True, need_weights=True)[0]
        r3 = m(x, x, x, attn_mask=cm)[0]
    assert _rel(s1, r) < 3e-2 and _rel(s2, r) < 3e-2 and _rel(s3, r3) < 3e-2


def test_fully_masked_row_is_zero_on_both_paths():
    """torch's slow path gives NaN there; the int8 module gives SDPA's zeros on both paths."""
    _, q = _mha()
    x, y, z = _inputs()
    mask = torch.zeros(5, 7, dtype=torch.bool)
    mask[2] = True
    with torch.no_grad():
        a = q(x, y, z, attn_mask=mask)
        b = q(x, y, z, attn_mask=mask, need_weights=False)
    assert torch.isfinite(a[0]).all() and torch.allclose(a[0], b[0], atol=1e-5)
    assert (a[1][:, 2] == 0).all()


def test_bf16_module_with_float_masks():
    torch.manual_seed(0)
    m = nn.MultiheadAttention(E, H, batch_first=True).eval().to(torch.bfloat16)
    q = fastinfer.quantize(m)
    x, y, _ = (t.bfloat16() for t in _inputs())
    fm = torch.randn(5, 7, generator=_g(7)).bfloat16()
    with torch.no_grad():
        for nw in (True, False):
            r, s = m(x, y, y, attn_mask=fm, need_weights=nw)[0], q(x, y, y, attn_mask=fm, need_weights=nw)[0]
            assert s.dtype == torch.bfloat16 and _rel(s, r) < 3e-2


def test_dropout_in_training_and_back_to_eval():
    torch.manual_seed(0)
    m = nn.MultiheadAttention(E, H, batch_first=True, dropout=0.5)
    q = fastinfer.quantize(m)
    x = _inputs()[0]
    with torch.no_grad():
        for nw in (True, False):
            assert not torch.equal(q(x, x, x, need_weights=nw)[0], q(x, x, x, need_weights=nw)[0])
        q.eval()
        m.eval()
        assert _rel(q(x, x, x)[0], m(x, x, x)[0]) < 3e-2


def test_save_load_round_trip(tmp_path):
    _, q = _mha(False)
    x, y, _ = _inputs(False)
    fastinfer.save(q, tmp_path / "m.fi")
    loaded = fastinfer.load(tmp_path / "m.fi", nn.MultiheadAttention(E, H))
    assert type(loaded) is Int8MultiheadAttention
    with torch.no_grad():
        assert torch.equal(loaded(x, y, y)[0], q(x, y, y)[0])


# ------------------------------------------------------------------- nn.Transformer* conversion


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_padding_and_causal(batch_first):
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, 64, batch_first=batch_first), 2,
                                enable_nested_tensor=batch_first).eval()
    q = fastinfer.quantize(enc)
    assert not q.use_nested_tensor and all(type(l.self_attn) is Int8MultiheadAttention for l in q.layers)
    src = torch.randn(2, 6, E, generator=_g(8))
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[1, 4:] = True
    cm = nn.Transformer.generate_square_subsequent_mask(6)
    s_in = src if batch_first else src.transpose(0, 1)
    with torch.no_grad():
        for kw in ({"src_key_padding_mask": kpm}, {"mask": cm, "is_causal": True},
                   {"mask": cm, "src_key_padding_mask": kpm}):  # fmt: skip
            r, s = enc(s_in, **kw), q(s_in, **kw)
            if not batch_first:
                r, s = r.transpose(0, 1), s.transpose(0, 1)
            keep = ~kpm  # torch's nested-tensor path zeroes padded positions; only real tokens count
            assert _rel(s[keep], r[keep]) < 2e-2


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_full_model(batch_first):
    torch.manual_seed(0)
    tr = nn.Transformer(E, H, 1, 2, 64, batch_first=batch_first).eval()
    q = fastinfer.quantize(tr)
    src, tgt = torch.randn(2, 6, E, generator=_g(9)), torch.randn(2, 5, E, generator=_g(10))
    if not batch_first:
        src, tgt = src.transpose(0, 1), tgt.transpose(0, 1)
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[0, 4:] = True
    tk = torch.zeros(2, 5, dtype=torch.bool)
    tk[1, 3:] = True
    tm = nn.Transformer.generate_square_subsequent_mask(5)
    kw = dict(tgt_mask=tm, tgt_is_causal=True, src_key_padding_mask=kpm, memory_key_padding_mask=kpm,
              tgt_key_padding_mask=tk)  # fmt: skip
    with torch.no_grad():
        assert _rel(q(src, tgt, **kw), tr(src, tgt, **kw)) < 3e-2


# ------------------------------------------------------------------ activation fusion patterns


def _fused_vs_unfused(model, x):
    model.eval()
    a, b = fastinfer.quantize(model), fastinfer.quantize(model, NOFUSE)
    with torch.no_grad():
        return a, _rel(a(x), b(x))


def _fused_rows(q):
    return [r.name for r in fastinfer.conversion_report(q) if "fused" in (r.detail or "")]


class _DenseActResidual(nn.Module):
    """A module with BERT's child names whose forward is NOT act(dense(x))."""

    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(E, E)
        self.intermediate_act_fn = nn.GELU()

    def forward(self, x):
        return self.intermediate_act_fn(self.dense(x) + x)


def test_bert_names_on_a_module_with_other_forward_not_fused():
    torch.manual_seed(0)
    q, err = _fused_vs_unfused(_DenseActResidual(), torch.randn(3, E, generator=_g(11)))
    assert err < 1e-4, (err, _fused_rows(q))


class _ActAlsoCalledDirectly(nn.Module):
    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Linear(E, E), nn.GELU())

    def forward(self, x):
        return self.seq(x) + self.seq[1](x)  # the activation module also used on another tensor


class _LinearAlsoCalledDirectly(nn.Module):
    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Linear(E, E), nn.GELU())

    def forward(self, x):
        return self.seq(x) + self.seq[0](x)  # the linear's output also used without the activation


@pytest.mark.parametrize("cls", [_ActAlsoCalledDirectly, _LinearAlsoCalledDirectly])
def test_sequential_members_used_outside_the_sequential_not_fused(cls):
    torch.manual_seed(0)
    q, err = _fused_vs_unfused(cls(), torch.randn(3, E, generator=_g(12)))
    assert err < 1e-4, (err, _fused_rows(q))


def _hf_act(name, **kw):
    acts = pytest.importorskip("transformers.activations")
    return getattr(acts, name)(**kw)


@pytest.mark.parametrize("make,expect", [
    (lambda: nn.GELU(approximate="tanh"), "gelu_tanh"),
    (lambda: _hf_act("NewGELUActivation"), "gelu_tanh"),
    (lambda: _hf_act("FastGELUActivation"), "gelu_tanh"),
    (lambda: _hf_act("GELUTanh", use_gelu_tanh_python=True), "gelu_tanh"),
    (lambda: _hf_act("GELUActivation", use_gelu_python=True), "gelu"),
    (lambda: nn.ReLU(inplace=True), "relu"),
    (lambda: nn.Hardtanh(0.0, 6.0), "relu6"),
    (lambda: _hf_act("QuickGELUActivation"), None),
    (lambda: _hf_act("ClippedGELUActivation", min=-10, max=10), None),
    (lambda: _hf_act("AccurateGELUActivation"), None),
    (lambda: nn.Hardtanh(-1.0, 6.0), None),
])  # fmt: skip
def test_sequential_activation_variants(make, expect):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(E, 64), make(), nn.Linear(64, 8))
    q, err = _fused_vs_unfused(model, 3 * torch.randn(4, E, generator=_g(13)))
    assert err < 1e-4
    details = [r.detail for r in fastinfer.conversion_report(q) if r.name == "0"]
    assert details == [f"{expect} fused" if expect else ""]


def test_no_fusion_for_hooked_shared_or_overridden_activations():
    shared = nn.GELU()

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Sequential(nn.Linear(E, E), shared), nn.Sequential(nn.Linear(E, E), shared)

        def forward(self, x):
            return self.a(x) + self.b(x)

    class OwnForward(nn.Sequential):
        def forward(self, x):
            return self[1](self[0](x)) + self[0](x)

    hooked = nn.Sequential(nn.Linear(E, E), nn.GELU())
    hooked[1].register_forward_hook(lambda m, i, o: o * 2)
    x = torch.randn(3, E, generator=_g(14))
    for model in (Shared(), OwnForward(nn.Linear(E, E), nn.ReLU()), hooked):
        q, err = _fused_vs_unfused(model, x)
        assert err < 1e-4 and _fused_rows(q) == []


@pytest.mark.parametrize("arch", ["gpt2", "gemma"])
def test_hf_models_fused_equals_unfused(arch):
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if arch == "gpt2":
        model = tr.GPT2LMHeadModel(tr.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=32,
                                                 bos_token_id=0, eos_token_id=0))  # fmt: skip
        want = ("transformer.h.0.mlp.c_fc", "gelu_tanh fused")
    else:
        model = tr.GemmaForCausalLM(tr.GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, head_dim=8,
                                                   num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                                   max_position_embeddings=32))  # fmt: skip
        want = ("model.layers.0.mlp.gate_proj", "gelu_tanh fused")
    model.eval()
    ids = torch.randint(0, 64, (2, 6), generator=_g(15))
    am = torch.ones(2, 6, dtype=torch.long)
    am[1, 4:] = 0
    a, b = fastinfer.quantize(model), fastinfer.quantize(model, NOFUSE)
    with torch.no_grad():
        la, lb = a(ids, attention_mask=am).logits, b(ids, attention_mask=am).logits
    assert _rel(la, lb) < 1e-4
    assert want in [(r.name, r.detail) for r in fastinfer.conversion_report(a)]


# ------------------------------------------------------------- fused activations: gradients


@pytest.mark.parametrize("code,fn", [(1, F.gelu), (4, F.silu), (6, lambda z: F.gelu(z, approximate="tanh"))])
def test_activation_grad_matches_torch_autograd(code, fn):
    z = (4 * torch.randn(257, generator=_g(16))).requires_grad_()
    g = torch.randn(257, generator=_g(17))
    fn(z).backward(g)
    got = activation_grad("t", g, code, None, z.detach())
    assert torch.allclose(got, z.grad, rtol=1e-5, atol=1e-5)  # fp32 rounding (both within 2e-6 of fp64)


@pytest.mark.parametrize("act,fn", [("gelu_tanh", lambda z: F.gelu(z, approximate="tanh")), ("silu", F.silu)])
def test_fused_layer_gradient_is_autograd_through_dequantized_weight(act, fn):
    torch.manual_seed(0)
    lin = Int8Linear.from_linear(nn.Linear(E, 48), activation=act)
    x = (3 * torch.randn(5, E, generator=_g(18))).requires_grad_()
    g = torch.randn(5, 48, generator=_g(19))
    y = lin(x)
    with torch.no_grad():
        assert _rel(y, fn(F.linear(x, lin.dequantized_weight().float(), lin.bias))) < 2e-2
    y.backward(g)
    x2 = x.detach().clone().requires_grad_()
    fn(F.linear(x2, lin.dequantized_weight().float(), lin.bias)).backward(g)
    assert torch.allclose(x.grad, x2.grad, rtol=1e-4, atol=1e-5)


def test_hardswish_fused_refuses_backward():
    lin = Int8Linear.from_linear(nn.Linear(E, 8), activation="hardswish")
    x = torch.randn(2, E, requires_grad=True)
    with pytest.raises(RuntimeError, match="fuse_activations=False"):
        lin(x).sum().backward()
