"""Adversarial cases for fastinfer.ops.attention (the fused CPU attention kernel), its op, its
backward and its transformers glue: the inputs a review found to break it (each test's docstring
says what went wrong before the fix) and edge cases that hold (sizes, masks, strides, alignment,
non-finite values, threads, compile).

The contract is torch.nn.functional.scaled_dot_product_attention (no dropout): results are
compared with SDPA in float64 by tolerance, NaN positions exactly. Kernels that disagree with
torch only on some ISAs are marked per ISA: `ref` and `avx2` run the scalar reference kernel,
`avx512_vnni` the SIMD one (fastinfer.ops.attention_native() says which runs).
"""

from __future__ import annotations

import math
import threading

import pytest
import torch
import torch.nn.functional as F

import fastinfer
from conftest import run_python
from fastinfer.ops.attention import attention, attention_native

F32_TOL = 2e-6


def _rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _ref(q, k, v, mask=None, is_causal=False, scale=None):
    """SDPA in float64 (k, v repeated for grouped-query heads)."""
    h, hk = q.shape[1], k.shape[1]
    if hk and hk != h:
        k, v = k.repeat_interleave(h // hk, 1), v.repeat_interleave(h // hk, 1)
    m = mask.double() if mask is not None and mask.is_floating_point() else mask
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=m, is_causal=is_causal,
                                          scale=scale)  # fmt: skip


def _check(out, q, k, v, mask=None, is_causal=False, scale=None, tol=None):
    want = _ref(q, k, v, mask, is_causal, scale)
    assert out.shape == want.shape and out.dtype == q.dtype
    assert torch.equal(out.isnan(), want.isnan()), "NaN positions differ from SDPA's"
    if out.numel():
        tol = tol if tol is not None else (F32_TOL if q.dtype == torch.float32 else 2e-2)
        err = (out.double() - want).nan_to_num(0.0).abs().max().item()
        assert err <= tol, f"max error {err}"


# ------------------------------------------------------------------------------ edge cases that hold


@pytest.mark.parametrize(
    "lq, lk, d, dv, causal",
    [
        (1, 17, 65, 80, False),  # one query row (the direct decoding path), Lk % 16 != 0
        (3, 100, 200, 128, True),  # < 4 rows, causal, Lq < Lk, head sizes past one tile
        (5, 1, 1, 3, True),  # one key, D = 1
        (40, 23, 80, 65, True),  # causal Lq > Lk: rows past the last key see every key
        (37, 53, 128, 200, False),
    ],
)
def test_odd_sizes_match_sdpa(isa, lq, lk, d, dv, causal):
    q, k, v = _rand(2, 4, lq, d), _rand(2, 2, lk, d, seed=1), _rand(2, 2, lk, dv, seed=2)
    _check(attention(q, k, v, is_causal=causal), q, k, v, is_causal=causal)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    _check(attention(qb, kb, vb, is_causal=causal), qb, kb, vb, is_causal=causal)


@pytest.mark.parametrize(
    "b, h, hk, lq, lk, d, dv",
    [(0, 2, 2, 5, 6, 8, 8), (1, 0, 0, 5, 6, 8, 8), (1, 2, 1, 0, 6, 8, 8), (1, 2, 2, 5, 0, 8, 8),
     (1, 2, 2, 5, 6, 0, 8), (1, 2, 2, 5, 6, 8, 0)],  # fmt: skip
    ids=["B=0", "H=0", "Lq=0", "Lk=0", "D=0", "Dv=0"],
)
def test_zero_sizes(isa, b, h, hk, lq, lk, d, dv):
    q, k, v = _rand(b, h, lq, d), _rand(b, hk, lk, d, seed=1), _rand(b, hk, lk, dv, seed=2)
    for causal in (False, True):
        _check(attention(q, k, v, is_causal=causal, scale=0.5), q, k, v, is_causal=causal, scale=0.5)


