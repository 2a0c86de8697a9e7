"""The erf GELU fused into the int8 linear epilogue: the kernels (bit-identical on every ISA), the
erf approximation itself, the op (opcheck), the layers (dense and sparse) and quantize's fusion."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.library import opcheck

import fastinfer
from conftest import ISAS, assert_same
from fastinfer import QuantConfig, ops
from fastinfer._runtime import _C
from fastinfer.nn import Int8Linear, SparseInt8Linear
from fastinfer.ops.sparse import formats_for

# Measured below (test_erf_approximation_error): max |erf_f32(x) - erf(x)| over [-6, 6] is 3.73e-7,
# at x = 3.997 just inside the clamp (3.1e-7 for |x| < 3.5; Eigen states "a couple of ulp");
# asserted with a little headroom.
ERF_MAX_ABS_ERROR = 4e-7


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _weights(n: int, k: int, seed: int, bias: bool = True):
    g = _gen(seed)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scale = torch.rand(n, generator=g) * 0.02 + 1e-3
    b = torch.randn(n, generator=g) if bias else None
    return ops.pack_int8_weight(w), scale, b


def _erf_f32(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    _C.erf_f32(x.data_ptr(), out.data_ptr(), x.numel())
    return out


def _gelu_f32(y: torch.Tensor) -> torch.Tensor:
    y = y.clone().contiguous()
    _C.apply_activation(y.data_ptr(), y.numel(), 1)
    return y


SHAPES = [(1, 64, 16), (5, 37, 19), (7, 128, 33), (13, 200, 64), (3, 1, 1), (25, 96, 47)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("m,k,n", SHAPES, ids=[f"{m}x{k}x{n}" for m, k, n in SHAPES])
def test_fused_gelu_bit_identical_on_every_isa(m, k, n, bias, dtype):
    packed, scale, b = _weights(n, k, seed=m * 1000 + k * 10 + n, bias=bias)
    x = (torch.randn(m, k, generator=_gen(k)) * 3).to(dtype)
    outs = {}
    for isa in ISAS:
        fastinfer.set_isa(isa)
        outs[isa] = ops.int8_linear(x, packed, scale, b, activation="gelu")
        plain = ops.int8_linear(x, packed, scale, b)
    for isa, y in outs.items():
        assert_same(y, outs[ISAS[0]], f"{isa} vs {ISAS[0]}")
    y = outs[ISAS[0]]
    assert y.dtype == dtype and y.shape == (m, n)
    if dtype == torch.float32:
        torch.testing.assert_close(y, nn.functional.gelu(plain), atol=2e-6, rtol=1e-5)
        # and exactly the scalar helper applied to the unfused fp32 output
        assert_same(y, _gelu_f32(plain))
    else:  # fused in fp32 before the cast; the reference is rounded to bf16 before its GELU
        fp32 = ops.int8_linear(x.float(), packed, scale, b)
        assert_same(y, _gelu_f32(fp32).to(torch.bfloat16))


def test_fused_gelu_k0_nan_rows_and_leading_dims(isa):
    n = 21
    b = torch.randn(n, generator=_gen(1)) * 4
    packed = ops.pack_int8_weight(torch.zeros((n, 0), dtype=torch.int8))
    scale = torch.rand(n)
    y = ops.int8_linear(torch.randn(4, 0), packed, scale, b, activation="gelu")
    assert_same(y, _gelu_f32(b).expand(4, n).contiguous())
    torch.testing.assert_close(y, nn.functional.gelu(b).expand(4, n), atol=2e-6, rtol=1e-5)
    assert_same(ops.int8_linear(torch.randn(4, 0), packed, scale, None, activation="gelu"), torch.zeros(4, n))

    packed, scale, b = _weights(35, 70, seed=3)
    x = torch.randn(2, 3, 70, generator=_gen(2))
    x[1, 2, 5] = float("nan")
    y = ops.int8_linear(x, packed, scale, b, activation="gelu")
    assert y.shape == (2, 3, 35)
    assert torch.isnan(y[1, 2]).all()
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[1, :2]).all()


def test_gelu_large_and_special_values():
    y = torch.tensor([-1e30, -100.0, -10.0, -5.7, 0.0, -0.0, 5.7, 10.0, 100.0, 1e30, float("inf"), float("nan")])
    g = _gelu_f32(y)
    ref = nn.functional.gelu(y.double())
    finite = torch.isfinite(y)
    assert (g[finite].double() - ref[finite]).abs().max() <= 2e-6 + 1e-5 * ref[finite].abs().max()
    assert g[-2] == float("inf") and torch.isnan(g[-1])


def test_erf_approximation_error():
    x = torch.linspace(-6, 6, 2_000_001, dtype=torch.float32)
    # every float near 0 and near the clamp point, too
    x = torch.cat([x, torch.linspace(-1e-3, 1e-3, 100_001), torch.linspace(3.9, 4.1, 100_001),
                   torch.linspace(-4.1, -3.9, 100_001)])  # fmt: skip
    approx = _erf_f32(x).double()
    exact = torch.tensor([math.erf(v) for v in x.double().tolist()], dtype=torch.float64)
    err = (approx - exact).abs().max().item()
    assert err < ERF_MAX_ABS_ERROR, err
    assert (approx.abs() <= 1 + ERF_MAX_ABS_ERROR).all()  # up to 3.6e-7 above 1 just inside the clamp
    assert _erf_f32(torch.tensor([4.0, 1e30, float("inf")])).tolist() == [1.0, 1.0, 1.0]
    # odd: erf(-x) == -erf(x) exactly (odd numerator, even denominator)
    assert_same(_erf_f32(-x), -_erf_f32(x))


def test_opcheck_with_activation():
    packed, scale, b = _weights(19, 37, seed=7)
    x = torch.randn(5, 37, generator=_gen(8))
    for args in ((x, packed, scale, b, 1), (x, packed, scale, None, 1), (x.bfloat16(), packed, scale, b, 1),
                 (x, packed, scale, b, 0)):  # fmt: skip
        result = opcheck(torch.ops.fastinfer.int8_linear.default, args)
        assert set(result.values()) == {"SUCCESS"}, result
    w = torch.randint(-127, 128, (19, 37), dtype=torch.int8, generator=_gen(9))
    w[w.abs() < 60] = 0
    sparse = ops.pack_sparse(w, "csr")
    result = opcheck(torch.ops.fastinfer.sparse_int8_linear.default, (x, sparse, scale, b, 1))
    assert set(result.values()) == {"SUCCESS"}, result


def test_bad_activation_raises():
    packed, scale, b = _weights(8, 16, seed=1)
    x = torch.randn(2, 16)
    for bad in ("tanh", "GELU", "gelu-tanh", 1, True, ""):
        with pytest.raises(ValueError, match="activation"):
            ops.int8_linear(x, packed, scale, b, activation=bad)
        with pytest.raises(ValueError, match="activation"):
            Int8Linear(16, 8, activation=bad)
    with pytest.raises(ValueError, match="activation"):
        torch.ops.fastinfer.int8_linear(x, packed, scale, b, 7)
    with pytest.raises(ValueError, match="activation"):
        _C.int8_linear(x.data_ptr(), 0, 2, 16, 16, packed.data_ptr(), packed.numel(), scale.data_ptr(), 0,
                       torch.empty(2, 8).data_ptr(), 0, 8, 7, 0)  # fmt: skip  (6 gelu_tanh is the last code; no residual)
    layer = Int8Linear(16, 8)
    with pytest.raises(ValueError, match="activation"):
        layer.activation = "swish"
    with pytest.raises(TypeError, match="fuse_activations"):
        QuantConfig(fuse_activations="yes")


def test_cuda_activation_refused_clearly():
    from fastinfer.ops import cuda

    x = torch.randn(2, 16)
    packed, scale, b = _weights(8, 16, seed=1)
    with pytest.raises(RuntimeError, match="not implemented on CUDA"):
        cuda.int8_linear(x, packed, scale, b, 1)


# ------------------------------------------------------------------------------------------ layers


def test_layer_activation_repr_copy_and_state_dict():
    lin = nn.Linear(48, 24)
    plain, fused = Int8Linear.from_linear(lin), Int8Linear.from_linear(lin, activation="gelu")
    assert plain.activation is None and fused.activation == "gelu"
    assert "activation" not in repr(plain) and "activation=gelu" in repr(fused)
    x = torch.randn(6, 48)
    y = fused(x)
    assert_same(y, fused(x))  # the eager fast path runs the same kernel
    assert_same(y, ops.int8_linear(x, fused.packed_weight, fused.weight_scale, fused.bias, activation="gelu"))
    torch.testing.assert_close(y, nn.functional.gelu(plain(x)), atol=2e-6, rtol=1e-5)
    assert_same(copy.deepcopy(fused)(x), y)
    assert set(fused.state_dict()) == set(plain.state_dict())
    other = Int8Linear(48, 24, activation="gelu")
    other.load_state_dict(fused.state_dict())
    assert_same(other(x), y)
    fused.activation = None  # drops the prepared fast call
    assert_same(fused(x), plain(x))
    fused.activation = "gelu"
    assert_same(fused(x), y)


@pytest.mark.parametrize("fmt", formats_for(torch.int8))
def test_sparse_fused_gelu_equals_dense(fmt, isa):
    lin = nn.Linear(128, 80)
    with torch.no_grad():
        w = lin.weight
        if fmt == "2:4":
            w.view(80, 32, 4)[:, :, :2] = 0
        else:
            w[w.abs() < w.abs().quantile(0.7)] = 0
    dense = Int8Linear.from_linear(lin, activation="gelu")
    sparse = SparseInt8Linear.from_int8linear(dense, fmt)
    assert sparse.activation == "gelu" and "activation=gelu" in repr(sparse)
    for x in (torch.randn(1, 128), torch.randn(9, 128), torch.randn(3, 128).bfloat16()):
        assert_same(sparse(x), dense(x), fmt)
        assert_same(ops.sparse_int8_linear(x, sparse.sparse_weight, sparse.weight_scale, sparse.bias,
                                           activation="gelu"), dense(x), fmt)  # fmt: skip
    back = sparse.to_int8linear()
    assert back.activation == "gelu"
    assert_same(back(torch.ones(2, 128)), dense(torch.ones(2, 128)))


# --------------------------------------------------------------------------------------- converter


def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64)  # fmt: skip
    return transformers.BertModel(cfg).eval()


def test_quantize_fuses_bert_intermediate_gelu():
    model = _tiny_bert()
    fused = fastinfer.quantize(model)
    unfused = fastinfer.quantize(model, QuantConfig(fuse_activations=False))
    inter = [m for m in fused.modules() if type(m).__name__ == "BertIntermediate"]
    assert len(inter) == 2
    for m in inter:
        assert type(m.intermediate_act_fn) is fastinfer.nn.Fused and m.intermediate_act_fn.was == "GELUActivation"
        assert isinstance(m.dense, Int8Linear) and m.dense.activation == "gelu"
    for m in unfused.modules():
        if type(m).__name__ == "BertIntermediate":
            assert type(m.intermediate_act_fn).__name__ == "GELUActivation" and m.dense.activation is None
    # only the intermediate dense layers are fused
    acts = [m.activation for m in fused.modules() if isinstance(m, Int8Linear)]
    assert acts.count("gelu") == 2 and len(acts) > 2
    ids = torch.randint(0, 120, (3, 16), generator=_gen(0))
    with torch.no_grad():
        a = fused(input_ids=ids).last_hidden_state
        b = unfused(input_ids=ids).last_hidden_state
    assert (a - b).abs().max().item() < 1e-4
    cos = nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)
    assert cos.min().item() > 0.99999
    # the float model is untouched
    assert all(type(m.intermediate_act_fn).__name__ == "GELUActivation"
               for m in model.modules() if type(m).__name__ == "BertIntermediate")  # fmt: skip


def test_quantize_fuses_sequential_gelu_only_when_allowed():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(approximate="tanh"),
                          nn.Linear(64, 16), nn.GELU())  # fmt: skip
    q = fastinfer.quantize(model)
    assert [type(m).__name__ for m in q] == ["Int8Linear", "Fused"] * 3
    assert [q[0].activation, q[2].activation, q[4].activation] == ["gelu", "gelu_tanh", "gelu"]
    ref = fastinfer.quantize(model, QuantConfig(fuse_activations=False))
    assert [type(m).__name__ for m in ref] == ["Int8Linear", "GELU"] * 3
    x = torch.randn(5, 32)
    torch.testing.assert_close(q(x), ref(x), atol=1e-4, rtol=1e-4)

    # a skipped layer keeps its GELU; so does a layer registered under two names
    s = fastinfer.quantize(model, QuantConfig(skip=("0",)))
    assert type(s[0]) is nn.Linear and type(s[1]) is nn.GELU and type(s[5]) is fastinfer.nn.Fused
    shared = nn.Linear(32, 32)
    m2 = nn.Sequential(shared, nn.GELU(), shared, nn.GELU())
    q2 = fastinfer.quantize(m2)
    assert type(q2[1]) is nn.GELU and type(q2[3]) is nn.GELU and q2[0].activation is None and q2[0] is q2[2]
