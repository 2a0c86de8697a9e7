"""fastinfer.ops.attention (the fused CPU attention kernel) and its use in transformers models.

The kernel computes in fp32 like torch's SDPA, in another order: results are compared with SDPA
in float64 by tolerance, on every ISA (ref and avx2 run the scalar reference kernel, avx512 its own).
"""

from __future__ import annotations

import copy
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

import fastinfer
from fastinfer.convert import attention as hf_attention
from fastinfer.ops.attention import attention

TOL = {torch.float32: 2e-6, torch.bfloat16: 2e-2}  # max |error| vs float64 SDPA, values ~N(0, 1)


def _qkv(b, h, lq, lk, d, dv=None, hk=None, dtype=torch.float32, seed=0, packed=True):
    """q, k, v as SDPA takes them; packed: heads sliced out of [batch, tokens, heads * d]
    projections (the strided views a transformer hands over), else contiguous."""
    g = torch.Generator().manual_seed(seed)
    dv, hk = dv or d, hk or h
    if packed and lq == lk and dv == d:
        x = torch.randn(b, lq, (h + 2 * hk) * d, generator=g).to(dtype)
        q, k, v = x.split([h * d, hk * d, hk * d], -1)
        return tuple(t.view(b, lq, -1, d).transpose(1, 2) for t in (q, k, v))
    q = torch.randn(b, h, lq, d, generator=g).to(dtype)
    k = torch.randn(b, hk, lk, d, generator=g).to(dtype)
    v = torch.randn(b, hk, lk, dv, generator=g).to(dtype)
    return q, k, v


def _ref(q, k, v, mask=None, is_causal=False, scale=None):
    h, hk = q.shape[1], k.shape[1]
    k, v = k.double().repeat_interleave(h // hk, 1), v.double().repeat_interleave(h // hk, 1)
    m = mask.double() if mask is not None and mask.is_floating_point() else mask
    return F.scaled_dot_product_attention(q.double(), k, v, attn_mask=m, is_causal=is_causal, scale=scale)


SHAPES = [  # b, h, lq, lk, d, dv, kv heads
    (2, 3, 37, 37, 20, None, None),
    (8, 12, 128, 128, 32, None, None),
    (1, 4, 1, 45, 64, None, None),  # one query (decoding)
    (3, 2, 17, 33, 16, 24, None),  # dv != d, lq != lk
    (2, 8, 19, 19, 80, None, 2),  # grouped-query: 4 query heads per key/value head
    (1, 1, 5, 70, 130, 65, None),  # head sizes past one 64-wide tile
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])))
def test_matches_sdpa_in_float64(isa, shape, dtype):
    b, h, lq, lk, d, dv, hk = shape
    q, k, v = _qkv(b, h, lq, lk, d, dv, hk, dtype)
    g = torch.Generator().manual_seed(1)
    masks = {"none": None, "bool": torch.rand(b, 1, lq, lk, generator=g) > 0.3,
             "float": torch.randn(b, h, lq, lk, generator=g).to(dtype)}  # fmt: skip
    for name, mask in masks.items():
        for causal in (False, True) if mask is None else (False,):
            out = attention(q, k, v, mask, is_causal=causal)
            assert out.shape == (b, h, lq, dv or d) and out.dtype == dtype
            err = (out.double() - _ref(q, k, v, mask, causal)).abs().max().item()
            assert err <= TOL[dtype], f"{name} mask, causal={causal}: max error {err}"


def test_the_simd_kernel_agrees_with_the_reference():
    if "avx512_vnni" not in fastinfer.available_isas():
        pytest.skip("no AVX-512 on this CPU: only the reference kernel exists here")
    q, k, v = _qkv(4, 6, 50, 50, 40)
    mask = torch.rand(4, 1, 50, 50, generator=torch.Generator().manual_seed(3)) > 0.5
    fastinfer.set_isa("avx512_vnni")
    assert fastinfer.ops.attention_native()
    simd = attention(q, k, v, mask)
    fastinfer.set_isa("ref")
    assert not fastinfer.ops.attention_native()
    ref = attention(q, k, v, mask)
    assert (simd - ref).abs().max().item() < 1e-6