def test_every_mask_form(isa):
    """Ranks 2-4, broadcast dims, stride-0 expansions, transposed and strided last dims, a bool
    mask at an odd byte address, bf16 masks; fully masked rows give zeros."""
    b, h, lq, lk, d = 2, 4, 19, 35, 24
    q, k, v = _rand(b, h, lq, d), _rand(b, 2, lk, d, seed=1), _rand(b, 2, lk, 16, seed=2)
    g = torch.Generator().manual_seed(3)

    def bmask(*s):
        return torch.rand(*s, generator=g) > 0.3

    fully = torch.zeros(b, 1, lq, lk)
    fully[:, :, 4] = -math.inf
    fully[:, :, 7] = torch.finfo(torch.float32).min  # every key equally unlikely: a plain average
    masks = {
        "2d": bmask(lq, lk),
        "3d float": _rand(h, lq, lk, seed=4),
        "b11k": bmask(b, 1, 1, lk),
        "expanded": bmask(b, 1, 1, lk).expand(b, h, lq, lk),
        "transposed": bmask(lk, lq).t(),
        "strided last dim": _rand(b, h, lq, 2 * lk, seed=5)[..., ::2],
        "key-broadcast": bmask(b, h, lq, 1),
        "bf16": _rand(lq, lk, seed=6).bfloat16(),
        "odd byte address": bmask(b * h * lq * lk + 1)[1:].view(b, h, lq, lk),
        "no key attended": torch.zeros(b, h, lq, lk, dtype=torch.bool),
        "-inf / finfo.min rows": fully,
    }
    for name, mask in masks.items():
        try:
            _check(attention(q, k, v, mask), q, k, v, mask)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None
    out = attention(q, k, v, masks["no key attended"])
    assert torch.equal(out, torch.zeros_like(out))


def test_strided_and_misaligned_inputs(isa):
    """Heads sliced out of one [B, L, 3 H D] buffer, views at odd element offsets (unaligned data
    pointers, fp32 and bf16), last-dim strides != 1, stride-0 expanded k / v, D = 1 strided."""
    b, n, h, d = 2, 23, 3, 40
    buf = _rand(b, n, 3 * h * d)
    q, k, v = (t.view(b, n, h, d).transpose(1, 2) for t in buf.split(h * d, -1))
    for causal in (False, True):
        _check(attention(q, k, v, is_causal=causal), q, k, v, is_causal=causal)
    for dtype in (torch.float32, torch.bfloat16):
        qo = _rand(1 + 2 * 3 * 17 * 33, dtype=dtype)[1:].view(2, 3, 17, 33)
        ko = _rand(1 + 2 * 3 * 29 * 33, dtype=dtype, seed=1)[1:].view(2, 3, 29, 33)
        vo = _rand(3 + 2 * 3 * 29 * 21, dtype=dtype, seed=2)[3:].view(2, 3, 29, 21)
        assert qo.data_ptr() % 64 and ko.data_ptr() % 64 and vo.data_ptr() % 64
        _check(attention(qo, ko, vo), qo, ko, vo)
        _check(attention(qo[:, :, :2], ko, vo), qo[:, :, :2], ko, vo)  # < 4 rows: k, v read in place
    qs, ks = _rand(2, 3, 17, 66)[..., ::2], _rand(2, 3, 29, 66, seed=1)[..., ::2]
    vs = _rand(2, 3, 20, 29, seed=2).transpose(-1, -2)
    _check(attention(qs, ks, vs), qs, ks, vs)
    ke, ve = _rand(1, 1, 29, 33, seed=3).expand(2, 3, 29, 33), _rand(1, 1, 29, 21, seed=4).expand(2, 3, 29, 21)
    qo = _rand(2, 3, 17, 33)
    _check(attention(qo, ke, ve, is_causal=True), qo, ke, ve, is_causal=True)
    q1, k1 = _rand(2, 3, 17, 5)[..., 2:3], _rand(2, 3, 29, 5, seed=1)[..., 1:2]
    _check(attention(q1, k1, vs), q1, k1, vs)


def test_non_finite_inputs_where_every_kernel_agrees_with_sdpa(isa):
    q, k, v = _rand(1, 2, 21, 24), _rand(1, 2, 21, 24, seed=1), _rand(1, 2, 21, 24, seed=2)
    for name, idx, val in (("q", (0, 0, 3, 2), math.nan), ("k", (0, 0, 3, 2), math.nan), ("v", (0, 1, 5, 0), math.nan),
                           ("v", (0, 1, 5, 0), math.inf)):  # fmt: skip
        t = {"q": q, "k": k, "v": v}
        t[name] = t[name].clone()
        t[name][idx] = val
        _check(attention(t["q"], t["k"], t["v"]), t["q"], t["k"], t["v"])
    for val in (math.nan, -math.inf, torch.finfo(torch.float32).min, torch.finfo(torch.float32).max):
        m = torch.zeros(1, 2, 21, 21)
        m[0, 0, 3, 5] = val
        m[0, 1, 4, :] = val
        _check(attention(q, k, v, m), q, k, v, m)
    # q.k past fp32 range: -inf for every key of row 3 -> zeros, as torch's SDPA in fp32
    qq, kk = q.clone(), k.clone()
    kk[..., 0] = 10.0
    qq[0, 0, 3] = 0.0
    qq[0, 0, 3, 0] = -3e38
    out = attention(qq, kk, v)
    assert torch.equal(out[0, 0, 3], torch.zeros(24))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(qq, kk, v), atol=F32_TOL, rtol=0)


