"""torch.library integration: opcheck on every op, fake / meta shape inference, torch.compile
(fullgraph, inductor) and torch.export of quantized models."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.library import opcheck

import fastinfer
from conftest import run_python
from fastinfer import ops
from fastinfer.nn import Int8Linear


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _i8(*shape, seed=0):
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=_gen(seed))


def _layer(k, n, bias=True, seed=0):
    torch.manual_seed(seed)
    return Int8Linear.from_linear(nn.Linear(k, n, bias=bias))


def _samples():
    w1, w2, w3 = _i8(19, 37, seed=1), _i8(16, 64, seed=2), _i8(1, 1, seed=3)
    l1, l2 = _layer(37, 19), _layer(64, 16, bias=False)
    # (no NaN samples: opcheck compares eager and traced outputs with assert_close(equal_nan=False);
    # NaN rows under compile are checked in test_torch_compile_aot_eager_fullgraph_with_residual)
    x_zero = torch.randn(3, 37, generator=_gen(4))
    x_zero[1] = 0
    return {
        "int8_matmul": [
            (_i8(5, 37, seed=5), w1),
            (_i8(1, 64, seed=6), w2),
            (_i8(7, 1, seed=7), w3),
            (_i8(4, 37, seed=8).T.contiguous().T, w1.T.contiguous().T),
        ],
        "int8_matmul_packed": [
            (_i8(5, 37, seed=9), ops.pack_int8_weight(w1), 19),
            (_i8(30, 64, seed=10), ops.pack_int8_weight(w2), 16),
        ],
        "pack_int8_weight": [(w1,), (w2,), (w3,)],
        "unpack_int8_weight": [(ops.pack_int8_weight(w1), 19, 37), (ops.pack_int8_weight(w3), 1, 1)],
        "quantize_per_token": [
            (torch.randn(4, 37, generator=_gen(11)),),
            (torch.randn(2, 3, 16, generator=_gen(12)).bfloat16(),),
            (torch.randn(10, generator=_gen(13)),),
            (x_zero,),
        ],
        "int8_linear": [
            (torch.randn(3, 37, generator=_gen(14)), l1.packed_weight, l1.weight_scale, l1.bias),
            (torch.randn(2, 3, 64, generator=_gen(15)).bfloat16(), l2.packed_weight, l2.weight_scale, None),
            (torch.randn(1, 37, generator=_gen(16)), l1.packed_weight, l1.weight_scale, None),
            (x_zero, l1.packed_weight, l1.weight_scale, l1.bias),
        ],
    }


_SAMPLES = _samples()
_CASES = [(name, i) for name, args in _SAMPLES.items() for i in range(len(args))]


@pytest.mark.parametrize("op_name,i", _CASES, ids=[f"{n}-{i}" for n, i in _CASES])
def test_opcheck(op_name, i):
    op = getattr(torch.ops.fastinfer, op_name)
    result = opcheck(op, _SAMPLES[op_name][i])
    assert set(result.values()) == {"SUCCESS"}, result


def test_every_op_is_covered_by_opcheck():
    defined = {"int8_matmul", "int8_matmul_packed", "pack_int8_weight", "unpack_int8_weight",
               "quantize_per_token", "int8_linear"}  # fmt: skip
    assert defined <= set(_SAMPLES)
    for name in defined:
        assert hasattr(torch.ops.fastinfer, name)


# ------------------------------------------------------------------------------------- fake / meta


def test_meta_tensors_shape_inference():
    meta = torch.device("meta")
    a = torch.empty(6, 40, dtype=torch.int8, device=meta)
    w = torch.empty(19, 40, dtype=torch.int8, device=meta)
    out = ops.int8_matmul(a, w)
    assert out.device.type == "meta" and out.shape == (6, 19) and out.dtype == torch.int32
    packed = ops.pack_int8_weight(w)
    assert packed.device.type == "meta" and packed.shape == (ops.packed_nbytes(19, 40),)
    assert packed.dtype == torch.uint8
    out = ops.int8_matmul_packed(a, packed, 19)
    assert out.shape == (6, 19) and out.dtype == torch.int32
    x = torch.empty(2, 3, 40, dtype=torch.bfloat16, device=meta)
    q, s = ops.quantize_per_token(x)
    assert q.shape == (2, 3, 40) and q.dtype == torch.int8 and q.device.type == "meta"
    assert s.shape == (2, 3) and s.dtype == torch.float32
    y = ops.int8_linear(x, packed, torch.empty(19, device=meta), torch.empty(19, device=meta))
    assert y.shape == (2, 3, 19) and y.dtype == torch.bfloat16 and y.device.type == "meta"
    w_back = torch.ops.fastinfer.unpack_int8_weight(packed, 19, 40)
    assert w_back.shape == (19, 40) and w_back.dtype == torch.int8


def test_meta_tensors_validate_like_cpu():
    meta = torch.device("meta")
    with pytest.raises(TypeError, match="int8"):
        ops.int8_matmul(torch.empty(2, 3, device=meta), torch.empty(4, 3, dtype=torch.int8, device=meta))
    with pytest.raises(ValueError, match="2-D"):
        ops.pack_int8_weight(torch.empty(3, dtype=torch.int8, device=meta))
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        ops.quantize_per_token(torch.empty(2, 3, dtype=torch.float16, device=meta))
    with pytest.raises(Exception, match="K"):
        ops.int8_matmul(torch.empty(2, 3, dtype=torch.int8, device=meta), torch.empty(4, 5, dtype=torch.int8, device=meta))


def test_int8linear_on_meta_device():
    with torch.device("meta"):
        layer = Int8Linear(64, 32)
    assert layer.packed_weight.device.type == "meta"
    out = layer(torch.empty(5, 7, 64, device="meta"))
    assert out.shape == (5, 7, 32) and out.device.type == "meta"
    moved = _layer(64, 32).to("meta")
    assert moved(torch.empty(3, 64, device="meta", dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_fake_tensor_mode():
    with FakeTensorMode():
        a = torch.empty(8, 100, dtype=torch.int8)
        w = torch.empty(30, 100, dtype=torch.int8)
        assert ops.int8_matmul(a, w).shape == (8, 30)
        packed = ops.pack_int8_weight(w)
        assert packed.shape == (ops.packed_nbytes(30, 100),)
        x = torch.empty(4, 100)
        assert ops.int8_linear(x, packed, torch.empty(30), None).shape == (4, 30)
        q, s = ops.quantize_per_token(x)
        assert q.shape == (4, 100) and s.shape == (4,)


@pytest.mark.parametrize(
    "code",
    [
        """
        import torch
        from fastinfer import ops
        p = ops.pack_int8_weight(torch.empty(4, 8, dtype=torch.int8, device="meta"))
        w = ops.unpack_int8_weight(p, 4, 8)
        assert w.shape == (4, 8) and w.device.type == "meta", w
        try:
            ops.unpack_int8_weight(p)  # no header to read: must say so, not dereference null
        except ValueError as e:
            assert "pass the weight shape" in str(e), e
        else:
            raise AssertionError("no error")
        print("ok")
        """,
        """
        import torch
        from fastinfer.nn import Int8Linear
        with torch.device("meta"):
            layer = Int8Linear(8, 4)
        assert layer.weight_int8.shape == (4, 8)
        assert layer.dequantized_weight().shape == (4, 8)
        print("ok")
        """,
        """
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode
        from fastinfer import ops
        with FakeTensorMode():
            p = ops.pack_int8_weight(torch.empty(4, 8, dtype=torch.int8))
            assert ops.unpack_int8_weight(p, 4, 8).shape == (4, 8)
            try:
                ops.unpack_int8_weight(p)
            except ValueError as e:
                assert "pass the weight shape" in str(e), e
            else:
                raise AssertionError("no error")
        print("ok")
        """,
    ],
    ids=["unpack_meta", "int8linear_meta_weight_int8", "unpack_fake_mode"],
)
def test_unpack_without_data_does_not_crash(code):
    """Public entry points that read a packed header must not dereference a meta/fake tensor's
    (null) data pointer. Run in a subprocess: a segfault here would kill the test session."""
    res = run_python(code, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, (
        f"exit code {res.returncode} (negative = killed by signal)\n{res.stderr[-2000:]}"
    )


# --------------------------------------------------------------------------------- compile & export


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 10)).eval()
    return fastinfer.quantize(model)


def test_torch_compile_inductor_fullgraph():
    torch._dynamo.reset()
    qm = _mlp()
    compiled = torch.compile(qm, fullgraph=True)
    inputs = [
        torch.randn(8, 64, generator=_gen(20)),
        torch.randn(5, 64, generator=_gen(21)),  # new batch size (dynamic recompile)
        torch.randn(2, 3, 64, generator=_gen(22)),  # leading dims
        torch.randn(7, 64, generator=_gen(23)),
    ]
    with torch.no_grad():
        for x in inputs:
            assert torch.equal(compiled(x), qm(x)), tuple(x.shape)
        xb = torch.randn(4, 64, generator=_gen(24)).bfloat16()
        out = compiled(xb)
        assert out.dtype == torch.bfloat16
        assert torch.equal(out, qm(xb))


def test_torch_compile_aot_eager_fullgraph_with_residual():
    torch._dynamo.reset()

    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(32, 32)
            self.b = nn.Linear(32, 32)

        def forward(self, x):
            return x + self.b(torch.relu(self.a(x)))

    torch.manual_seed(1)
    qm = fastinfer.quantize(Res().eval())
    compiled = torch.compile(qm, fullgraph=True, backend="aot_eager", dynamic=True)
    for m in (1, 6, 33):
        x = torch.randn(m, 32, generator=_gen(m))
        assert torch.equal(compiled(x), qm(x))
    x = torch.randn(4, 32, generator=_gen(40))
    x[2, 7] = float("nan")
    out = compiled(x)
    assert torch.isnan(out[2]).all() and torch.isfinite(out[[0, 1, 3]]).all()
    assert torch.equal(out[[0, 1, 3]], qm(x)[[0, 1, 3]])


def test_torch_export():
    qm = _mlp()
    x = torch.randn(8, 64, generator=_gen(25))
    batch = torch.export.Dim("batch", min=1, max=1024)
    ep = torch.export.export(qm, (x,), dynamic_shapes=({0: batch},))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.fastinfer.int8_linear.default) == 3
    for m in (8, 3, 17):
        xm = torch.randn(m, 64, generator=_gen(m))
        assert torch.equal(ep.module()(xm), qm(xm))
