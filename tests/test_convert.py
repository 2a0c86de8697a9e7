"""fastinfer.quantize / QuantConfig: which layers are swapped, that the original survives, skip
patterns, filter_fn, config errors, and end-to-end accuracy on BERT, GPT-2, torch's own transformer
layers and a small MLP trained on sklearn's digits."""

from __future__ import annotations

import copy
import dataclasses
import re

import pytest
import torch
from torch import nn

import fastinfer
from conftest import sqnr, trained_digits_mlp
from fastinfer import QuantConfig
from fastinfer.nn import Int8Linear, quantize_weight_per_channel


class SubLinear(nn.Linear):
    """A subclass may change forward(); quantize leaves subclasses alone."""

    def forward(self, x):
        return super().forward(x) * 2


class Block(nn.Module):
    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.attn = nn.Linear(d, d)
        self.out = nn.Linear(d, d, bias=False)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(x + self.out(torch.relu(self.attn(x))))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 32)
        self.encoder = nn.Sequential(Block(), Block())
        self.extra = nn.ModuleDict({"l1": nn.Linear(32, 32), "l10": nn.Linear(32, 32)})
        self.sub = SubLinear(32, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        h = self.encoder(self.embed(x))
        h = self.extra["l10"](self.extra["l1"](h))
        return self.head(self.sub(h))


ALL_LINEAR = {
    "embed", "encoder.0.attn", "encoder.0.out", "encoder.1.attn", "encoder.1.out", "extra.l1", "extra.l10", "head",
}  # fmt: skip


def _net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def _int8_names(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, Int8Linear)}


def _x(seed: int = 0, shape=(8, 16)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ basics


def test_replaces_every_linear_and_keeps_original():
    model = _net()
    before = copy.deepcopy(model.state_dict())
    x = _x()
    with torch.no_grad():
        ref = model(x)
    q = fastinfer.quantize(model)
    assert q is not model
    assert _int8_names(q) == ALL_LINEAR
    assert type(q.sub) is SubLinear, "subclasses of nn.Linear must stay float"
    assert isinstance(q.encoder[0].norm, nn.LayerNorm)
    # the original is untouched: same module types, same tensors
    assert not _int8_names(model)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n in ALL_LINEAR)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(model(x), ref)
        out = q(x)
    assert sqnr(ref, out) >= 30.0


def test_converted_weights_are_the_per_channel_quantization():
    model = _net()
    q = fastinfer.quantize(model)
    for name in ALL_LINEAR:
        src, dst = model.get_submodule(name), q.get_submodule(name)
        wq, ws = quantize_weight_per_channel(src.weight)
        assert torch.equal(dst.weight_int8, wq), name
        assert torch.equal(dst.weight_scale, ws), name
        assert (dst.bias is None) == (src.bias is None), name
        if src.bias is not None:
            assert torch.equal(dst.bias, src.bias.detach()), name


def test_inplace():
    model = _net()
    x = _x(1)
    with torch.no_grad():
        ref = model(x)
    q = fastinfer.quantize(model, inplace=True)
    assert q is model
    assert _int8_names(model) == ALL_LINEAR
    with torch.no_grad():
        assert sqnr(ref, model(x)) >= 30.0


@pytest.mark.parametrize("inplace", [False, True])
def test_model_that_is_a_single_linear(inplace):
    lin = nn.Linear(20, 7)
    q = fastinfer.quantize(lin, inplace=inplace)
    assert isinstance(q, Int8Linear) and (q.in_features, q.out_features) == (20, 7)
    assert type(lin) is nn.Linear and isinstance(lin.weight, nn.Parameter)
    with torch.no_grad():
        assert sqnr(lin(_x(2, (4, 20))), q(_x(2, (4, 20)))) >= 35.0


def test_model_without_linear_layers():
    model = nn.Sequential(nn.ConvTranspose1d(3, 4, 1), nn.ReLU())  # nothing fastinfer converts (Conv1d now is)
    q = fastinfer.quantize(model)
    assert q is not model
    assert not _int8_names(q)
    x = torch.randn(2, 3, 5)
    with torch.no_grad():
        assert torch.equal(q(x), model(x))