def test_long_key_sequences(isa):
    q, k, v = _rand(1, 1, 9, 64), _rand(1, 1, 4100, 64, seed=1), _rand(1, 1, 4100, 48, seed=2)
    _check(attention(q, k, v), q, k, v)
    mask = torch.rand(9, 4100, generator=torch.Generator().manual_seed(0)) > 0.5
    _check(attention(q, k, v, mask), q, k, v, mask)
    q2 = _rand(1, 1, 300, 16)
    _check(attention(q2, k[..., :16], v, is_causal=True), q2, k[..., :16], v, is_causal=True)


def test_results_repeat_and_agree_across_kernels():
    q, k, v = _rand(1, 3, 70, 80), _rand(1, 3, 130, 80, seed=1), _rand(1, 3, 130, 72, seed=2)
    mask = _rand(1, 1, 70, 130, seed=3)
    outs = {}
    for isa in fastinfer.available_isas():
        fastinfer.set_isa(isa)
        for causal in (False, True):
            m = None if causal else mask
            first = attention(q, k, v, m, is_causal=causal)
            assert torch.equal(attention(q, k, v, m, is_causal=causal), first), (isa, causal)
            outs[isa, causal] = first
    for causal in (False, True):
        base = outs["ref", causal]
        for isa in fastinfer.available_isas():
            assert (outs[isa, causal] - base).abs().max().item() < 1e-6, (isa, causal)


def test_concurrent_calls_while_the_isa_flips():
    isas = fastinfer.available_isas()
    q, k, v = _rand(1, 3, 40, 32), _rand(1, 3, 50, 32, seed=1), _rand(1, 3, 50, 32, seed=2)
    mask = _rand(1, 1, 40, 50, seed=3)
    expected = []
    for isa in isas:
        fastinfer.set_isa(isa)
        expected.append(attention(q, k, v, mask))
    stop, bad = threading.Event(), []

    def worker():
        for _ in range(15):
            out = attention(q, k, v, mask)
            if not any(torch.equal(out, e) for e in expected):
                bad.append(out)

    def flipper():
        i = 0
        while not stop.is_set():
            fastinfer.set_isa(isas[i % len(isas)])
            i += 1

    workers = [threading.Thread(target=worker) for _ in range(3)]
    flip = threading.Thread(target=flipper)
    flip.start()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    stop.set()
    flip.join()
    assert not bad


def test_opcheck_more_cases():
    q, k, v = _rand(1, 4, 7, 16), _rand(1, 2, 19, 16, seed=1), _rand(1, 2, 19, 24, seed=2)
    qn = _rand(1, 7, 4, 16).transpose(1, 2)
    cases = [
        (q, k, v, _rand(1, 1, 7, 19, seed=3), 0.25, False),  # GQA, float mask, Lk % 16 != 0
        (q[:, :, :2], k, v, None, 0.25, True),  # < 4 query rows
        (qn, k, v, torch.zeros(7, 19, dtype=torch.bool), 0.25, False),  # non-contiguous q, nothing attended
        (q.bfloat16(), k.bfloat16(), v.bfloat16(), _rand(7, 19, seed=4).bfloat16(), 0.25, False),
    ]
    for args in cases:
        torch.library.opcheck(torch.ops.fastinfer.attention, args)


def test_compile_fullgraph_dynamic_shapes():
    fn = torch.compile(lambda q, k, v: fastinfer.ops.attention(q, k, v, is_causal=True) + 1, fullgraph=True,
                       dynamic=True)  # fmt: skip
    for lq, lk in ((7, 9), (11, 13)):
        q, k, v = _rand(2, 4, lq, 16), _rand(2, 2, lk, 16, seed=1), _rand(2, 2, lk, 24, seed=2)
        assert torch.equal(fn(q, k, v), fastinfer.ops.attention(q, k, v, is_causal=True) + 1)


def test_backward_grouped_query_causal_and_fully_masked_rows():
    def grads(fn, mask, causal):
        q, k, v = _rand(2, 4, 9, 16), _rand(2, 2, 12, 16, seed=1), _rand(2, 2, 12, 8, seed=2)
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        out = fn(q, k, v, mask, causal)
        return torch.autograd.grad(out, (q, k, v), _rand(*out.shape, seed=3))

    def sdpa(q, k, v, m, c):
        return F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=m,
                                              is_causal=c)  # fmt: skip

    def ours(q, k, v, m, c):
        return attention(q, k, v, m, is_causal=c)

    mask = torch.ones(9, 12, dtype=torch.bool)
    mask[4] = False
    for m, c in ((None, True), (mask, False)):
        for a, b in zip(grads(ours, m, c), grads(sdpa, m, c)):
            assert torch.allclose(a, b, atol=1e-5)


