"""fastinfer.optimize (the per-layer planner) and fastinfer.report.

The planner's decisions depend on timings; tests never assert on measured speed (that is the
benchmarks' job). They pin the timings instead (_time_layer replaced by a table) and check what
follows: the fastest candidate that meets min_sqnr_db is kept, ties go to the more accurate,
float restores the modules quantize() fused, the optimized model computes what its chosen layers
compute, and files round-trip. One test runs the real timing path on a small model and checks only
that every layer was measured."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fastinfer
from conftest import assert_same, pin_planner_times, sqnr
from fastinfer.nn import DepthwiseConv2d, Fused, Int8Conv2d, Int8Linear, SparseInt8Linear, WeightOnlyInt8Linear
from fastinfer.plan import planner


def _pin_times(monkeypatch, table, model_ms=None):
    pin_planner_times(monkeypatch, table, model_ms)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


def test_fastest_qualifying_candidate_is_kept(monkeypatch):
    model = _mlp()
    x = torch.randn(4, 16, 64)
    _pin_times(monkeypatch, {"float": 100.0, "int8 dynamic": 20.0, "int8 weight-only": 50.0, "int8 static": 60.0})
    fast, plan = fastinfer.optimize(model, x)
    assert [type(fast[i]) for i in (0, 2, 4)] == [Int8Linear] * 3
    assert fast[0].activation == "gelu" and type(fast[1]) is Fused
    assert [r.time_us for r in plan] == [20.0] * 3 and [r.float_us for r in plan] == [100.0] * 3
    assert all(r.sqnr_db > 30 and set(r.candidates) == {"float", "int8 dynamic", "int8 static", "int8 weight-only"} for r in plan)
    assert plan[0].input == "4x16x64" and plan[0].speedup == 5.0
    # the same outputs as quantize() gives (the same modules)
    with torch.inference_mode():
        assert_same(fast(x), fastinfer.quantize(model)(x), "optimize vs quantize")
    assert fastinfer.report(fast)[0].time_us == 20.0  # report() reads the plan back


def test_accuracy_budget_and_ties(monkeypatch):
    model = _mlp()
    x = torch.randn(8, 64)
    _pin_times(monkeypatch, {"float": 100.0, "int8 dynamic": 20.0, "int8 weight-only": 50.0, "int8 static": 60.0})
    fast, plan = fastinfer.optimize(model, x, min_sqnr_db=80.0)  # int8 cannot reach 80 dB: all float
    assert [type(fast[i]) for i in (0, 2, 4)] == [nn.Linear] * 3
    assert type(fast[1]) is nn.GELU and type(fast[3]) is nn.ReLU  # fused modules restored
    with torch.inference_mode():
        assert_same(fast(x), model(x), "all float")
    assert all(r.kernel == "float (torch)" and r.sqnr_db == math.inf for r in plan)
    assert "float" in plan[0].note

    # weight-only is more accurate than dynamic int8 (no activation rounding): a budget between the two
    dyn = max(r.candidates["int8 dynamic"][1] for r in plan)
    wo = min(r.candidates["int8 weight-only"][1] for r in plan)
    assert wo > dyn + 2, (wo, dyn)
    fast, plan = fastinfer.optimize(model, x, min_sqnr_db=(dyn + wo) / 2)
    assert all(type(fast[i]) is WeightOnlyInt8Linear for i in (0, 2, 4))
    assert fast[0].activation == "gelu" and type(fast[1]) is Fused

    # within 5% of the fastest counts as a tie: the more accurate candidate wins
    _pin_times(monkeypatch, {"float": 21.0, "int8 dynamic": 20.0, "int8 weight-only": 50.0, "int8 static": 60.0})
    fast, _ = fastinfer.optimize(model, x)
    assert all(type(fast[i]) is nn.Linear for i in (0, 2, 4))


def test_sparse_candidates_after_prune(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 64)).eval()
    x = torch.randn(2, 256)

    def times(lay, name):
        return 5.0 if name.startswith(("int8 2:4", "int8 block", "int8 ell")) else 30.0

    _pin_times(monkeypatch, times)
    fast, plan = fastinfer.optimize(model, x, prune={"sparsity": 0.5, "pattern": "2:4"})
    if fastinfer.info()["isa"] != "avx512_vnni" or not fastinfer._runtime._C.sparse_vbmi_active():
        pytest.skip("2:4 has a sparse int8 kernel only with AVX-512 VBMI")
    assert type(fast[0]) is SparseInt8Linear and fast[0].format == "2:4"
    assert "int8 2:4" in plan[0].candidates and plan[0].sparsity == pytest.approx(0.5, abs=0.01)
    # the float reference is the pruned model
    ref = fastinfer.prune(model, 0.5, pattern="2:4")
    with torch.inference_mode():
        assert sqnr(ref(x), fast(x)) > 30


def test_convs_float_restores_batchnorm_and_activation(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
        nn.Conv2d(16, 8, 1),
    ).eval()  # fmt: skip
    for m in model:
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 12, 12)

    def times(lay, name):  # the first conv runs fastest in float, the depthwise in int8, the last fp32-ish
        if lay.name == "0":
            return {"float": 1.0}.get(name, 9.0)
        return {"int8 conv": 2.0}.get(name, 9.0)

    _pin_times(monkeypatch, times)
    fast, plan = fastinfer.optimize(model, x)
    assert type(fast[0]) is nn.Conv2d and type(fast[1]) is nn.BatchNorm2d and type(fast[2]) is nn.ReLU
    assert type(fast[3]) is Int8Conv2d and fast[3].activation == "relu6" and type(fast[4]) is Fused
    assert type(fast[6]) is Int8Conv2d
    assert set(plan[1].candidates) == {"float", "int8 conv", "fp32 depthwise"}
    with torch.inference_mode():
        assert sqnr(model(x), fast(x)) > 25
        # the restored float part computes exactly what the float model does
        assert_same(fast[:3](x), model[:3](x), "float prefix")
    assert fastinfer.conversion_report(fast)[0].result == "float"
    _pin_times(monkeypatch, lambda lay, name: {"fp32 depthwise": 1.0}.get(name, 9.0))
    fast, _ = fastinfer.optimize(model, x)
    assert type(fast[3]) is DepthwiseConv2d


def test_save_load_and_time_budget(monkeypatch, tmp_path):
    model = _mlp()
    x = torch.randn(3, 64)
    _pin_times(monkeypatch, lambda lay, name: {"float": 1.0 if lay.name == "2" else 50.0, "int8 dynamic": 10.0}.get(name, 30.0))
    fast, plan = fastinfer.optimize(model, x)
    assert type(fast[0]) is Int8Linear and type(fast[2]) is nn.Linear and type(fast[3]) is nn.ReLU
    fastinfer.save(fast, tmp_path / "m.safetensors")
    back = fastinfer.load(tmp_path / "m.safetensors", _mlp())
    with torch.inference_mode():
        assert_same(back(x), fast(x), "load")
    fast, plan = fastinfer.optimize(model, x, time_budget_s=0)
    assert all(r.time_us is None and "time_budget_s" in r.note for r in plan)
    assert all(type(fast[i]) is Int8Linear for i in (0, 2, 4))  # quantize()'s choice


def test_whole_model_check_reverts_to_quantize(monkeypatch):
    model = _mlp()
    x = torch.randn(3, 64)
    _pin_times(monkeypatch, {"float": 1.0, "int8 dynamic": 10.0, "int8 weight-only": 30.0, "int8 static": 60.0},
               model_ms={"quantize": 1.0, "optimize": 1.5})  # fmt: skip
    fast, plan = fastinfer.optimize(model, x)
    assert all(type(fast[i]) is Int8Linear for i in (0, 2, 4)) and type(fast[1]) is Fused
    assert all(r.note.startswith("reverted") and r.time_us == 10.0 for r in plan)
    assert plan.model_ms == {"quantize": 1.0, "optimize": 1.5} and "1.5 ms planned" in plan.summary()
    with torch.inference_mode():
        assert_same(fast(x), fastinfer.quantize(model)(x), "reverted")


def test_model_check_swaps_in_and_out():
    """The real check: timed both ways, leaves the planned modules in, the undo restores the markers."""
    model = _mlp()
    q = fastinfer.quantize(model)
    layers = planner._plan_layers(q, model, {}, True)
    choices = {lay.name: (lay.candidates[0], "") for lay in layers}  # all float
    swaps = planner._swaps(q, layers, choices)
    ms = planner._model_check(q, {"quantize": [], "optimize": swaps}, torch.randn(2, 64), rounds=2)
    assert set(ms) == {"quantize", "optimize"} and all(v > 0 for v in ms.values())
    assert type(q[0]) is Int8Linear and type(q[1]) is Fused  # left as quantize() made it
    assert planner._apply(q, swaps, True) is q
    assert type(q[0]) is nn.Linear and type(q[1]) is nn.GELU
    planner._apply(q, swaps, False)
    assert type(q[0]) is Int8Linear and type(q[1]) is Fused


def test_real_timing_path_and_calibration_data():
    model = _mlp()
    x = torch.randn(2, 64)
    calib = [torch.randn(4, 64) for _ in range(3)]
    fast, plan = fastinfer.optimize(model, x, calibration_data=calib, rounds=2)
    assert len(plan) == 3
    for r in plan:
        assert r.time_us > 0 and r.float_us > 0 and r.sqnr_db is not None
        assert all(t is not None and t > 0 for t, _ in r.candidates.values())
    with torch.inference_mode():
        assert sqnr(model(x), fast(x)) > 25


def test_transformers_bert(monkeypatch, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=32)  # fmt: skip
    model = transformers.BertModel(cfg).eval()
    batch = {"input_ids": torch.randint(0, 100, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    _pin_times(monkeypatch, lambda lay, name: {"int8 dynamic": 1.0}.get(name, 5.0) if "intermediate" in lay.name
               else {"float": 1.0}.get(name, 5.0))  # fmt: skip
    fast, plan = fastinfer.optimize(model, batch)
    inter = fast.encoder.layer[0].intermediate
    assert type(inter.dense) is Int8Linear and inter.dense.activation == "gelu" and type(inter.intermediate_act_fn) is Fused
    assert type(fast.encoder.layer[0].output.dense) is nn.Linear
    assert {r.name for r in plan} >= {"encoder.layer.0.intermediate.dense", "encoder.layer.1.attention.self.query"}
    with torch.inference_mode():
        want = fast(**batch).last_hidden_state
        assert sqnr(model(**batch).last_hidden_state, want) > 25
    fastinfer.save_pretrained(fast, tmp_path / "bert")  # float and int8 layers mixed
    back = fastinfer.from_pretrained(tmp_path / "bert", model_class=transformers.BertModel)
    assert type(back.encoder.layer[0].output.dense) is nn.Linear
    assert type(back.encoder.layer[0].intermediate.intermediate_act_fn) is Fused
    with torch.inference_mode():
        assert_same(back(**batch).last_hidden_state, want, "save_pretrained -> from_pretrained")


def test_report_of_any_model_and_formats():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 16), nn.Conv1d(1, 1, 1)).eval()
    plain = fastinfer.report(model)
    assert [r.kernel for r in plain] == ["float (torch)", "float (torch)", "float (torch)"]
    assert plain[0].weight_bytes == (128 * 64 + 64) * 4 and not plain.measured
    q = fastinfer.quantize(fastinfer.prune(model, 0.75, pattern="block", block=(16, 64), skip=["2", "3"]))
    rep = fastinfer.report(q)
    assert rep[0].module in ("Int8Linear", "SparseInt8Linear") and rep[0].sparsity >= 0.7
    assert rep[0].time_us is None and rep[0].sqnr_db is None
    wo = fastinfer.quantize(model, fastinfer.QuantConfig(activations="none"))
    rep = fastinfer.report(wo)
    assert rep[0].kernel == "int8 weight-only" and rep[0].weight_bytes == 128 * 64 + 2 * 64 * 4
    md, csv_text = rep.to_markdown(), rep.to_csv()
    assert md.count("\n") == len(rep) + 1 and md.splitlines()[0].startswith("| layer |")
    assert csv_text.splitlines()[0].startswith("layer,module,kernel") and len(csv_text.splitlines()) == len(rep) + 1
    assert "int8 weight-only" in str(rep) and "layers" in repr(rep)
    with pytest.raises(TypeError):
        fastinfer.report("not a model")


def test_bad_arguments():
    model = _mlp()
    x = torch.randn(2, 64)
    with pytest.raises(TypeError, match="nn.Module"):
        fastinfer.optimize("model", x)
    with pytest.raises(ValueError, match="min_sqnr_db"):
        fastinfer.optimize(model, x, min_sqnr_db=float("nan"))
    with pytest.raises(ValueError, match="rounds"):
        fastinfer.optimize(model, x, rounds=0)
    with pytest.raises(ValueError, match="time_budget_s"):
        fastinfer.optimize(model, x, time_budget_s=-1)
    with pytest.raises(TypeError, match="prune"):
        fastinfer.optimize(model, x, prune="half")
    with pytest.raises(ValueError, match="last dim must be 64"):  # the model's own error for a wrong input
        fastinfer.optimize(model, torch.randn(2, 63))
    assert model.training is False and type(model[0]) is nn.Linear  # the caller's model untouched


def test_refuses_a_converted_model():
    q = fastinfer.quantize(_mlp())
    with pytest.raises(ValueError, match="takes the float model"):
        fastinfer.optimize(q, torch.randn(2, 64))


def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=32)  # fmt: skip
    batch = {"input_ids": torch.randint(0, 100, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    return transformers.BertModel(cfg).eval(), batch


def _pin_attention(monkeypatch, ms: dict, sqnr: dict | None = None):
    monkeypatch.setattr(planner, "_time_attention", lambda root, impls, ex, rounds: {k: ms[k] for k in impls})
    if sqnr is not None:
        monkeypatch.setattr(planner, "_attention_sqnr", lambda root, impls, ref, data: {k: sqnr[k] for k in impls})


FP32, BF16, SDPA = "fastinfer kernel", "fastinfer kernel, bf16 arithmetic", "torch SDPA"


def test_attention_choice_rule():
    """The fastest qualifying implementation; bf16 arithmetic only within the SQNR allowance; an
    fp32 one within 2% of the fastest is preferred (ours first)."""
    ms = {FP32: 10.0, SDPA: 12.0, BF16: 8.0}
    assert planner._choose_attention(ms, {FP32: 40.0, BF16: 39.5}, 1.0)[0] == BF16
    chosen, note = planner._choose_attention(ms, {FP32: 40.0, BF16: 38.0}, 1.0)
    assert chosen == FP32 and "bf16 arithmetic left out" in note and "38.0 dB" in note
    assert planner._choose_attention(ms, {FP32: 40.0, BF16: 39.5}, None)[0] == FP32  # no allowance: no bf16
    assert planner._choose_attention(ms, {FP32: 40.0, BF16: float("nan")}, 1.0)[0] == FP32
    assert planner._choose_attention({FP32: 10.0, SDPA: 8.0}, None, None)[0] == SDPA
    assert planner._choose_attention({FP32: 8.1, SDPA: 8.0}, None, None)[0] == FP32  # tie: ours
    assert planner._choose_attention({FP32: 8.1, SDPA: 8.0, BF16: 7.99}, {FP32: 40.0, BF16: 40.0}, 1.0)[0] == FP32


def test_transformers_attention_is_planned(monkeypatch):
    model, batch = _tiny_bert()
    pin_planner_times(monkeypatch, {}, default=5.0)
    bf16_kernel = fastinfer._C.attention_kernel() == "avx512_bf16"
    _pin_attention(monkeypatch, {FP32: 3.0, SDPA: 2.0, BF16: 1.0}, {FP32: 40.0, BF16: 39.9})
    fast, plan = fastinfer.optimize(model, batch)
    att = plan.attention
    assert att is not None and set(att.ms) == ({FP32, SDPA, BF16} if bf16_kernel else {FP32, SDPA})
    want = (BF16, "fastinfer_bf16") if bf16_kernel else (SDPA, "sdpa")
    assert (att.chosen, att.implementation) == want and fast.config._attn_implementation == want[1]
    assert f"attention: {want[0]}" in plan.summary() and fastinfer.report(fast).attention == att
    assert "chosen by optimize" in fastinfer.conversion_report(fast).attention
    with torch.inference_mode():  # the model runs what was chosen
        got = fast(**batch).last_hidden_state
        fast.set_attn_implementation("fastinfer")
        assert fastinfer.report(fast).attention is None  # switched since: the plan no longer says what runs
        if bf16_kernel:
            assert not torch.equal(fast(**batch).last_hidden_state, got)
    model, batch = _tiny_bert()
    _pin_attention(monkeypatch, {FP32: 3.0, SDPA: 2.0, BF16: 1.0}, {FP32: 40.0, BF16: 30.0})  # bf16 loses 10 dB
    fast, plan = fastinfer.optimize(model, batch)
    assert plan.attention.chosen == SDPA and fast.config._attn_implementation == "sdpa"
    assert ("bf16 arithmetic left out" in plan.attention.note) == bf16_kernel
    fast, plan = fastinfer.optimize(model, batch, max_model_sqnr_drop_db=None)  # no allowance: no bf16 candidate
    assert BF16 not in plan.attention.ms and plan.attention.sqnr_db is None
    fast, plan = fastinfer.optimize(model, batch, config=fastinfer.QuantConfig(attention=False))
    assert plan.attention is None and fast.config._attn_implementation == "sdpa"
    fast, plan = fastinfer.optimize(model, batch, config=fastinfer.QuantConfig(attention="bf16"))
    assert plan.attention is None and fast.config._attn_implementation == "fastinfer_bf16"  # asked for: kept
    fast, plan = fastinfer.optimize(model, batch, config=fastinfer.QuantConfig(attention="fp32"))
    assert plan.attention is None and fast.config._attn_implementation == "fastinfer"
    assert fastinfer.quantize(model, fastinfer.QuantConfig(attention="fp32")).config._attn_implementation == "fastinfer"
    with pytest.raises(TypeError, match="'fp32' or 'bf16'"):
        fastinfer.QuantConfig(attention="fp16")


def test_transformers_attention_real_timing():
    model, batch = _tiny_bert()
    fast, plan = fastinfer.optimize(model, batch, rounds=1)
    att = plan.attention
    assert att is not None and all(v > 0 for v in att.ms.values()) and fast.config._attn_implementation == att.implementation
    if att.sqnr_db is not None:
        assert att.sqnr_db[FP32] > 25 and att.sqnr_db[BF16] > 25
    with torch.inference_mode():
        assert sqnr(model(**batch).last_hidden_state, fast(**batch).last_hidden_state) > 25