def test_output_layout_is_tokens_then_heads():
    """The op returns [batch, q_len, heads, dv] (what a transformer's output projection reads)."""
    q, k, v = _qkv(2, 3, 7, 7, 8)
    out = torch.ops.fastinfer.attention(q, k, v, None, 0.5, False)
    assert out.shape == (2, 7, 3, 8) and out.is_contiguous()
    assert torch.allclose(out.transpose(1, 2).double(), _ref(q, k, v, scale=0.5), atol=2e-6)


def test_masked_rows_give_zeros_and_nan_gives_nan(isa):
    q, k, v = _qkv(1, 2, 4, 6, 16, packed=False)
    mask = torch.ones(1, 1, 4, 6, dtype=torch.bool)
    mask[..., 1, :] = False  # query 1 may attend nothing
    out = attention(q, k, v, mask)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))
    fmask = torch.zeros(1, 1, 4, 6)
    fmask[..., 2, :] = -math.inf
    assert torch.equal(attention(q, k, v, fmask)[:, :, 2], torch.zeros(1, 2, 16))
    k[0, 1, 3, 5] = math.nan  # one key of head 1: every row of that head reads it
    out = attention(q, k, v)
    assert out[:, 1].isnan().all() and not out[:, 0].isnan().any()


def test_causal_is_top_left_aligned_as_torch(isa):
    for lq, lk in ((5, 9), (9, 5), (6, 6), (3, 7), (2, 2)):
        q, k, v = _qkv(1, 2, lq, lk, 16, packed=False, seed=lq)
        out = attention(q, k, v, is_causal=True)
        tril = torch.ones(lq, lk, dtype=torch.bool).tril()
        assert (out.double() - _ref(q, k, v, tril)).abs().max().item() < 2e-6, (lq, lk)


def test_results_do_not_depend_on_threads():
    q, k, v = _qkv(3, 4, 100, 100, 32)
    torch.set_num_threads(1)
    one = attention(q, k, v, is_causal=True)
    torch.set_num_threads(2)
    assert torch.equal(attention(q, k, v, is_causal=True), one)


def test_bad_arguments_raise_clear_errors():
    q, k, v = _qkv(1, 4, 5, 5, 8, packed=False)
    with pytest.raises(ValueError, match="4-D"):
        attention(q[0], k[0], v[0])
    with pytest.raises(TypeError, match="one dtype"):
        attention(q, k.bfloat16(), v)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        attention(q.half(), k.half(), v.half())
    with pytest.raises(ValueError, match="multiple of the 3 key/value heads"):
        attention(q, k[:, :3], v[:, :3])
    with pytest.raises(ValueError, match="does not broadcast"):
        attention(q, k, v, torch.ones(5, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be bool"):
        attention(q, k, v, torch.ones(5, 5, dtype=torch.int32))
    with pytest.raises(ValueError, match="scale must be a finite float"):
        attention(q, k, v, scale=math.nan)
    with pytest.raises(ValueError, match="either attn_mask or is_causal"):
        attention(q, k, v, torch.ones(5, 5, dtype=torch.bool), is_causal=True)
    # CUDA tensors get a clear error, not the dispatcher's "could not run ... with the CUDA backend"
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastinfer::attention", "CUDA")
    with pytest.raises(RuntimeError, match="runs on the CPU only"):
        importlib.import_module("fastinfer.ops.attention")._attention_cuda(q, k, v, None, 0.5, False)


def test_opcheck_and_compile():
    q, k, v = _qkv(2, 3, 6, 6, 8)
    mask = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(0)) > 0.4
    for args in ((q, k, v, None, 0.3, True), (q, k, v, mask, 0.3, False)):
        torch.library.opcheck(torch.ops.fastinfer.attention, args)
    fn = torch.compile(lambda q, k, v, m: attention(q, k, v, m) * 2, fullgraph=True)
    assert torch.equal(fn(q, k, v, mask), attention(q, k, v, mask) * 2)


def test_gradients_match_sdpa():
    q, k, v = (t.detach().clone().requires_grad_(True) for t in _qkv(2, 4, 9, 9, 8, hk=2, packed=False))
    mask = torch.randn(2, 1, 9, 9)
    out = attention(q, k, v, mask)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qq, kk.repeat_interleave(2, 1), vv.repeat_interleave(2, 1), attn_mask=mask)
    want = torch.autograd.grad(ref, (qq, kk, vv), grad)
    for a, b in zip(got, want):
        assert a is not None and torch.allclose(a, b, atol=1e-5)