# --------------------------------------------------------------------------------- transformers


def test_llama_grouped_query_generate_with_padding_matches_sdpa():
    transformers = pytest.importorskip("transformers")
    from fastinfer.convert.attention import enable_fast_attention

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64)  # fmt: skip
    ref = transformers.LlamaForCausalLM(cfg).eval()
    ours = transformers.LlamaForCausalLM(cfg).eval()
    ours.load_state_dict(ref.state_dict())
    enable_fast_attention(ours)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    am = torch.ones(2, 9, dtype=torch.long)
    am[0, :3] = 0  # left padding
    for dtype in (torch.float32, torch.bfloat16):
        ref.to(dtype), ours.to(dtype)
        with torch.no_grad():
            a, b = ref(ids, attention_mask=am).logits, ours(ids, attention_mask=am).logits
            tol = 1e-5 if dtype == torch.float32 else 5e-2
            assert (a - b).float().abs()[am.bool()].max().item() <= tol
            kw = dict(attention_mask=am, max_new_tokens=5, do_sample=False, pad_token_id=0)
            assert torch.equal(ref.generate(ids, **kw), ours.generate(ids, **kw))


# ---------------------------------------------------------------- defects found in review, now fixed


def test_plus_inf_score_gives_a_nan_row(isa):
    """SDPA: a score of +inf (a float mask entry of +inf, or q.k overflowing) makes its row NaN
    (inf - inf in the softmax). The reference kernel (ref/attention.cpp) handles max == -inf only:
    with max == +inf it takes exp_f32(NaN), which clamps NaN to kExpHi, and returns a finite
    weighted sum of v (or, with two +inf keys, a half-NaN row)."""
    q, k, v = _rand(1, 2, 21, 24), _rand(1, 2, 21, 24, seed=1), _rand(1, 2, 21, 24, seed=2)
    m = torch.zeros(1, 2, 21, 21)
    m[0, 0, 3, 5] = math.inf
    m[0, 1, 6, [2, 9]] = math.inf
    _check(attention(q, k, v, m), q, k, v, m)
    kk = k.clone()
    kk[0, 0, 3, 2] = math.inf  # q.k = +inf or -inf for every query row
    _check(attention(q, kk, v), q, kk, v)


@pytest.mark.parametrize("lq", [6, 1], ids=["packed", "direct"])
def test_non_finite_score_at_a_bool_masked_key_gives_nan_as_sdpa(isa, lq):
    """SDPA turns a bool mask into an additive -inf: a NaN (or +inf) score at a masked-out key
    still makes the row NaN (NaN + -inf), and the reference kernel agrees. The AVX-512 kernel
    overwrites masked scores with -inf (_mm512_mask_mov_ps in softmax_row), so the same input
    gives finite rows on avx512 and NaN rows on ref."""
    q, k, v = _rand(1, 1, lq, 8), _rand(1, 1, 6, 8, seed=1), _rand(1, 1, 6, 8, seed=2)
    k[0, 0, 5] = math.nan  # garbage in a padded slot that the mask excludes
    mask = torch.ones(lq, 6, dtype=torch.bool)
    mask[:, 5] = False
    _check(attention(q, k, v, mask), q, k, v, mask)


def test_no_keys_with_a_mask_gives_zeros(isa):
    q, k, v = _rand(1, 2, 5, 8), _rand(1, 2, 0, 8), _rand(1, 2, 0, 4)
    for mask in (torch.zeros(5, 0, dtype=torch.bool), torch.zeros(1, 1, 1, 0)):
        _check(attention(q, k, v, mask), q, k, v, mask)


def test_a_float_mask_that_requires_grad_gets_its_gradient_or_an_error():
    q, k, v = _rand(1, 2, 9, 16), _rand(1, 2, 12, 16, seed=1), _rand(1, 2, 12, 8, seed=2)
    mask = _rand(1, 2, 9, 12, seed=3).requires_grad_()
    try:
        out = attention(q, k, v, mask)
        out.backward(_rand(*out.shape, seed=4))
    except (RuntimeError, ValueError, TypeError):
        return  # refusing is acceptable; a silently missing gradient is not
    m2 = mask.detach().clone().requires_grad_()
    F.scaled_dot_product_attention(q, k, v, attn_mask=m2).backward(_rand(*out.shape, seed=4))
    assert mask.grad is not None and torch.allclose(mask.grad, m2.grad, atol=1e-6)


