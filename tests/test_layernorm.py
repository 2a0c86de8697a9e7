"""fastinfer's LayerNorm (fastinfer.ops.layer_norm, fastinfer.nn.LayerNorm, QuantConfig.layernorm):
torch's semantics within fp32 rounding, the same bits on every ISA, special rows, bad arguments,
gradients, torch.compile / export, the conversion and files."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.library import opcheck

import fastinfer
from fastinfer import ops
from fastinfer.nn import LayerNorm

from conftest import ISAS


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ln(shape, dtype=torch.float32, bias=True, affine=True, seed=0):
    ln = nn.LayerNorm(shape, elementwise_affine=affine, bias=bias)
    with torch.no_grad():
        for p in ln.parameters():
            p.copy_(torch.randn(p.shape, generator=_gen(seed + 1)))
    return ln.to(dtype)


# (normalized_shape, rows): row lengths around the 16-lane vectors and the 64 partial sums
SHAPES = [((1,), 3), ((5,), 2), ((16,), 4), ((17,), 3), ((64,), 5), ((100,), 7), ((384,), 9), ((768,), 4),
          ((1000,), 3), ((3, 7), 4)]  # fmt: skip


@pytest.mark.parametrize("shape,rows", SHAPES, ids=[f"{'x'.join(map(str, s))}-{r}" for s, r in SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_matches_torch_and_every_isa_gives_the_same_bits(shape, rows, dtype):
    ln = _ln(shape, dtype)
    x = (torch.randn(rows, *shape, generator=_gen(2)) * 3 + 1).to(dtype)
    want = torch.nn.functional.layer_norm(x.double(), shape, ln.weight.double(), ln.bias.double(), ln.eps)
    outs = {}
    for isa in ISAS:
        fastinfer.set_isa(isa)
        outs[isa] = ops.layer_norm(x, shape, ln.weight, ln.bias, ln.eps)
    fastinfer.set_isa(None)
    first = next(iter(outs.values()))
    for isa, out in outs.items():
        assert out.dtype == dtype and out.shape == x.shape
        assert torch.equal(out, first), f"{isa} differs from {next(iter(outs))}"
    # fp32: rounding of the sums only; bf16: the output's own rounding (8 bits)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    err = ((first.double() - want).abs() / (1 + want.abs())).max().item()
    assert err <= tol, err


def test_weight_and_bias_variants_and_mixed_dtypes():
    x = torch.randn(6, 40, generator=_gen(3))
    w, b = torch.randn(40, generator=_gen(4)), torch.randn(40, generator=_gen(5))
    F = torch.nn.functional.layer_norm
    cases = [(None, None), (w, None), (None, b), (w, b)]
    for ww, bb in cases:
        got = ops.layer_norm(x, [40], ww, bb)
        want = F(x, [40], ww, bb)
        assert torch.allclose(got, want, atol=2e-5, rtol=1e-5), (ww is None, bb is None)
    # bf16 input with fp32 parameters (and the reverse): computed in fp32, out in the input's dtype
    got = ops.layer_norm(x.bfloat16(), [40], w, b)
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), F(x.bfloat16().float(), [40], w, b), atol=3e-2)
    got = ops.layer_norm(x, [40], w.bfloat16(), b.bfloat16())
    assert got.dtype == torch.float32
    assert torch.allclose(got, F(x, [40], w.bfloat16().float(), b.bfloat16().float()), atol=2e-5)


def test_special_rows_empty_and_strided_inputs(isa):
    x = torch.randn(5, 33, generator=_gen(6))
    x[1, 4] = float("nan")
    x[2, 0] = float("inf")
    x[3] = 0.0  # variance 0: (x - mean) * 1/sqrt(eps) = 0, then the bias
    ln = _ln((33,))
    out = ops.layer_norm(x, [33], ln.weight, ln.bias, ln.eps)
    assert out[1].isnan().all() and out[2].isnan().all()  # a non-finite value spoils only its row
    assert torch.equal(out[3], ln.bias.detach())
    assert torch.allclose(out[[0, 4]], torch.nn.functional.layer_norm(x[[0, 4]], [33], ln.weight, ln.bias), atol=2e-5)
    assert ops.layer_norm(torch.empty(0, 33), [33], ln.weight, ln.bias).shape == (0, 33)
    # a strided view (every other row, a transposed batch) gives what its contiguous copy gives
    big = torch.randn(4, 10, 66, generator=_gen(7))
    for view in (big[:, ::2, :33], big.transpose(0, 1)[..., :33]):
        assert torch.equal(ops.layer_norm(view, [33], ln.weight, ln.bias), ops.layer_norm(view.contiguous(), [33], ln.weight, ln.bias))


def test_bad_arguments():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="does not end in normalized_shape"):
        ops.layer_norm(x, [7])
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.layer_norm(x, [8], torch.ones(7))
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        ops.layer_norm(x.double(), [8])
    with pytest.raises(TypeError, match="one dtype"):
        ops.layer_norm(x, [8], torch.ones(8), torch.zeros(8).bfloat16())
    with pytest.raises(ValueError, match="eps must be a finite float"):
        ops.layer_norm(x, [8], eps=float("inf"))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        ops.layer_norm([1.0, 2.0], [2])


def test_module_keeps_parameters_state_and_gradients():
    ln = _ln((24,))
    fast = LayerNorm.from_layernorm(ln)
    assert fast.weight is ln.weight and fast.bias is ln.bias
    assert set(fast.state_dict()) == {"weight", "bias"} and "kernel=fastinfer" in repr(fast)
    x = torch.randn(4, 24, generator=_gen(8))
    with torch.inference_mode():
        assert torch.allclose(fast(x), ln(x), atol=2e-5)
    # gradients: those of torch's LayerNorm (recorded calls take torch's op)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(4, 24, generator=_gen(9))
    fast(xa).backward(g)
    gw, gb = ln.weight.grad.clone(), ln.bias.grad.clone()
    ln.zero_grad()
    torch.nn.functional.layer_norm(xb, [24], ln.weight, ln.bias, ln.eps).backward(g)
    assert torch.allclose(xa.grad, xb.grad, atol=1e-5) and torch.allclose(gw, ln.weight.grad, atol=1e-5)
    assert torch.allclose(gb, ln.bias.grad)
    # the op's own backward (an explicit op call under autograd), against torch's
    w = ln.weight.detach().clone().requires_grad_()
    xc = x.clone().requires_grad_()
    torch.ops.fastinfer.layer_norm(xc, [24], w, None, 1e-5).backward(g)
    xd, wd = x.clone().requires_grad_(), ln.weight.detach().clone().requires_grad_()
    torch.nn.functional.layer_norm(xd, [24], wd, None, 1e-5).backward(g)
    assert torch.allclose(xc.grad, xd.grad, atol=1e-5) and torch.allclose(w.grad, wd.grad, atol=1e-5)
    with pytest.raises(TypeError, match="expects an nn.LayerNorm"):
        LayerNorm.from_layernorm(nn.Linear(2, 2))


def test_the_modules_fast_call_follows_its_parameters():
    """After a checked call the module serves plain calls without the op's checks; a parameter
    replaced, moved, or eps / shape changed makes it check again, and values written in place are
    read at each call."""
    from fastinfer.nn.norm import _FAST_NORM
    from fastinfer.ops.norm import layer_norm_native

    if not layer_norm_native():  # the module runs torch's LayerNorm there: no fast call to follow
        ln = LayerNorm.from_layernorm(_ln((32,)))
        x = torch.randn(3, 32, generator=_gen(3))
        with torch.no_grad():
            ln(x), ln(x)
        assert ln not in _FAST_NORM
        pytest.skip(f"ISA {fastinfer.info()['isa']}: the module takes torch's LayerNorm")
    ln = _ln((32,))
    fast = LayerNorm.from_layernorm(copy.deepcopy(ln))
    x = torch.randn(3, 5, 32, generator=_gen(3))
    with torch.no_grad():
        want = ops.layer_norm(x, [32], fast.weight, fast.bias, fast.eps)
        assert torch.equal(fast(x), want) and fast in _FAST_NORM
        assert torch.equal(fast(x), want)  # the fast call
        fast.weight.mul_(2)  # in place: the kernel reads the new values
        assert torch.equal(fast(x), ops.layer_norm(x, [32], fast.weight, fast.bias, fast.eps))
        fast.weight = nn.Parameter(fast.weight.detach().bfloat16())  # other tensors, another dtype
        fast.bias = nn.Parameter(torch.randn(32, generator=_gen(4)).bfloat16())
        assert torch.equal(fast(x), ops.layer_norm(x, [32], fast.weight, fast.bias, fast.eps))
        fast.eps = 0.5
        assert torch.equal(fast(x), ops.layer_norm(x, [32], fast.weight, fast.bias, 0.5))
        for odd in (x.transpose(0, 1), x[..., :16], x.bfloat16(), x[:0]):  # the checked path decides
            if odd.shape[-1] == 32:
                assert torch.equal(fast(odd), ops.layer_norm(odd, [32], fast.weight, fast.bias, 0.5))
            else:
                with pytest.raises(ValueError, match="normalized_shape"):
                    fast(odd)
    with torch.no_grad(), pytest.raises(ValueError, match="weight must have shape"):  # smaller, at the same address
        fast.weight.data = fast.weight.data[:16]
        fast(x)
    fast.weight = nn.Parameter(torch.randn(32).bfloat16())
    fast.weight.requires_grad_(True)
    y = fast(x.bfloat16())  # autograd to record: torch's op, never the fast call
    assert y.requires_grad
    with torch.no_grad():  # an ISA without the kernel set since: torch's LayerNorm, as a fresh module takes
        fast.weight.requires_grad_(False)
        fast(x.bfloat16())
        assert fast in _FAST_NORM
        previous = fastinfer.set_isa("avx2")
        try:
            xb = x.bfloat16()
            assert torch.equal(fast(xb), torch.nn.functional.layer_norm(xb, [32], fast.weight, fast.bias, fast.eps))
        finally:
            fastinfer.set_isa(previous)


@pytest.mark.parametrize("i", range(3))
def test_opcheck(i):
    ln = _ln((20,))
    samples = [
        (torch.randn(3, 20, generator=_gen(10)), [20], ln.weight.detach(), ln.bias.detach(), 1e-5),
        (torch.randn(2, 4, 20, generator=_gen(11)).bfloat16(), [4, 20], None, None, 1e-6),
        (torch.randn(5, 20, generator=_gen(12)), [20], ln.weight.detach(), None, 1e-3),
    ]
    opcheck(torch.ops.fastinfer.layer_norm.default, samples[i])


def test_compile_and_export():
    model = nn.Sequential(nn.Linear(16, 32), LayerNorm.from_layernorm(_ln((32,)))).eval()
    x = torch.randn(3, 16, generator=_gen(13))
    with torch.inference_mode():
        want = model(x)
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    assert torch.allclose(got, want, atol=1e-6)
    # parameters that ask for gradients: the graph records torch's op (the one with a backward)
    assert "aten.layer_norm" in str(torch.export.export(model, (x,)).graph)
    for p in model.parameters():  # frozen, as a served model is: fastinfer's op in the graph
        p.requires_grad_(False)
    ep = torch.export.export(model, (x,))
    assert "fastinfer.layer_norm" in str(ep.graph)
    with torch.inference_mode():
        assert torch.allclose(ep.module()(x), want, atol=1e-6)


def _bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def test_quantize_swaps_layernorms_and_files_keep_them(tmp_path):
    model = _bert()
    n = sum(type(m) is nn.LayerNorm for m in model.modules())
    ids = torch.randint(0, 120, (2, 12), generator=_gen(14))
    q = fastinfer.quantize(copy.deepcopy(model))
    assert sum(type(m) is LayerNorm for m in q.modules()) == n == 5
    assert f"LayerNorm: {n} on fastinfer's kernel" in fastinfer.conversion_report(q).summary()
    kept = fastinfer.quantize(copy.deepcopy(model), fastinfer.QuantConfig(layernorm=False))
    assert not any(type(m) is LayerNorm for m in kept.modules())
    assert "kept: QuantConfig(layernorm=False)" in fastinfer.conversion_report(kept).summary()
    with torch.inference_mode():
        a, b = q(input_ids=ids).last_hidden_state, kept(input_ids=ids).last_hidden_state
        ref = model(input_ids=ids).last_hidden_state
    # the same int8 model with either LayerNorm: both as close to fp32
    for out in (a, b):
        assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.99
    path = tmp_path / "q.safetensors"
    fastinfer.save(q, path)
    loaded = fastinfer.load(path, copy.deepcopy(model))
    assert sum(type(m) is LayerNorm for m in loaded.modules()) == n
    assert "LayerNorm: 5 on fastinfer's kernel" in fastinfer.conversion_report(loaded).summary()
    with torch.inference_mode():
        assert torch.equal(loaded(input_ids=ids).last_hidden_state, a)
    with pytest.raises(TypeError, match="QuantConfig.layernorm must be a bool"):
        fastinfer.QuantConfig(layernorm="yes")


def test_file_naming_a_layernorm_the_model_lacks(tmp_path):
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    q = fastinfer.quantize(copy.deepcopy(model))
    path = tmp_path / "m.safetensors"
    fastinfer.save(q, path)
    other = nn.Sequential(nn.Linear(8, 8), nn.Identity())
    with pytest.raises(Exception, match="have no place in the model"):  # its tensors first
        fastinfer.load(path, copy.deepcopy(other))
    with pytest.raises(Exception, match="is a LayerNorm in the file, a Identity"):
        fastinfer.load(path, other, strict=False)
