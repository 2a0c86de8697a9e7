"""torch.export of converted models: the exported program holds no packing step (the kernel layouts
are constants), saves to a .pt2 file, and loads and runs bit-identically in a fresh interpreter
once fastinfer is imported (its ops register at import; torch.export.load without that import
fails naming the fastinfer op). AOTInductor packages run the same (slow: a C++ compile)."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import fastinfer
from conftest import run_python
from fastinfer.nn import SparseInt8Linear


def _model() -> nn.Module:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(8).eval()
    bn.running_mean.uniform_(-0.5, 0.5)
    float_model = nn.Sequential(nn.Conv2d(3, 8, 3), bn, nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8), nn.Flatten(),
                                nn.Linear(8 * 4 * 4, 32), nn.GELU(), nn.Linear(32, 10)).eval()  # fmt: skip
    q = fastinfer.quantize(float_model)
    w = q[7].weight_int8.clone()
    w[:, ::2] = 0
    q[7].set_weight(w, q[7].weight_scale.clone())
    q[7] = SparseInt8Linear.from_int8linear(q[7], "csr")
    return q


def _ops(ep) -> list:
    return [n.target for n in ep.graph.nodes if n.op == "call_function"]


def test_exported_program_has_no_packing_and_matches():
    q = _model()  # never run eagerly before export
    x = torch.randn(2, 3, 8, 8)
    ep = torch.export.export(q, (x,))
    names = [str(t) for t in _ops(ep)]
    assert not any("pack" in n for n in names), names  # the layouts are constants of the program
    assert {"fastinfer.int8_conv2d.default", "fastinfer.depthwise_conv2d.default", "fastinfer.int8_linear.default",
            "fastinfer.sparse_int8_linear.default"} <= set(names)  # fmt: skip
    assert torch.equal(ep.module()(x), q(x))


def test_pt2_file_loads_in_a_fresh_interpreter_after_import_fastinfer(tmp_path):
    q = _model()
    x = torch.randn(2, 3, 8, 8)
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(q, (x,), dynamic_shapes=({0: batch},))
    torch.export.save(ep, str(tmp_path / "m.pt2"))
    xs = torch.randn(5, 3, 8, 8)
    save_file({"x": xs, "y": q(xs)}, str(tmp_path / "expected.safetensors"))
    code = f"""
        import torch
        from safetensors.torch import load_file
        IMPORT
        exp = load_file({str(tmp_path / 'expected.safetensors')!r})
        try:
            ep = torch.export.load({str(tmp_path / 'm.pt2')!r})
        except Exception as e:
            print("FAILED:", type(e).__name__)
            raise SystemExit(0)
        print("same" if torch.equal(ep.module()(exp["x"]), exp["y"]) else "DIFFERENT")
    """
    r = run_python(code.replace("IMPORT", "import fastinfer"))
    assert r.returncode == 0 and r.stdout.strip() == "same", (r.stdout, r.stderr[-2000:])
    r = run_python(code.replace("IMPORT", "pass"))  # without the import: torch names the missing op
    assert r.stdout.strip() == "FAILED: RuntimeError", (r.stdout, r.stderr[-2000:])
    assert "failed to resolve torch.ops.fastinfer." in r.stderr and "register it before deserializing" in r.stderr


@pytest.mark.slow
def test_aot_inductor_package_runs_the_same(tmp_path):
    q = _model()
    x = torch.randn(2, 3, 8, 8)
    ep = torch.export.export(q, (x,))
    path = torch._inductor.aoti_compile_and_package(ep, package_path=os.fspath(tmp_path / "m_aoti.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    assert torch.equal(runner(x), q(x))