def test_eval_mode_is_kept_for_swapped_layers():
    """Swapping layers must not put parts of an eval() model back into training mode."""
    q = fastinfer.quantize(_net())
    assert [n for n, m in q.named_modules() if m.training] == []


def test_module_registered_under_two_names_is_converted_everywhere():
    """The same nn.Linear reachable under two names must not stay float under one of them."""
    shared = nn.Linear(8, 8)
    model = nn.Module()
    model.a = shared
    model.b = shared
    q = fastinfer.quantize(model)
    assert isinstance(q.a, Int8Linear)
    assert q.a is q.b  # still one layer (converted once), not two copies


# ---------------------------------------------------------------------------------- QuantConfig


@pytest.mark.parametrize(
    "skip,kept",
    [
        (("head",), {"head"}),
        ("head", {"head"}),  # a single pattern without a tuple
        (["head", "embed"], {"head", "embed"}),
        (("encoder.*.out",), {"encoder.0.out", "encoder.1.out"}),
        (("*.attn",), {"encoder.0.attn", "encoder.1.attn"}),
        (("encoder",), {"encoder.0.attn", "encoder.0.out", "encoder.1.attn", "encoder.1.out"}),
        (("encoder.1",), {"encoder.1.attn", "encoder.1.out"}),
        (("extra.l1",), {"extra.l1"}),  # a name prefix is not a module prefix: extra.l10 stays int8
        (("extra.l1*",), {"extra.l1", "extra.l10"}),
        (("encode", "hea", "ext"), set()),
        ((re.compile(r"encoder\.\d+\.attn"),), {"encoder.0.attn", "encoder.1.attn"}),
        ((re.compile(r"extra"),), {"extra.l1", "extra.l10"}),  # a regex naming a container
        ((re.compile(r"l1"),), set()),  # regexes must match a whole qualified name
        ((re.compile(r"(embed|head)"), "encoder.0"), {"embed", "head", "encoder.0.attn", "encoder.0.out"}),
        (("*",), ALL_LINEAR),
        ((), set()),
    ],
)
def test_skip_patterns(skip, kept):
    model = _net()
    q = fastinfer.quantize(model, QuantConfig(skip=skip))
    assert _int8_names(q) == ALL_LINEAR - kept
    for name in kept:
        assert type(q.get_submodule(name)) is nn.Linear
    with torch.no_grad():
        assert sqnr(model(_x()), q(_x())) >= 30.0


def test_skip_is_normalized_to_a_tuple():
    assert QuantConfig(skip="head").skip == ("head",)
    assert QuantConfig(skip=["a", "b"]).skip == ("a", "b")
    pat = re.compile("x")
    assert QuantConfig(skip=pat).skip == (pat,)


def test_filter_fn():
    seen = []

    def keep_wide(module, name):
        seen.append((type(module), name))
        return module.out_features >= 32 and not name.startswith("extra")

    q = fastinfer.quantize(_net(), QuantConfig(filter_fn=keep_wide))
    assert _int8_names(q) == {"embed", "encoder.0.attn", "encoder.0.out", "encoder.1.attn", "encoder.1.out"}
    names = {n for _, n in seen}
    assert names <= ALL_LINEAR and {"head", "extra.l1", "embed"} <= names
    assert all(t is nn.Linear for t, _ in seen)


def test_filter_fn_and_skip_combine():
    q = fastinfer.quantize(_net(), QuantConfig(skip=("encoder",), filter_fn=lambda m, n: n != "head"))
    assert _int8_names(q) == {"embed", "extra.l1", "extra.l10"}


