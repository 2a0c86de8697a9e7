"""The CUDA build, checked without a GPU: where nvcc exists the wheel has fastinfer._C_cuda, and its
SASS really uses the tensor cores (IMMA), ldmatrix (LDSM), cp.async (LDGSTS) and dp4a (IDP.4A) on both
sm_80 and sm_90a, the 2:4 kernel the sparse tensor cores (IMMA.SP), with PTX for later GPUs and no
register spills. Needs cuobjdump (PyPI:
nvidia-cuda-cuobjdump; .ci/run installs it)."""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sysconfig

import pytest

import fastinfer


def _tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    hits = glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "*", "bin", name))
    return hits[0] if hits else None


def _cuda_module_path() -> str | None:
    try:
        from fastinfer import _C_cuda
    except ImportError:
        return None
    return _C_cuda.__file__


def test_cuda_backend_built_where_nvcc_exists():
    built = fastinfer.info()["cuda"]["built"]
    if shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc"):
        assert built and _cuda_module_path(), "nvcc is installed but the wheel has no fastinfer._C_cuda"
    else:
        pytest.skip(f"no nvcc here (CUDA backend built: {built})")


@pytest.fixture(scope="module")
def cubin():
    path = _cuda_module_path()
    if path is None:
        pytest.skip("fastinfer._C_cuda is not built")
    tool = _tool("cuobjdump")
    if tool is None:
        pytest.skip("cuobjdump not installed (pip install nvidia-cuda-cuobjdump)")
    return tool, path


def _run(tool, *args):
    return subprocess.run([tool, *args], capture_output=True, text=True, check=True, timeout=120).stdout


def _kernel_sass(cubin, arch: str, *names: str) -> list[str]:
    """The SASS of each named kernel for one architecture."""
    tool, path = cubin
    kernels = re.split(r"\n\s*Function : ", _run(tool, "--dump-sass", "--gpu-architecture", arch, path))
    return [next(k for k in kernels if name in k.split("\n", 1)[0]) for name in names]


def test_archs_and_ptx(cubin):
    tool, path = cubin
    elves = _run(tool, "--list-elf", path)
    assert "sm_80" in elves and "sm_90a" in elves, elves
    assert "sm_80.ptx" in _run(tool, "--list-ptx", path)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_sass_uses_tensor_cores_ldmatrix_cp_async_dp4a(cubin, arch, record_property):
    gemm, gemv = _kernel_sass(cubin, arch, "gemm_i8_kernel", "gemv_i8_kernel")
    counts = {op: len(re.findall(op, gemm)) for op in (r"IMMA\.16832\.S8\.S8", r"LDSM\.16\.M88\.4", r"LDGSTS")}
    record_property(f"{arch}_gemm_sass_counts", counts)
    # 2 k32 steps x (4 m16 x 4 n8) mma per 64-deep tile; 4 A + 2 B ldmatrix.x4 per step
    assert counts[r"IMMA\.16832\.S8\.S8"] == 32, counts
    assert counts[r"LDSM\.16\.M88\.4"] == 12, counts
    assert counts[r"LDGSTS"] >= 4, counts
    assert "IDP.4A.S8.S8" in gemv


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_sass_of_the_2_4_kernels(cubin, arch, record_property):
    gemm, gemv = _kernel_sass(cubin, arch, "gemm_sp24_kernel", "gemv_sp24_kernel")
    counts = {op: len(re.findall(op, gemm)) for op in (r"IMMA\.SP\.16864\.S8\.S8", r"LDSM\.16\.M88\.4", r"LDGSTS")}
    record_property(f"{arch}_sp24_sass_counts", counts)
    # 2 k64 steps x (4 m16 x 4 n8) sparse mma per 128-deep stage; 4 A + 4 B ldmatrix.x4 per step
    assert counts[r"IMMA\.SP\.16864\.S8\.S8"] == 32, counts
    assert counts[r"LDSM\.16\.M88\.4"] == 16, counts
    assert counts[r"LDGSTS"] >= 7, counts  # 2 kept-value, 4 x and 1 metadata copies per stage
    assert len(re.findall(r"IDP\.4A\.S8\.S8", gemv)) == 16 * 8, "8 dp4a per token row, unrolled over 16 rows"
    assert len(re.findall(r"PRMT", gemv)) >= 8, "the 8 groups widened with byte_perm"


def test_no_register_spills(cubin, record_property):
    tool, path = cubin
    usage = _run(tool, "--dump-resource-usage", path)
    rows = re.findall(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    assert len(rows) >= 10, usage  # 5 kernels x 2 architectures
    report = {}
    for name, reg, stack, shared, local in rows:
        kernel = re.search(r"(gemm_i8_kernel|gemv_i8_kernel|gemm_sp24_kernel|gemv_sp24_kernel|quantize_rows_kernel)", name).group(1)
        report.setdefault(kernel, []).append({"regs": int(reg), "local": int(local), "shared": int(shared)})
        assert int(local) == 0 and int(stack) == 0, f"{kernel} spills: {reg} regs, local {local}, stack {stack}"
    record_property("resource_usage", report)
    print(report)
