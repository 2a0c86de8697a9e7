"""GPU correctness (marked `cuda`: skipped without a CUDA device). Integer results bit-exact against
the int64 reference, equal to torch._int_mm where it applies, identical across runs; Int8Linear on the
GPU equals the CPU layer bit for bit (same quantization rule, same fp32 epilogue); modules move and
re-pack; a few shapes are clean under compute-sanitizer."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

import fastinfer
from conftest import int64_ref, run_python
from fastinfer import ops
from fastinfer.nn import Int8Linear, SparseInt8Linear

pytestmark = pytest.mark.cuda

M_SWEEP = list(range(1, 18)) + [31, 127, 128, 129, 300]
NK = [(1, 1), (8, 32), (37, 130), (128, 64), (129, 65), (256, 1000), (300, 4096)]


def _i8(*shape, seed, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=g).to(device)


@pytest.mark.parametrize("n,k", NK)
@pytest.mark.parametrize("m", M_SWEEP)
def test_int8_matmul_exact(m, n, k):
    a, w = _i8(m, k, seed=m * 31 + k), _i8(n, k, seed=n * 17 + k)
    out = ops.int8_matmul(a, w)
    assert out.device.type == "cuda" and out.dtype == torch.int32
    assert torch.equal(out.cpu(), int64_ref(a.cpu(), w.cpu()))
    assert torch.equal(ops.int8_matmul(a, w), out), "two runs differ"


def test_adversarial_values_and_zero_sizes():
    for av, wv in ((-128, -128), (127, -128), (127, 127)):
        a = torch.full((40, 4096), av, dtype=torch.int8, device="cuda")
        w = torch.full((24, 4096), wv, dtype=torch.int8, device="cuda")
        assert torch.equal(ops.int8_matmul(a, w).cpu(), int64_ref(a.cpu(), w.cpu()))
    assert ops.int8_matmul(_i8(0, 64, seed=1), _i8(8, 64, seed=2)).shape == (0, 8)
    assert ops.int8_matmul(_i8(4, 64, seed=1), _i8(0, 64, seed=2)).shape == (4, 0)


@pytest.mark.parametrize("m,n,k", [(32, 64, 64), (256, 512, 1024), (4096, 1024, 512)])
def test_equals_torch_int_mm(m, n, k):
    a, w = _i8(m, k, seed=3), _i8(n, k, seed=4)
    assert torch.equal(ops.int8_matmul(a, w), torch._int_mm(a, w.T.contiguous().T))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 256), (5, 256), (16, 256), (17, 256), (3, 7, 256), (300, 256)])
def test_int8linear_gpu_equals_cpu(dtype, shape):
    torch.manual_seed(0)
    lin = nn.Linear(256, 200)
    cpu = Int8Linear.from_linear(lin)
    gpu = Int8Linear.from_linear(lin).cuda()
    assert torch.equal(gpu.weight_int8.cpu(), cpu.weight_int8)
    x = torch.randn(*shape).to(dtype)
    assert torch.equal(gpu(x.cuda()).cpu(), cpu(x))


def test_quantize_per_token_gpu_equals_cpu():
    x = torch.randn(33, 300) * torch.logspace(-30, 30, 33)[:, None]
    x[3] = 0
    x[4, 5] = float("nan")
    x[5, 0] = float("inf")
    qc, sc = ops.quantize_per_token(x)
    qg, sg = ops.quantize_per_token(x.cuda())
    assert torch.equal(qg.cpu(), qc)
    assert torch.allclose(sg.cpu(), sc, equal_nan=True, rtol=0, atol=0)  # NaN rows stay NaN


def test_module_moves_and_repacks():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    q = fastinfer.quantize(model)
    x = torch.randn(4, 128)
    ref = q(x)
    q.cuda()
    assert torch.equal(q(x.cuda()).cpu(), ref)
    q.cpu()
    assert torch.equal(q(x), ref)
    s = SparseInt8Linear.from_int8linear(q[0], "csr")
    with pytest.raises(RuntimeError, match="only '2:4' runs on CUDA"):
        s.cuda()


# ------------------------------------------------------------------------------------- 2:4 sparse


def _sparse24(n, k, seed, device="cuda"):
    w = _i8(n, k, seed=seed, device="cpu")
    g = torch.Generator().manual_seed(seed + 1)
    kk = (k + 3) // 4 * 4
    keep = torch.rand(n, kk // 4, 4, generator=g).argsort(-1)[..., :2]
    mask = torch.zeros(n, kk // 4, 4, dtype=torch.bool).scatter_(-1, keep, True).reshape(n, kk)[:, :k]
    return torch.where(mask, w, torch.zeros_like(w)).to(device)


@pytest.mark.parametrize("n,k", [(1, 4), (8, 32), (37, 130), (128, 128), (129, 200), (300, 4096)])
@pytest.mark.parametrize("m", [1, 2, 5, 16, 17, 31, 128, 129, 300])
def test_sparse24_matmul_exact(m, n, k):
    """Both 2:4 kernels (dp4a for M <= 16, mma.sp above) against the int64 reference."""
    a, w = _i8(m, k, seed=m * 7 + k), _sparse24(n, k, seed=n * 3 + k)
    packed = ops.pack_sparse(w, "2:4")
    out = ops.sparse_int8_matmul(a, packed, n)
    assert out.device.type == "cuda" and out.dtype == torch.int32
    assert torch.equal(out.cpu(), int64_ref(a.cpu(), w.cpu()))
    assert torch.equal(ops.sparse_int8_matmul(a, packed, n), out), "two runs differ"


def test_sparse24_extremes_and_empty_groups():
    for av, wv in ((-128, -128), (127, -128)):
        w = _sparse24(64, 4096, seed=5)
        w = torch.where(w != 0, torch.full_like(w, wv), w)
        w[:, :256] = 0  # whole groups empty (code 0b0100)
        for m in (3, 200):
            a = torch.full((m, 4096), av, dtype=torch.int8, device="cuda")
            got = ops.sparse_int8_matmul(a, ops.pack_sparse(w, "2:4"), 64)
            assert torch.equal(got.cpu(), int64_ref(a.cpu(), w.cpu()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 256), (16, 256), (17, 256), (3, 7, 256), (300, 256)])
def test_sparse24_layer_equals_dense_layer_and_cpu(dtype, shape):
    """SparseInt8Linear('2:4') on the GPU: bit for bit the dense Int8Linear of the same weights on
    the GPU and the 2:4 layer on the CPU (same quantization, exact sums, same fp32 epilogue)."""
    torch.manual_seed(0)
    lin = nn.Linear(256, 200)
    with torch.no_grad():
        lin.weight.mul_(_sparse24(200, 256, seed=9, device="cpu") != 0)
    cpu = SparseInt8Linear.from_linear(lin, "2:4")
    gpu = SparseInt8Linear.from_linear(lin, "2:4").cuda()
    dense = Int8Linear.from_linear(lin).cuda()
    assert gpu.format == "2:4" and gpu.sparse_weight.device.type == "cuda"
    assert torch.equal(gpu.weight_int8.cpu(), cpu.weight_int8)
    x = torch.randn(*shape).to(dtype)
    y = gpu(x.cuda())
    assert torch.equal(y, dense(x.cuda()))
    assert torch.equal(y.cpu(), cpu(x))
    gpu.cpu()
    assert torch.equal(gpu(x), cpu(x))


def test_sparse24_state_dict_is_portable():
    lin = nn.Linear(128, 64)
    with torch.no_grad():
        lin.weight.mul_(_sparse24(64, 128, seed=3, device="cpu") != 0)
    gpu = SparseInt8Linear.from_linear(lin, "2:4").cuda()
    sd = gpu.state_dict()
    assert sd["sparse_weight"].device.type == "cpu", "files hold the CPU layout"
    cpu = SparseInt8Linear(128, 64, format="2:4")
    cpu.load_state_dict(sd)
    again = SparseInt8Linear(128, 64, format="2:4").cuda()
    again.load_state_dict(sd)
    x = torch.randn(5, 128)
    assert torch.equal(again(x.cuda()).cpu(), cpu(x))
    assert again.sparse_weight.device.type == "cuda"


def test_sparse24_bad_buffers_raise():
    w = _sparse24(64, 256, seed=4)
    packed = ops.pack_sparse(w, "2:4")
    scale = torch.ones(64, device="cuda")
    x = torch.randn(3, 256, device="cuda")
    bad = packed.clone()
    meta_at = packed.numel() - 4
    bad[meta_at:] = 0  # code 0b0000: positions equal
    with pytest.raises(ValueError, match="metadata code"):
        ops.sparse_int8_linear(x, bad, scale)
    with pytest.raises(ValueError, match="bytes"):
        ops.sparse_int8_linear(x[:, :128], packed, scale)
    cpu_packed = ops.pack_sparse(w.cpu(), "2:4")
    with pytest.raises(ValueError, match="only the '2:4' format runs"):
        ops.sparse_int8_linear(x, cpu_packed.cuda(), scale)
    with pytest.raises(ValueError, match="only the '2:4' format has a kernel"):
        ops.pack_sparse(w, "csr")
    with pytest.raises(ValueError, match="more than 2 nonzeros"):
        ops.pack_sparse(torch.ones(8, 8, dtype=torch.int8, device="cuda"), "2:4")
    with pytest.raises(RuntimeError, match="fp32 sparse weights run on the CPU only"):
        ops.sparse_linear(x, cpu_packed.cuda(), None, 64)


def test_compile_fullgraph_on_gpu():
    torch._dynamo.reset()
    torch.manual_seed(2)
    q = fastinfer.quantize(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()).cuda()
    x = torch.randn(9, 64, device="cuda")
    assert torch.equal(torch.compile(q, fullgraph=True)(x), q(x))


@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="compute-sanitizer not installed")
def test_compute_sanitizer_clean():
    code = """
        import torch
        from fastinfer import ops
        for m, n, k in [(1, 8, 32), (17, 130, 65), (130, 129, 200)]:
            a = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda")
            w = torch.randint(-128, 128, (n, k), dtype=torch.int8, device="cuda")
            ops.int8_matmul(a, w)
            ops.quantize_per_token(torch.randn(m, k, device="cuda"))
            w24 = w.clone()
            w24[:, 1::2] = 0  # at most 2 nonzeros in every group of 4
            ops.sparse_int8_matmul(a, ops.pack_sparse(w24, "2:4"), n)
        torch.cuda.synchronize()
        print("ok")
    """
    res = run_python(code)  # the sanitizer wraps a fresh interpreter
    assert res.returncode == 0
    san = shutil.which("compute-sanitizer")
    import subprocess
    import sys
    import textwrap

    out = subprocess.run([san, "--error-exitcode", "3", sys.executable, "-c", textwrap.dedent(code)],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0 and "ERROR SUMMARY: 0 errors" in out.stdout + out.stderr, out.stdout[-3000:]