def test_min_features():
    q = fastinfer.quantize(_net(), QuantConfig(min_features=17))
    # embed has in_features 16, head out_features 10
    assert _int8_names(q) == ALL_LINEAR - {"embed", "head"}
    assert _int8_names(fastinfer.quantize(_net(), QuantConfig(min_features=33))) == set()


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: QuantConfig(skip=[1]), TypeError, "str or re.Pattern"),
        (lambda: QuantConfig(skip=("ok", None)), TypeError, "str or re.Pattern"),
        (lambda: QuantConfig(skip=5), TypeError, "skip"),
        (lambda: QuantConfig(skip=None), TypeError, "skip"),
        (lambda: QuantConfig(min_features=0), ValueError, "min_features"),
        (lambda: QuantConfig(min_features=-3), ValueError, "min_features"),
        (lambda: QuantConfig(min_features=2.5), ValueError, "min_features"),
        (lambda: fastinfer.quantize(_net(), "head"), TypeError, "QuantConfig"),
        (lambda: fastinfer.quantize(_net(), {"skip": ("head",)}), TypeError, "QuantConfig"),
        (lambda: fastinfer.quantize("model"), TypeError, "nn.Module"),
        (lambda: fastinfer.quantize(None), TypeError, "nn.Module"),
        (lambda: fastinfer.quantize(nn.Linear(3, 3).state_dict()), TypeError, "nn.Module"),
    ],
)
def test_bad_config_raises(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_quant_config_is_frozen():
    cfg = QuantConfig(skip=("a",))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.min_features = 5


def test_bad_config_leaves_model_untouched():
    model = _net()
    with pytest.raises(TypeError):
        fastinfer.quantize(model, "oops", inplace=True)
    assert not _int8_names(model)


def test_progress_bar(capsys):
    bar = "layer/s"  # tqdm's rate; the one summary line quantize logs has none
    fastinfer.quantize(_net(), QuantConfig(progress=True))
    assert bar in capsys.readouterr().err
    fastinfer.quantize(_net(), QuantConfig(progress=False))
    fastinfer.quantize(_net())  # 8 layers: no bar by default
    err = capsys.readouterr().err
    assert bar not in err and err.count("fastinfer.quantize: 8 layers converted") == 2
    big = nn.Sequential(*[nn.Linear(4, 4) for _ in range(60)])
    q = fastinfer.quantize(big)  # 60 layers: a bar by default
    assert bar in capsys.readouterr().err
    assert len(_int8_names(q)) == 60


# ----------------------------------------------------------------------------- torch's own modules


def test_multihead_attention_out_proj_left_alone():
    """nn.MultiheadAttention reads out_proj.weight directly (NonDynamicallyQuantizableLinear): the
    module is converted whole (Int8MultiheadAttention, tests/test_mha.py) or not at all, never its
    out_proj alone."""
    mha = nn.MultiheadAttention(32, 4).eval()
    q = fastinfer.quantize(mha, fastinfer.QuantConfig(filter_fn=lambda m, name: not isinstance(m, nn.MultiheadAttention)))
    assert type(q) is nn.MultiheadAttention and not _int8_names(q)
    rows = {r.name: r for r in fastinfer.conversion_report(q)}
    assert rows[""].detail == "filter_fn returned False" and rows["out_proj"].result == "float"
    x = torch.randn(5, 2, 32)
    with torch.no_grad():
        assert torch.equal(q(x, x, x)[0], mha(x, x, x)[0])


@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
def test_torch_transformer_encoder(batch_first):
    """nn.TransformerEncoder in eval/no_grad: with batch_first=True torch takes its fused fast path,
    which reads linear1.weight / linear2.weight directly."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 256, dropout=0.0, batch_first=batch_first)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    q = fastinfer.quantize(enc)
    assert {"layers.0.linear1", "layers.0.linear2", "layers.1.linear1", "layers.1.linear2"} <= _int8_names(q)
    x = torch.randn(3, 10, 64)
    with torch.no_grad():
        ref = enc(x)
        out = q(x)
    assert sqnr(ref, out) >= 25.0
    # the int8 layers really ran (a fused float path would reproduce the float output exactly)
    calls = []
    q.layers[1].linear2.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    with torch.no_grad():
        q(x)
    assert calls and not torch.equal(ref, out)


# ----------------------------------------------------------------------------- Hugging Face models


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bert(transformers):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
        vocab_size=1000, max_position_embeddings=128,
    )  # fmt: skip
    return transformers.BertModel(cfg).eval()


@pytest.fixture(scope="module")
def gpt2(transformers):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_embd=128, n_layer=2, n_head=4, vocab_size=1000, n_positions=128, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_bert(bert):
    q = fastinfer.quantize(bert)
    names = _int8_names(q)
    assert len(names) == 4 * 6 + 1  # q, k, v, attention.output, intermediate, output per layer + pooler
    assert not [n for n, m in q.named_modules() if isinstance(m, nn.Linear)]
    assert "encoder.layer.3.intermediate.dense" in names and "pooler.dense" in names
    assert not _int8_names(bert)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (4, 64), generator=g)
    mask = torch.ones(4, 64, dtype=torch.long)
    mask[1, 40:] = 0
    mask[3, 10:] = 0
    with torch.no_grad():
        ref = bert(input_ids=ids, attention_mask=mask)
        out = q(input_ids=ids, attention_mask=mask)
    assert sqnr(ref.last_hidden_state, out.last_hidden_state) >= 25.0
    assert sqnr(ref.pooler_output, out.pooler_output) >= 25.0


def test_bert_skip_patterns(bert):
    cfg = QuantConfig(skip=("pooler", "encoder.layer.*.attention.self.query", re.compile(r"encoder\.layer\.0\..*")))
    q = fastinfer.quantize(bert, cfg)
    names = _int8_names(q)
    assert "pooler.dense" not in names
    assert not any(n.startswith("encoder.layer.0.") or n.endswith("attention.self.query") for n in names)
    assert len(names) == 3 * 5  # layers 1..3 without query
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert sqnr(bert(ids).last_hidden_state, q(ids).last_hidden_state) >= 25.0


def test_gpt2(gpt2, transformers):
    """GPT-2's attention and MLP layers are transformers Conv1D (weights [in, out]); they are
    converted too, and so is the (tied) lm_head."""
    conv1d = transformers.pytorch_utils.Conv1D
    conv_names = {n for n, m in gpt2.named_modules() if isinstance(m, conv1d)}
    assert len(conv_names) == 2 * 4
    q = fastinfer.quantize(gpt2)
    assert _int8_names(q) == conv_names | {"lm_head"}
    assert not [n for n, m in q.named_modules() if isinstance(m, conv1d)]
    # the original keeps its Conv1D layers and its tied embedding
    assert {n for n, m in gpt2.named_modules() if isinstance(m, conv1d)} == conv_names
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    assert torch.equal(q.transformer.wte.weight, gpt2.transformer.wte.weight)
    # a Conv1D's weight is stored [in, out]: the int8 layer holds its transpose
    c = gpt2.transformer.h[0].attn.c_attn
    qc = q.transformer.h[0].attn.c_attn
    assert (qc.in_features, qc.out_features) == (c.weight.shape[0], c.weight.shape[1])
    assert torch.equal(qc.weight_int8, quantize_weight_per_channel(c.weight.t())[0])
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = gpt2(ids).logits
        out = q(ids).logits
    assert out.shape == ref.shape
    assert sqnr(ref, out) >= 25.0
    with torch.no_grad():
        hc = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(3))
        assert sqnr(c(hc), qc(hc)) >= 35.0


def test_gpt2_skip_conv1d_by_filter(gpt2, transformers):
    conv1d = transformers.pytorch_utils.Conv1D
    q = fastinfer.quantize(gpt2, QuantConfig(filter_fn=lambda m, n: not isinstance(m, conv1d)))
    assert _int8_names(q) == {"lm_head"}


# ------------------------------------------------------------------------------ trained classifier


def test_trained_mlp_on_digits_keeps_accuracy():
    model, x_tr, x_te, y_te = trained_digits_mlp()

    q = fastinfer.quantize(model)
    assert len(_int8_names(q)) == 3
    with torch.no_grad():
        acc_f = (model(x_te).argmax(1) == y_te).float().mean().item()
        logits_q = q(x_te)
    acc_q = (logits_q.argmax(1) == y_te).float().mean().item()
    assert acc_f >= 0.95, f"float model only reached {acc_f:.3f}"
    assert abs(acc_q - acc_f) <= 0.01, f"float {acc_f:.4f} vs int8 {acc_q:.4f}"
    assert sqnr(model(x_te).detach(), logits_q) >= 30.0
    # bf16 activations still classify as well
    acc_bf16 = (q(x_te.bfloat16()).argmax(1) == y_te).float().mean().item()
    assert abs(acc_bf16 - acc_f) <= 0.02