# ------------------------------------------------------------------------------- transformers


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the fused kernel's calls from transformers models."""
    calls = []
    real = hf_attention._kernel

    def counting(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(hf_attention, "_kernel", counting)
    return calls


def _bert(transformers, seed=0):
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(seed)
    return transformers.BertModel(cfg).eval()


def _padded_batch():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 120, (3, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    mask[2, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _native():
    if not fastinfer.ops.attention_native():
        pytest.skip("no AVX-512 here: converted models keep torch's SDPA (tested below)")


def test_quantize_switches_a_bert_to_the_kernel(kernel_calls):
    transformers = pytest.importorskip("transformers")
    _native()
    model = _bert(transformers)
    fast = fastinfer.quantize(model)
    plain = fastinfer.quantize(model, fastinfer.QuantConfig(attention=False))
    assert model.config._attn_implementation == "sdpa"  # the original is untouched
    assert fast.config._attn_implementation == "fastinfer"
    assert plain.config._attn_implementation == "sdpa"
    assert fastinfer.conversion_report(fast).attention == "fastinfer kernel (was sdpa)"
    assert "attention: kept: QuantConfig(attention=False)" in fastinfer.conversion_report(plain).summary()
    batch = _padded_batch()
    with torch.inference_mode():
        got = fast(**batch).last_hidden_state
        assert len(kernel_calls) == 2  # one per layer
        want = plain(**batch).last_hidden_state
    assert len(kernel_calls) == 2
    real = batch["attention_mask"].bool()  # padded positions' outputs are not used by anyone
    assert (got - want)[real].abs().max().item() < 1e-4


def test_bf16_bert_and_gpt2_generate(kernel_calls):
    transformers = pytest.importorskip("transformers")
    _native()
    model = _bert(transformers).bfloat16()
    batch = _padded_batch()
    with torch.inference_mode():
        want = model(**batch).last_hidden_state.float()
        fast = fastinfer.quantize(model, fastinfer.QuantConfig(skip=["*"]))  # attention only: layers stay float
        got = fast(**batch).last_hidden_state.float()
    assert kernel_calls and fastinfer.conversion_report(fast).converted == []
    real = batch["attention_mask"].bool()
    cos = F.cosine_similarity(got[real], want[real], dim=-1)
    assert cos.min().item() > 0.999
    cfg = transformers.GPT2Config(vocab_size=100, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    torch.manual_seed(0)
    gpt = transformers.GPT2LMHeadModel(cfg).eval()
    fast = fastinfer.quantize(gpt, fastinfer.QuantConfig(skip=["*"]))
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(1))
    kernel_calls.clear()
    with torch.inference_mode():
        logits = fast(ids).logits
        want = gpt(ids).logits
        assert (logits - want).abs().max().item() < 1e-4  # causal prompt
        out = fast.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        ref = gpt.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)
    assert {s[2] for s in kernel_calls} == {6, 1}  # the prompt, then one query per step over the cache


def test_torch_takes_over_where_the_kernel_does_not_apply(kernel_calls):
    transformers = pytest.importorskip("transformers")
    model = fastinfer.quantize(_bert(transformers), fastinfer.QuantConfig(skip=["*"]))
    batch = _padded_batch()
    if fastinfer.ops.attention_native():
        fastinfer.set_isa("avx2")  # no kernel of its own: torch's SDPA is the faster one there
        with torch.inference_mode():
            model(**batch)
        assert kernel_calls == []
        fastinfer.set_isa(fastinfer.available_isas()[-1])
    # autograd: the gradient comes from torch's SDPA, never a silent None
    emb = model.embeddings.word_embeddings(batch["input_ids"]).detach().requires_grad_(True)
    model(inputs_embeds=emb, attention_mask=batch["attention_mask"]).last_hidden_state.sum().backward()
    assert kernel_calls == [] and emb.grad is not None and emb.grad.abs().sum() > 0
    # dropout in training mode
    model.train()
    model(**batch)
    assert kernel_calls == []


def test_a_chosen_eager_attention_is_kept():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, attn_implementation="eager")  # fmt: skip
    q = fastinfer.quantize(transformers.BertModel(cfg).eval())
    assert q.config._attn_implementation == "eager"
    assert fastinfer.conversion_report(q).attention == "kept: the model's config chose attn_implementation='eager'"


def test_a_plain_model_has_no_attention_line():
    q = fastinfer.quantize(torch.nn.Sequential(torch.nn.Linear(8, 8)))
    assert fastinfer.conversion_report(q).attention is None
    assert "attention" not in fastinfer.conversion_report(q).summary()


def test_saved_models_come_back_with_the_kernel(tmp_path, kernel_calls):
    transformers = pytest.importorskip("transformers")
    model = _bert(transformers)
    q = fastinfer.quantize(model)
    fastinfer.save(q, tmp_path / "m.safetensors")
    loaded = fastinfer.load(tmp_path / "m.safetensors", lambda: _bert(transformers, seed=1))
    assert loaded.config._attn_implementation == "fastinfer"
    assert fastinfer.conversion_report(loaded).attention == "fastinfer kernel (was sdpa)"
    fastinfer.save_pretrained(q, tmp_path / "hf")
    again = fastinfer.from_pretrained(tmp_path / "hf", transformers.BertModel)
    assert again.config._attn_implementation == "fastinfer"
    batch = _padded_batch()
    with torch.inference_mode():
        assert torch.equal(again(**batch).last_hidden_state, q(**batch).last_hidden_state)
    plain = fastinfer.quantize(model, fastinfer.QuantConfig(attention=False))
    fastinfer.save(plain, tmp_path / "p.safetensors")
    assert fastinfer.load(tmp_path / "p.safetensors", lambda: _bert(transformers)).config._attn_implementation == "sdpa"


def test_deep_copies_keep_working():
    transformers = pytest.importorskip("transformers")
    q = fastinfer.quantize(_bert(transformers))
    twin = copy.deepcopy(q)
    batch = _padded_batch()
    with torch.inference_mode():
        assert torch.equal(twin(**batch).last_hidden_state, q(**batch).last_hidden_state)


def test_bf16_kernel_odd_sizes_and_special_rows(isa):
    """bf16 inputs: on CPUs with AVX512-BF16 the pairs kernel (odd head sizes pair their last
    element with 0; an odd key count its last key with a zero key); elsewhere the fp32 kernels."""
    kernel = fastinfer.info()["attention_kernel"]
    assert kernel in ("ref", "avx512_vnni", "avx512_bf16")
    for b, h, lq, lk, d, dv, hk in ((2, 3, 9, 11, 33, 17, None), (1, 4, 21, 21, 7, 7, 2), (3, 2, 16, 5, 1, 3, None)):
        q, k, v = _qkv(b, h, lq, lk, d, dv, hk, torch.bfloat16, packed=False, seed=d)
        mask = torch.rand(b, 1, lq, lk, generator=torch.Generator().manual_seed(lq)) > 0.3
        mask[..., 0, :] = False  # a row that may attend nothing: zeros
        for m, causal in ((None, True), (mask, False)):
            out = attention(q, k, v, m, is_causal=causal)
            err = (out.double() - _ref(q, k, v, m, causal)).abs().max().item()
            assert err <= TOL[torch.bfloat16], (b, h, lq, lk, d, causal, err, kernel)
        assert torch.equal(attention(q, k, v, mask)[:, :, 0], torch.zeros(b, h, dv or d, dtype=torch.bfloat16))
        k2 = k.clone()
        k2[0, 0, 2, 0] = float("nan")
        assert attention(q, k2, v)[0, :h // (hk or h)].isnan().all()


@pytest.mark.parametrize("dv", [8, 16, 24, 32, 40])
def test_bf16_kernel_row_blocks(dv):
    """The bf16 kernel's P.V blocks: 8 query rows for value heads up to 32 wide (one or two vectors),
    4 beyond; every remainder of rows, causal and masked rows, a head's rows split over tasks."""
    for lq in (1, 4, 5, 7, 8, 9, 15, 16, 17, 23, 70):  # 70: a head split into 3 tasks of 24, 24, 22 rows
        q, k, v = _qkv(2, 1, lq, lq + 3, 32, dv, None, torch.bfloat16, packed=False, seed=lq * dv)
        mask = torch.rand(2, 1, lq, lq + 3, generator=torch.Generator().manual_seed(lq)) > 0.25
        mask[:, :, -1, :] = False  # the last row (in whichever block) attends nothing: zeros
        for m, causal in ((None, True), (mask, False), (None, False)):
            out = attention(q, k, v, m, is_causal=causal)
            err = (out.double() - _ref(q, k, v, m, causal)).abs().max().item()
            assert err <= TOL[torch.bfloat16], (lq, dv, causal, err)
        assert not attention(q, k, v, mask)[:, :, -1].any()


def test_a_converted_bert_compiles_and_exports_with_the_kernel_in_the_graph():
    transformers = pytest.importorskip("transformers")
    q = fastinfer.quantize(_bert(transformers))
    batch = _padded_batch()
    with torch.no_grad():
        ref = q(**batch).last_hidden_state
        out = torch.compile(q, fullgraph=True)(**batch).last_hidden_state
        assert (out - ref).abs().max().item() < 1e-5
        ep = torch.export.export(q, (), batch)
        assert "fastinfer.attention.default" in {str(n.target) for n in ep.graph.nodes}
        assert (ep.module()(**batch).last_hidden_state - ref).abs().max().item() < 1e-5  # (SDPA in eager on ISAs without the kernel)


# ----------------------------------------------------- bf16 arithmetic on fp32 tensors (attention="bf16")


@pytest.mark.parametrize("shape", [(2, 4, 16, 16, 32), (1, 3, 37, 41, 24), (2, 2, 9, 9, 33)], ids=str)
def test_bf16_arithmetic_on_fp32_inputs(shape, isa):
    """bf16=True on fp32 q, k, v: fp32 out within bf16's error. Where the bf16 kernel runs, it is
    exactly the bf16-input kernel on the rounded inputs (its bf16 output is ours rounded); elsewhere,
    and for decoding rows, the fp32 kernel's result as without the flag."""
    b, h, lq, lk, d = shape
    q, k, v = _qkv(b, h, lq, lk, d, packed=False, seed=d)
    mask = torch.zeros(b, 1, 1, lk)
    mask[0, ..., lk - 3 :] = -math.inf
    got = attention(q, k, v, mask, bf16=True)
    assert got.dtype == torch.float32
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), mask.double())
    assert (got.double() - want).abs().max().item() <= TOL[torch.bfloat16]
    if fastinfer._C.attention_kernel() == "avx512_bf16":
        rounded = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask.bfloat16())
        assert torch.equal(got.bfloat16(), rounded)
        assert not torch.equal(got, attention(q, k, v, mask))  # the arithmetic did change
    else:
        assert torch.equal(got, attention(q, k, v, mask))
    one = attention(q[:, :, :2], k, v, mask, bf16=True)  # decoding: the fp32 direct path
    assert torch.equal(one, attention(q[:, :, :2], k, v, mask))
    torch.library.opcheck(torch.ops.fastinfer.attention, (q, k, v, mask, 1 / math.sqrt(d), False, True))