@pytest.mark.parametrize(
    "case",
    [
        "mask+causal",
        "1-D mask",
        "bf16 mask, fp32 q",
    ],
)
def test_backward_covers_every_input_the_forward_accepts(case):
    """The op's forward accepts these; its backward recomputes through torch's SDPA, which raises
    (mask + is_causal: SDPA's math backend, taken here for dv != d, refuses both). Either the
    forward refuses them or the backward differentiates them."""
    q, k, v = (_rand(1, 2, n, d, seed=d).requires_grad_() for n, d in ((5, 8), (7, 8), (7, 12)))
    causal = False
    if case == "mask+causal":
        mask, causal = torch.rand(5, 7, generator=torch.Generator().manual_seed(0)) > 0.3, True
        full = mask & torch.ones(5, 7, dtype=torch.bool).tril()
    elif case == "1-D mask":
        mask = torch.tensor([True, False, True, True, False, True, True])
        full = mask.expand(5, 7)
    else:
        mask = _rand(5, 7, seed=3).bfloat16()
        full = mask.float()
    try:
        out = torch.ops.fastinfer.attention(q, k, v, mask, 0.5, causal)
    except (ValueError, TypeError):
        return  # refused up front: consistent
    got = torch.autograd.grad(out.transpose(1, 2).sum(), (q, k, v))
    qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=full, scale=0.5)
    want = torch.autograd.grad(ref.sum(), (qq, kk, vv))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5)


def test_a_mask_wider_than_the_output_is_refused_up_front():
    q, k, v = _rand(1, 2, 5, 8), _rand(1, 2, 7, 8), _rand(1, 2, 7, 8)
    mask = torch.ones(3, 1, 5, 7, dtype=torch.bool)
    with pytest.raises(ValueError, match="does not broadcast"):
        attention(q.to("meta"), k.to("meta"), v.to("meta"), mask.to("meta"))


def test_tensors_on_different_devices_are_refused():
    q, k, v = _rand(1, 2, 5, 8), _rand(1, 2, 7, 8, seed=1).to("meta"), _rand(1, 2, 7, 8, seed=2).to("meta")
    with pytest.raises((RuntimeError, ValueError)):
        torch.ops.fastinfer.attention(q, k, v, None, 0.5, False)


def test_the_eager_kernel_call_refuses_non_cpu_keys_instead_of_crashing():
    r = run_python(
        """
        import torch, fastinfer
        from fastinfer.ops.attention import attention_cpu
        q = torch.randn(1, 2, 5, 8)
        k = torch.randn(1, 2, 7, 8, device="meta")
        try:
            attention_cpu(q, k, k, None, 0.5, False)
        except Exception as e:
            print("raised", type(e).__name__)
        """,
        timeout=120,
    )
    assert r.returncode == 0 and "raised" in r.stdout, (r.returncode, r.stderr[-500:])


def test_results_do_not_depend_on_the_thread_count_when_a_chunk_has_under_4_rows(isa):
    """One head, 227 query rows: with 2 threads the rows are cut into 8 chunks of 32 and the last
    (rows 224-226) is a 3-row task, which the AVX-512 kernel runs through attention_direct (another
    summation order for q.k) instead of the packed tiles those rows get with 1 thread (4 chunks of
    60)."""
    q, k, v = _rand(1, 1, 227, 64), _rand(1, 1, 64, 64, seed=1), _rand(1, 1, 64, 64, seed=2)
    torch.set_num_threads(1)
    one = attention(q, k, v)
    torch.set_num_threads(2)
    assert torch.equal(attention(q, k, v), one)


def test_transformers_glue_broadcasts_a_batch_of_one_query_as_sdpa():
    """transformers' sdpa_attention_forward lets SDPA broadcast the batch (its comment: learned
    queries with batch 1); the glue hands such calls to the kernel, which requires one batch size."""
    pytest.importorskip("transformers")
    from fastinfer.convert.attention import _sdpa, hf_attention_forward

    if not attention_native():
        pytest.skip("the glue takes torch's path on this CPU")

    class Module(torch.nn.Module):
        is_causal = False

    q, k, v = _rand(1, 2, 5, 8), _rand(3, 2, 7, 8, seed=1), _rand(3, 2, 7, 8, seed=2)
    want, _ = _sdpa()(Module(), q, k, v, None)
    got, _ = hf_attention_forward(Module(), q, k, v, None)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-6)
