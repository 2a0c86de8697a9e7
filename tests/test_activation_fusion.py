"""Activations fused into the int8 linear epilogue beyond the erf GELU (tests/test_fused_gelu.py):
GELU's tanh form and SiLU in the kernels (bit-identical on every ISA, close to torch's), and the
pattern registry that finds them in models (fastinfer/convert/patterns.py): nn.Sequential, GPT-2's
MLP, LLaMA-style gated MLPs; each fused model equal, within the epilogue's fp32 rounding, to the
same model quantized without fusion."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastinfer
from conftest import ISAS, assert_same
from fastinfer import QuantConfig, ops
from fastinfer.convert.patterns import linear_activation
from fastinfer.nn import Fused, Int8Linear

TORCH_ACT = {"gelu_tanh": lambda y: nn.functional.gelu(y, approximate="tanh"), "silu": nn.functional.silu}


def _weights(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    return ops.pack_int8_weight(w), torch.rand(n, generator=g) * 0.02 + 1e-3, torch.randn(n, generator=g)


@pytest.mark.parametrize("act", ["gelu_tanh", "silu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m,k,n", [(1, 64, 16), (5, 37, 19), (13, 200, 64), (25, 96, 47)])
def test_bit_identical_on_every_isa_and_close_to_torch(act, dtype, m, k, n):
    packed, scale, b = _weights(n, k, seed=m + k + n)
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(k)) * 3).to(dtype)
    outs = {}
    for isa in ISAS:
        fastinfer.set_isa(isa)
        outs[isa] = ops.int8_linear(x, packed, scale, b, activation=act)
    for isa, y in outs.items():
        assert_same(y, outs[ISAS[0]], f"{isa} vs {ISAS[0]}")
    plain = ops.int8_linear(x.float(), packed, scale, b)
    want = TORCH_ACT[act](plain)
    if dtype == torch.float32:
        torch.testing.assert_close(outs[ISAS[0]], want, atol=2e-6, rtol=2e-6)
    else:
        torch.testing.assert_close(outs[ISAS[0]], want.to(torch.bfloat16), atol=1e-6, rtol=1e-2)


def test_extreme_and_non_finite_values():
    """Large |y| saturates as the exact function does (0 below, y above); NaN stays NaN."""
    y = torch.tensor([-1e30, -200.0, -20.0, -1e-30, 0.0, 1e-30, 20.0, 200.0, 1e30, float("nan"), float("inf")])
    for act, code in (("gelu_tanh", 6), ("silu", 4)):
        got = y.clone()
        fastinfer._runtime._C.apply_activation(got.data_ptr(), got.numel(), code)
        want = TORCH_ACT[act](y.double()).float()
        finite = torch.isfinite(want)
        torch.testing.assert_close(got[finite], want[finite], atol=1e-6, rtol=1e-6)
        assert got[9].isnan() and got[10] == float("inf"), (act, got)


def test_sequential_relu_silu_and_tanh_gelu_are_fused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 48),
                          nn.GELU(approximate="tanh"), nn.Linear(48, 8)).eval()  # fmt: skip
    q = fastinfer.quantize(model)
    plain = fastinfer.quantize(model, QuantConfig(fuse_activations=False))
    assert [q[i].activation for i in (0, 2, 4, 6)] == ["relu", "silu", "gelu_tanh", None]
    assert all(type(q[i]) is Fused for i in (1, 3, 5))
    assert [r.detail for r in fastinfer.conversion_report(q)] == ["relu fused", "silu fused", "gelu_tanh fused", ""]
    x = torch.randn(9, 32)
    with torch.no_grad():
        torch.testing.assert_close(q(x), plain(x), atol=1e-5, rtol=1e-5)
        fn = torch.compile(q, fullgraph=True)
        assert torch.equal(fn(x), q(x))


def test_what_is_not_fused():
    class MySiLU(nn.SiLU):  # a subclass may compute anything
        def forward(self, x):
            return super().forward(x) * 2

    shared = nn.SiLU()
    model = nn.Sequential(nn.Linear(8, 8), shared, nn.Linear(8, 8), shared, nn.Linear(8, 8), MySiLU(),
                          nn.Linear(8, 8), nn.GELU(approximate="tanh")).eval()  # fmt: skip
    model[7].register_forward_hook(lambda m, i, o: None)
    q = fastinfer.quantize(model)
    assert [q[i].activation for i in (0, 2, 4, 6)] == [None, None, None, None]
    assert linear_activation(MySiLU()) is None and linear_activation(nn.GELU(approximate="tanh")) == "gelu_tanh"


def test_gradients_through_fused_silu_and_tanh_gelu():
    for act_mod, name in ((nn.SiLU(), "silu"), (nn.GELU(approximate="tanh"), "gelu_tanh")):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(16, 24), act_mod, nn.Linear(24, 4)).eval()
        q = fastinfer.quantize(model)
        assert q[0].activation == name
        x = torch.randn(5, 16, requires_grad=True)
        q(x).sum().backward()
        ref_model = nn.Sequential(nn.Linear(16, 24), act_mod, nn.Linear(24, 4))
        for i in (0, 2):  # the same function on the dequantized weights, in fp32
            ref_model[i].weight.data = q[i].dequantized_weight().float()
            ref_model[i].bias.data = q[i].bias.clone()
        xr = x.detach().clone().requires_grad_(True)
        ref_model(xr).sum().backward()
        assert x.grad is not None
        assert (x.grad - xr.grad).abs().max().item() < 1e-4 * xr.grad.abs().max().item() + 1e-6, name


def test_gpt2_and_llama_mlps():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    gpt = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=100, n_positions=32, n_embd=64, n_layer=2,
                                                                n_head=4)).eval()  # fmt: skip
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    llama = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(3))
    for model, linear, act, name in ((gpt, "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.act", "gelu_tanh"),
                                     (llama, "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.act_fn", "silu")):  # fmt: skip
        q = fastinfer.quantize(model)
        plain = fastinfer.quantize(model, QuantConfig(fuse_activations=False))
        assert q.get_submodule(linear).activation == name
        assert type(q.get_submodule(act)) is Fused
        assert q.get_submodule(linear.replace("gate_proj", "up_proj").replace("c_fc", "c_proj")).activation is None
        with torch.inference_mode():
            a, b = q(ids).logits, plain(ids).logits
        assert (a - b).abs().max().item() < 1e-3 * b.abs().max().item(), name
