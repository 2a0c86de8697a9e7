"""transformers' BERT-style blocks on fastinfer's short road (fastinfer.convert.hf_blocks): output
blocks add their input in the int8 dense layer's epilogue, encoder layers call their parts'
forward methods directly. Each block keeps its class (a subclass of it); float32 results are the
unfused model's bits, bfloat16 as accurate; every fallback (training, hooks, caches, chunking,
parts replaced, code that differs) takes the class's own forward; pickling in a fresh process,
deepcopy, files, the planner."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastinfer
from conftest import assert_same, run_python
from fastinfer.config import QuantConfig
from fastinfer.convert import hf_blocks as H
from fastinfer.nn import WeightOnlyInt8Linear

transformers = pytest.importorskip("transformers")
from transformers.models.bert import modeling_bert as mb  # noqa: E402


_KNOWN = H._layer_fits(mb.BertLayer(transformers.BertConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2)))
needs_known_code = pytest.mark.skipif(
    not _KNOWN, reason=f"transformers {transformers.__version__}: BertLayer's code is not the one fastinfer's layer "
    "path was written against (hf_blocks fingerprints); the class's own forward runs")  # fmt: skip


def _bert(layers=2, hidden=64, **kw):
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                                  intermediate_size=4 * hidden, max_position_embeddings=64, **kw)  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def _ids(b=3, s=11, seed=0, pad=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, s, dtype=torch.long)
    if pad:
        mask[0, -pad:] = 0
    return {"input_ids": torch.randint(0, 120, (b, s), generator=g), "attention_mask": mask}


def _run(model, inp):
    with torch.no_grad():
        return model(**inp).last_hidden_state


def test_the_installed_transformers_code_is_the_known_one():
    """The fingerprints are of the code the short roads reproduce; a transformers release that
    changes it turns the fusion off (this test then says so) rather than run different code."""
    if not _KNOWN:
        pytest.skip(f"transformers {transformers.__version__} changed BertLayer's code: the layer path is off")
    for cls, fp in ((mb.BertLayer, H._LAYER), (mb.BertAttention, H._ATTENTION), (mb.BertSelfAttention, H._SELF_ATTENTION),
                    (mb.BertIntermediate, H._INTERMEDIATE), (mb.BertSelfOutput, H._OUTPUT), (mb.BertOutput, H._OUTPUT)):
        assert H._fingerprint(cls.__dict__["forward"]) == fp, cls.__name__


@needs_known_code
def test_blocks_are_fused_keep_their_class_and_the_float32_bits():
    bert = _bert()
    ref = fastinfer.quantize(copy.deepcopy(bert), QuantConfig(rewrite_blocks=False))
    q = fastinfer.quantize(bert)
    kinds = {n: H.fused_kind(m) for n, m in q.named_modules() if H.fused_kind(m)}
    assert sorted(kinds.values()) == ["layer"] * 2 + ["output"] * 4
    for layer in q.encoder.layer:
        assert isinstance(layer, mb.BertLayer) and type(layer).__name__ == "BertLayer"
        assert isinstance(layer.attention.output, mb.BertSelfOutput) and isinstance(layer.output, mb.BertOutput)
        assert "BertOutput(" in repr(layer)
    assert not any(H.fused_kind(m) for m in ref.modules())
    assert q.state_dict().keys() == ref.state_dict().keys()
    report = fastinfer.conversion_report(q)
    rows = {r.name: r for r in report}
    assert "residual add fused" in rows["encoder.layer.0.output.dense"].detail
    assert "4 residual adds fused" in report.summary() and "2 BertLayer on fastinfer's layer path" in report.summary()
    for inp in (_ids(), _ids(b=2, s=7, seed=3, pad=3)):
        assert_same(_run(q, inp), _run(ref, inp), "float32: the unfused model's bits")


@needs_known_code
def test_bf16_model_stays_as_accurate():
    bert = _bert()
    inp = _ids(seed=4)
    want = _run(bert, inp)
    fused = _run(fastinfer.quantize(copy.deepcopy(bert).bfloat16()), inp).float()
    unfused = _run(fastinfer.quantize(copy.deepcopy(bert).bfloat16(), QuantConfig(rewrite_blocks=False)), inp).float()
    cos = lambda y: F.cosine_similarity(y.flatten(1), want.flatten(1), dim=1).min().item()  # noqa: E731
    assert cos(fused) > 0.99 and cos(fused) > cos(unfused) - 2e-3


@needs_known_code
def test_the_layer_path_skips_the_module_calls():
    """What the short road is for: the parts' forward() run without nn.Module.__call__ (a global
    forward hook sees none of them; it also turns the road off, so count through a patched call)."""
    q = fastinfer.quantize(_bert(layers=1))
    calls = []
    original = nn.Module._call_impl

    def counting(self, *a, **k):
        calls.append(type(self).__name__)
        return original(self, *a, **k)

    inp = _ids()
    nn.Module._call_impl = counting
    try:
        _run(q, inp)
    finally:
        nn.Module._call_impl = original
    assert "BertLayer" in calls and calls.count("Int8Linear") == 1  # the pooler's; the layer's seven run inside
    assert not {"BertAttention", "BertSelfAttention", "BertSelfOutput", "BertIntermediate", "BertOutput"} & set(calls)


@needs_known_code
@pytest.mark.parametrize("where", ["query", "output.dense", "attention.output.dropout", "intermediate", "global"])
def test_hooks_turn_the_layer_path_off(where):
    q = fastinfer.quantize(_bert(layers=1))
    ref = fastinfer.quantize(copy.deepcopy(_bert(layers=1)), QuantConfig(rewrite_blocks=False))
    inp = _ids()
    layer = q.encoder.layer[0]
    seen = []
    hook = lambda m, i, o: seen.append(type(m).__name__)  # noqa: E731
    if where == "global":
        handle = nn.modules.module.register_module_forward_hook(hook)
    else:
        mod = {"query": layer.attention.self.query, "output.dense": layer.output.dense,
               "attention.output.dropout": layer.attention.output.dropout, "intermediate": layer.intermediate}[where]  # fmt: skip
        handle = mod.register_forward_hook(hook)
    try:
        got = _run(q, inp)
    finally:
        handle.remove()
    assert seen, "the hooked module ran through its __call__"
    assert_same(got, _run(ref, inp), "same result on the class's own forward")


@needs_known_code
def test_training_caches_chunking_and_replaced_parts_fall_back():
    q = fastinfer.quantize(_bert(layers=1))
    ref = fastinfer.quantize(copy.deepcopy(_bert(layers=1)), QuantConfig(rewrite_blocks=False))
    layer, rlayer = q.encoder.layer[0], ref.encoder.layer[0]
    h = torch.randn(2, 6, 64)
    with torch.no_grad():
        layer.train(), rlayer.train()
        torch.manual_seed(1)
        a = layer(h)
        torch.manual_seed(1)
        assert_same(a, rlayer(h), "training: the dropouts apply")
        layer.eval(), rlayer.eval()
        layer.chunk_size_feed_forward = rlayer.chunk_size_feed_forward = 2
        assert_same(layer(h), rlayer(h), "chunked feed-forward")
        layer.chunk_size_feed_forward = rlayer.chunk_size_feed_forward = 0
        assert H._layer_parts(layer) is not None
        layer.intermediate.intermediate_act_fn = rlayer.intermediate.intermediate_act_fn = nn.Tanh()
        assert_same(layer(h), rlayer(h), "a replaced activation module is called as the class calls it")
        layer.output.dense = WeightOnlyInt8Linear.from_linear(nn.Linear(256, 64))
        rlayer.output.dense = copy.deepcopy(layer.output.dense)
        assert_same(layer(h), rlayer(h), "a dense layer without the kernel's add: torch adds")

        class Other(mb.BertIntermediate):
            def forward(self, hidden_states):
                return self.dense(hidden_states) * 2

        layer.intermediate.__class__ = rlayer.intermediate.__class__ = Other
        assert H._layer_parts(layer) is None
        assert_same(layer(h), rlayer(h), "a part whose code differs: the class's forward")


@needs_known_code
def test_output_block_fallbacks():
    q = fastinfer.quantize(_bert(layers=1))
    block = q.encoder.layer[0].output
    h, x = torch.randn(2, 5, 256), torch.randn(2, 5, 64)
    with torch.no_grad():
        fused = block(h, x)
        calls = []
        handle = block.dense.register_forward_hook(lambda m, i, o: calls.append(o))
        hooked = block(h, x)  # a hook on dense sees dense's own output, as without the fusion
        handle.remove()
        assert_same(calls[0], block.dense(h), "the hook's output")
        assert_same(hooked, fused, "same result")
    block.train()
    torch.manual_seed(1)
    a = block(h, x)
    torch.manual_seed(1)
    assert_same(a, H.unfused_class(block).forward(block, h, x), "training: dropout applies")


def test_only_known_code_qualifies():
    class MyOutput(mb.BertOutput):  # the same children, another forward
        def forward(self, hidden_states, input_tensor):
            return self.LayerNorm(self.dropout(self.dense(hidden_states)) + 2 * input_tensor)

    cfg = transformers.BertConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2)
    box = nn.Sequential()
    box.out = MyOutput(cfg)
    box.out.dense = fastinfer.nn.Int8Linear.from_linear(box.out.dense)
    assert H.fuse_blocks(box) == {}
    assert not H.block_fits(mb.BertOutput(cfg), "output")  # a float dense layer: nothing to add into
    with pytest.raises(TypeError, match="not a BERT-style output block"):
        H.fused_class(MyOutput, "output")
    with pytest.raises(TypeError, match="not a BERT-style layer block"):
        H.fused_class(mb.BertSelfOutput, "layer")
    with pytest.raises(ValueError, match="kind"):
        H.block_fits(box, "decoder")


@needs_known_code
def test_the_decoder_with_a_cache_takes_the_class_forward():
    """A BERT decoder (is_decoder, cache): its layers are fused but the cached calls fall back."""
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=128, is_decoder=True)  # fmt: skip
    torch.manual_seed(0)
    lm = transformers.BertLMHeadModel(cfg).eval()
    ref = fastinfer.quantize(copy.deepcopy(lm), QuantConfig(rewrite_blocks=False))
    q = fastinfer.quantize(lm)
    ids = torch.randint(0, 120, (1, 5))
    with torch.no_grad():
        a = q.generate(ids, max_new_tokens=4, do_sample=False)
        b = ref.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(a, b)


@needs_known_code
def test_pickle_deepcopy_and_a_fresh_process(tmp_path):
    q = fastinfer.quantize(_bert(layers=1))
    inp = _ids()
    want = _run(q, inp)
    for other in (copy.deepcopy(q), pickle.loads(pickle.dumps(q))):
        assert H.fused_kind(other.encoder.layer[0]) == "layer"
        assert_same(_run(other, inp), want, "copy")
    buf = io.BytesIO()
    torch.save(q, buf)
    (tmp_path / "m.pt").write_bytes(buf.getvalue())
    torch.save((inp, want), tmp_path / "io.pt")
    code = (
        "import torch, fastinfer\n"  # a process that never made the fused classes: pickle finds them by name
        f"m = torch.load({str(tmp_path / 'm.pt')!r}, weights_only=False)\n"
        f"inp, want = torch.load({str(tmp_path / 'io.pt')!r})\n"
        "from fastinfer.convert.hf_blocks import fused_kind\n"
        "assert fused_kind(m.encoder.layer[0]) == 'layer' and fused_kind(m.encoder.layer[0].output) == 'output'\n"
        "with torch.no_grad(): assert torch.equal(m(**inp).last_hidden_state, want)\n"
        "print('ok')\n"
    )
    out = run_python(code, env={"FASTINFER_ISA": fastinfer.info()["isa"]})  # the kernels that made `want`
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@needs_known_code
def test_save_and_load_fuse_again(tmp_path):
    bert = _bert()
    cfg = bert.config
    q = fastinfer.quantize(bert)
    fastinfer.save(q, tmp_path / "b.safetensors")
    loaded = fastinfer.load(tmp_path / "b.safetensors", lambda: transformers.BertModel(cfg))
    assert {n: H.fused_kind(m) for n, m in loaded.named_modules() if H.fused_kind(m)} == \
        {n: H.fused_kind(m) for n, m in q.named_modules() if H.fused_kind(m)}  # fmt: skip
    assert fastinfer.conversion_report(loaded).blocks == fastinfer.conversion_report(q).blocks
    inp = _ids()
    assert_same(_run(loaded, inp), _run(q, inp), "loaded")
    unfused = fastinfer.quantize(copy.deepcopy(bert), QuantConfig(rewrite_blocks=False))
    fastinfer.save(unfused, tmp_path / "u.safetensors")
    plain = fastinfer.load(tmp_path / "u.safetensors", lambda: transformers.BertModel(cfg))
    assert not any(H.fused_kind(m) for m in plain.modules())


@needs_known_code
def test_load_keeps_the_class_forward_where_a_block_does_not_fit(tmp_path):
    """A block of other code in the model built (another transformers, a subclass) takes its own
    forward, which computes the same: the file loads."""
    bert = _bert(layers=1)
    q = fastinfer.quantize(bert)
    fastinfer.save(q, tmp_path / "b.safetensors")

    class MyOutput(mb.BertOutput):  # the same computation, written otherwise
        def forward(self, hidden_states, input_tensor):
            return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)

    def build():
        m = transformers.BertModel(bert.config)
        m.encoder.layer[0].output.__class__ = MyOutput
        return m

    loaded = fastinfer.load(tmp_path / "b.safetensors", build)
    assert type(loaded.encoder.layer[0].output) is MyOutput and H.fused_kind(loaded.encoder.layer[0]) is None
    assert H.fused_kind(loaded.encoder.layer[0].attention.output) == "output"
    inp = _ids()
    assert_same(_run(loaded, inp), _run(q, inp), "the class's own forward")


@needs_known_code
def test_parts_changed_after_quantize_save_load_and_run_as_unfused(tmp_path):
    """sparsify() after quantize(), a dense layer given an activation, dropouts stripped to
    nn.Identity, an activation that is a plain function: each block takes its class's forward where
    the short road no longer applies, files record only the blocks that still qualify."""
    bert = _bert(layers=1)
    cfg = bert.config
    ref = fastinfer.quantize(copy.deepcopy(bert), QuantConfig(rewrite_blocks=False))
    q = fastinfer.quantize(bert)
    inp = _ids()
    sq, sref = fastinfer.sparsify(q), fastinfer.sparsify(ref)
    assert_same(_run(sq, inp), _run(sref, inp), "sparsified")
    fastinfer.save(sq, tmp_path / "s.safetensors")
    back = fastinfer.load(tmp_path / "s.safetensors", lambda: transformers.BertModel(cfg))
    assert_same(_run(back, inp), _run(sq, inp), "sparsified, loaded")
    for model in (q, ref):
        layer = model.encoder.layer[0]
        layer.attention.output.dense.activation = "relu"  # after the block's add in its code
        for name, mod in list(layer.named_modules()):
            if isinstance(mod, nn.Dropout):
                parent, _, child = name.rpartition(".")
                setattr(layer.get_submodule(parent) if parent else layer, child, nn.Identity())
    assert_same(_run(q, inp), _run(ref, inp), "activation set, dropouts stripped")
    for model in (q, ref):
        inter = model.encoder.layer[0].intermediate
        del inter.intermediate_act_fn
        inter.intermediate_act_fn = torch.nn.functional.gelu  # a function, not a module
    assert_same(_run(q, inp), _run(ref, inp), "a plain function")


@needs_known_code
def test_patched_code_runs(monkeypatch):
    """A forward set on a part's instance, a class's forward wrapped (functools.wraps) or replaced
    after quantize(): the short road never skips code that is not the known one."""
    import functools

    inp = _ids()
    q = fastinfer.quantize(_bert(layers=1))
    ref = fastinfer.quantize(copy.deepcopy(_bert(layers=1)), QuantConfig(rewrite_blocks=False))
    want = _run(ref, inp)
    calls = []
    inter = q.encoder.layer[0].intermediate
    inter.forward = lambda h, _f=inter.forward: calls.append(1) or _f(h)  # an instance attribute
    assert_same(_run(q, inp), want, "instance forward")
    assert calls == [1]
    del inter.forward
    original = mb.BertIntermediate.forward

    @functools.wraps(original)
    def wrapped(self, h):
        calls.append(2)
        return original(self, h)

    monkeypatch.setattr(mb.BertIntermediate, "forward", wrapped)
    assert_same(_run(q, inp), want, "wrapped class forward")
    assert calls[-1] == 2
    monkeypatch.setattr(mb.BertIntermediate, "forward", original)
    out_forward = mb.BertOutput.forward
    monkeypatch.setattr(mb.BertOutput, "forward", lambda self, h, x: calls.append(3) or out_forward(self, h, x))
    assert_same(_run(q, inp), want, "replaced class forward")
    assert calls[-1] == 3


@needs_known_code
def test_transformers_output_capturing_leaves_the_layer_path_on():
    """transformers installs its output-capturing hooks for good on the first call that asks for
    hidden states or attentions; they do nothing in later calls, which keep the short road."""
    q = fastinfer.quantize(_bert(layers=1))
    ref = fastinfer.quantize(copy.deepcopy(_bert(layers=1)), QuantConfig(rewrite_blocks=False))
    inp = _ids()
    with torch.no_grad():
        a = q(**inp, output_hidden_states=True, output_attentions=True)
        b = ref(**inp, output_hidden_states=True, output_attentions=True)
    for x, y in zip((*a.hidden_states, *a.attentions), (*b.hidden_states, *b.attentions)):
        assert_same(x, y, "captured outputs")
    assert H._layer_parts(q.encoder.layer[0]) is not None  # capture hooks present, none collecting
    assert_same(_run(q, inp), _run(ref, inp), "after")


@needs_known_code
def test_unpickled_where_the_code_differs_runs_the_class_forward(monkeypatch):
    q = fastinfer.quantize(_bert(layers=1))
    ref = fastinfer.quantize(copy.deepcopy(_bert(layers=1)), QuantConfig(rewrite_blocks=False))
    data = pickle.dumps(q)
    monkeypatch.setattr(H, "_LAYER", "another-transformers")  # as if the installed code differed
    monkeypatch.setattr(H, "_OUTPUT", "another-transformers")
    monkeypatch.setattr(H, "_classes", {})  # a process that has not made the classes
    back = pickle.loads(data)
    assert H.fused_kind(back.encoder.layer[0]) == "layer" and H._layer_parts(back.encoder.layer[0]) is None
    inp = _ids()
    assert_same(_run(back, inp), _run(ref, inp), "the class's own forward")


@needs_known_code
def test_optimize_fuses_the_blocks_too():
    bert = _bert(layers=1)
    inp = _ids()
    model, plan = fastinfer.optimize(bert, inp, time_budget_s=30)
    assert H.fused_kind(model.encoder.layer[0]) == "layer"
    assert fastinfer.conversion_report(model).blocks