def test_quantize_with_bf16_attention(kernel_calls, tmp_path):
    transformers = pytest.importorskip("transformers")
    _native()
    model = _bert(transformers)
    fast = fastinfer.quantize(model, fastinfer.QuantConfig(attention="bf16"))
    assert fast.config._attn_implementation == "fastinfer_bf16"
    assert fastinfer.conversion_report(fast).attention == "fastinfer kernel, bf16 arithmetic (was sdpa)"
    fp32 = fastinfer.quantize(model)
    batch = _padded_batch()
    real = batch["attention_mask"].bool()
    with torch.inference_mode():
        got = fast(**batch).last_hidden_state
        assert len(kernel_calls) == 2
        want = fp32(**batch).last_hidden_state
        ref = model(**batch).last_hidden_state
    cos = F.cosine_similarity(got[real].flatten(), ref[real].flatten(), dim=0).item()
    assert cos > 0.999, cos
    assert (got - want)[real].abs().max().item() < 0.1  # bf16's error, not a different model
    path = tmp_path / "bert.safetensors"
    fastinfer.save(fast, path)
    loaded = fastinfer.load(path, copy.deepcopy(model))
    assert loaded.config._attn_implementation == "fastinfer_bf16"
    with torch.inference_mode():
        assert torch.equal(loaded(**batch).last_hidden_state, got)
    # a model already on the fp32 kernel switches when asked, and back
    assert hf_attention.enable_fast_attention(fp32, bf16=True) == "fastinfer kernel, bf16 arithmetic (was fastinfer)"
    assert hf_attention.enable_fast_attention(fp32) == "fastinfer kernel (was fastinfer_bf16)"
    with pytest.raises(TypeError, match="True, False, 'fp32' or 'bf16'"):
        fastinfer.QuantConfig(attention="fp16")
