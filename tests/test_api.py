"""Public API surface: info(), ISA selection (set_isa, FASTINFER_ISA), thread control, and input
validation everywhere: bad inputs raise TypeError / ValueError / RuntimeError with a readable
message, and never crash the interpreter."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from torch import nn

import fastinfer
from conftest import ALL_ISA_NAMES, ISAS, SUBPROCESS_CWD, UNDER_SANITIZER, int64_ref, run_python, spawn_python
from fastinfer import _C, ops
from fastinfer.nn import Int8Linear


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------ info()


def test_info_keys_and_values():
    info = fastinfer.info()
    for key in ("version", "isa_detected", "isa", "isa_available", "cuda", "num_threads"):
        assert key in info, key
    assert info["version"] == fastinfer.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", info["version"])
    assert info["isa_detected"] in ALL_ISA_NAMES
    assert info["isa"] in info["isa_available"]
    assert info["isa_available"] == fastinfer.available_isas()
    assert info["isa_available"] == list(ALL_ISA_NAMES[: len(info["isa_available"])])  # a prefix, lowest first
    assert info["isa_available"][-1] == info["isa_detected"]
    assert isinstance(info["num_threads"], int) and info["num_threads"] >= 1
    assert isinstance(info["cuda"], dict) and "available" in info["cuda"]
    if not torch.cuda.is_available():
        assert info["cuda"]["available"] is False


def test_package_version_matches_metadata():
    from importlib.metadata import version

    assert fastinfer.__version__ == version("fastinfer")


def test_detected_isa_consistent_with_cpu_flags():
    """The detected ISA is the highest one whose features the CPU reports (both ways: no ISA the
    CPU lacks, none it has left out). AMX is reported in the flags, but this build has no AMX
    kernels, so an AMX CPU runs avx512_vnni."""
    info = fastinfer.info()
    flags = info["cpu_flags"]
    vnni = ("avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni")
    expect = "avx512_vnni" if all(flags[f] for f in vnni) else "avx2" if flags["avx2"] else "ref"
    assert info["isa_detected"] == expect, flags


def test_isa_names_match_the_engine():
    """_runtime.ISA_NAMES (the one list in Python) names the engine's ISA codes as the engine does."""
    assert [_C.isa_name(i) for i in range(len(ALL_ISA_NAMES))] == list(ALL_ISA_NAMES)


def test_public_names():
    for name in ("QuantConfig", "available_isas", "info", "nn", "ops", "quantize", "set_isa", "set_num_threads",
                 "prune", "sparsify", "SparseRule", "sparsity_report", "LayerSparsity"):
        assert hasattr(fastinfer, name), name
        assert name in fastinfer.__all__


# ----------------------------------------------------------------------------------------- set_isa


def test_set_isa_returns_previous_and_lowers():
    detected = fastinfer.info()["isa_detected"]
    fastinfer.set_isa(None)
    assert fastinfer.info()["isa"] == detected
    prev = fastinfer.set_isa("ref")
    assert prev == detected
    assert fastinfer.info()["isa"] == "ref"
    assert fastinfer.set_isa(ISAS[-1]) == "ref"
    assert fastinfer.info()["isa"] == ISAS[-1]
    for name in ISAS:
        fastinfer.set_isa(name)
        assert fastinfer.info()["isa"] == name
        assert f"kernel={name}" in repr(Int8Linear(4, 4))
    assert fastinfer.set_isa(None) == ISAS[-1]
    assert fastinfer.info()["isa"] == detected
    assert fastinfer.info()["isa_detected"] == detected  # lowering never changes what was detected


@pytest.mark.parametrize("bad", ["bogus", "AVX2", "avx512", "", " ref", "sse4"])
def test_set_isa_unknown_name(bad):
    before = fastinfer.info()["isa"]
    with pytest.raises(ValueError) as exc:
        fastinfer.set_isa(bad)
    msg = str(exc.value)
    assert repr(bad) in msg
    for name in ALL_ISA_NAMES:
        assert name in msg, f"the message should list the valid names: {msg}"
    assert fastinfer.info()["isa"] == before


@pytest.mark.parametrize("bad", [1, 0, 2.0, b"ref", ["ref"], True])
def test_set_isa_non_string(bad):
    before = fastinfer.info()["isa"]
    with pytest.raises(ValueError, match="valid names"):
        fastinfer.set_isa(bad)
    assert fastinfer.info()["isa"] == before


def test_set_isa_unsupported_on_this_cpu():
    unsupported = [n for n in ALL_ISA_NAMES if n not in ISAS]
    if not unsupported:
        pytest.skip("this CPU supports every ISA")
    for name in unsupported:
        before = fastinfer.info()["isa"]
        with pytest.raises(ValueError) as exc:
            fastinfer.set_isa(name)
        msg = str(exc.value)
        assert name in msg and "not supported" in msg
        for ok in ISAS:
            assert ok in msg
        assert fastinfer.info()["isa"] == before


def test_set_isa_changes_the_kernel_actually_used():
    """The ISA switch must reach the kernels: exact results everywhere, and the active name is
    reported by info() and extra_repr for each choice."""
    g = _gen(1)
    a = torch.randint(-128, 128, (9, 77), dtype=torch.int8, generator=g)
    w = torch.randint(-128, 128, (21, 77), dtype=torch.int8, generator=g)
    for name in ISAS:
        fastinfer.set_isa(name)
        assert torch.equal(ops.int8_matmul(a, w), int64_ref(a, w))


def test_subprocesses_import_the_compiled_package():
    """The helpers' fresh interpreters find the installed package with its compiled module, whatever
    the directory pytest was started from (a `python -c` in the repo root imported the source tree)."""
    res = run_python("import os, fastinfer, fastinfer._C as c; print(os.getcwd()); print(c.__file__)")
    assert res.returncode == 0, res.stderr[-1500:]
    cwd, so = res.stdout.split()
    assert os.path.samefile(cwd, SUBPROCESS_CWD) and os.path.isfile(so)


def test_fastinfer_isa_environment_variable():
    """FASTINFER_ISA applies at import; invalid or unsupported values raise ValueError on import.
    (All interpreters start at once: each import of torch takes a few seconds.)"""
    detected = fastinfer.info()["isa_detected"]
    code = "import fastinfer; i = fastinfer.info(); print(i['isa'], i['isa_detected'])"
    cases = {"ref": "ref", " avx2 ": "avx2", detected: detected, "": detected}
    cases = {k: v for k, v in cases.items() if v in ISAS}
    bad = ["bogus", "AVX2"] + [n for n in ALL_ISA_NAMES if n not in ISAS][:1]
    procs = {("ok", k): spawn_python(code, {"FASTINFER_ISA": k}) for k in cases}
    procs.update({("bad", k): spawn_python(code, {"FASTINFER_ISA": k}) for k in bad})
    results = {key: (p.communicate(timeout=300), p.returncode) for key, p in procs.items()}
    for value, expected in cases.items():
        (out, err), rc = results[("ok", value)]
        assert rc == 0, f"FASTINFER_ISA={value!r}: {err[-1500:]}"
        assert out.split() == [expected, detected], f"FASTINFER_ISA={value!r}: {out}"
    for value in bad:
        (out, err), rc = results[("bad", value)]
        assert rc != 0, f"FASTINFER_ISA={value!r} was accepted: {out}"
        assert rc > 0, f"FASTINFER_ISA={value!r} crashed the interpreter (signal {-rc})"
        assert "ValueError" in err and "FASTINFER_ISA" in err, err[-1500:]
        assert value.strip() in err


# ---------------------------------------------------------------------------------------- threads


def test_set_num_threads():
    fastinfer.set_num_threads(1)
    assert fastinfer.info()["num_threads"] == 1
    fastinfer.set_num_threads(3)
    assert fastinfer.info()["num_threads"] == 3
    fastinfer.set_num_threads(None)
    assert fastinfer.info()["num_threads"] == torch.get_num_threads()


def test_num_threads_follows_torch_until_pinned():
    fastinfer.set_num_threads(None)
    torch.set_num_threads(1)
    assert fastinfer.info()["num_threads"] == 1
    torch.set_num_threads(2)
    assert fastinfer.info()["num_threads"] == 2
    fastinfer.set_num_threads(4)
    torch.set_num_threads(1)
    assert fastinfer.info()["num_threads"] == 4


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True, False, [2]])
def test_set_num_threads_rejects_bad_values(bad):
    before = fastinfer.info()["num_threads"]
    with pytest.raises(ValueError, match="positive int or None"):
        fastinfer.set_num_threads(bad)
    assert fastinfer.info()["num_threads"] == before


def test_many_threads_give_exact_results():
    g = _gen(2)
    a = torch.randint(-128, 128, (130, 200), dtype=torch.int8, generator=g)
    w = torch.randint(-128, 128, (300, 200), dtype=torch.int8, generator=g)
    for n in (1, 2, 5, 16):
        fastinfer.set_num_threads(n)
        assert torch.equal(ops.int8_matmul(a, w), int64_ref(a, w)), n


def test_one_openmp_runtime_shared_with_torch():
    """After `import fastinfer` the process holds exactly one OpenMP runtime, torch's own (checked in
    /proc/self/maps of a fresh interpreter): our kernels and torch's ops share one team of threads."""
    code = """
        import json, fastinfer, torch
        torch.randn(256, 256) @ torch.randn(256, 256)
        fastinfer.ops.int8_matmul(torch.ones(64, 64, dtype=torch.int8), torch.ones(64, 64, dtype=torch.int8))
        maps = [l.split()[-1] for l in open("/proc/self/maps") if "/" in l]
        omp = sorted({p for p in maps if p.rsplit("/", 1)[-1].startswith(("libgomp", "libiomp", "libomp"))})
        print(json.dumps({"maps": omp, "info": fastinfer.info()["openmp"]}))
    """
    res = run_python(code)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout)
    assert len(got["maps"]) == 1, f"more than one OpenMP runtime mapped: {got['maps']}"
    assert "torch" in got["maps"][0], got  # torch's own copy, not a second one from the system
    assert got["info"]["shared_with_torch"] and os.path.samefile(got["info"]["library"], got["maps"][0]), got


def test_works_after_fork():
    """A forked child (DataLoader worker style) inherits the parent's OpenMP team objects but not
    their threads (libgomp would wait for them for ever): kernels must still run there, repeatedly,
    on one thread, without hanging, and give exact results; the parent keeps its threads.
    The child kills itself with SIGALRM after 15 s so that a hang fails the test without leaving
    an orphan process behind."""
    code = """
        import os, signal, sys, torch, fastinfer
        from fastinfer import ops
        fastinfer.set_num_threads(2)
        a = torch.randint(-128, 128, (64, 256), dtype=torch.int8)
        w = torch.randint(-128, 128, (128, 256), dtype=torch.int8)
        ref = (a.long() @ w.long().T).int()
        assert torch.equal(ops.int8_matmul(a, w), ref)          # starts the pool in the parent
        pid = os.fork()
        if pid == 0:
            signal.alarm(15)
            ok = all(torch.equal(ops.int8_matmul(a, w), ref) for _ in range(5))
            info = fastinfer.info()
            ok = ok and info["num_threads"] == 1 and info["openmp"]["forked_child"]
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        assert torch.equal(ops.int8_matmul(a, w), ref)
        info = fastinfer.info()
        assert info["num_threads"] == 2 and not info["openmp"]["forked_child"], info
        print("child", os.waitstatus_to_exitcode(status))
    """
    res = run_python(code, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    status = res.stdout.strip()
    assert status == "child 0", f"{status} (-14 = the child hung and was killed by SIGALRM)"


def test_no_flush_to_zero_leaks_into_torch():
    """The kernels must not leave FTZ/DAZ set on the calling thread (it would change torch's own
    results on subnormals)."""
    tiny = torch.tensor([1e-40, -3e-41])
    assert (tiny != 0).all()
    x = torch.randn(64, 256, generator=_gen(3))
    ops.quantize_per_token(x)
    Int8Linear.from_linear(nn.Linear(256, 64))(x)
    assert (tiny * 1.0 != 0).all()
    assert (torch.tensor([1e-40]) + 0.0 != 0).all()


# ------------------------------------------------------------------------------------- bad inputs


_I8 = torch.zeros(3, 8, dtype=torch.int8)
_W8 = torch.zeros(4, 8, dtype=torch.int8)
_PACKED = ops.pack_int8_weight(_W8)
_F32 = torch.zeros(3, 8)
_SCALE = torch.ones(4)

BAD_CALLS = [
    # int8_matmul
    ("mm a float", lambda: ops.int8_matmul(_F32, _W8), TypeError, "a must be int8"),
    ("mm w float", lambda: ops.int8_matmul(_I8, _W8.float()), TypeError, "w must be int8"),
    ("mm a uint8", lambda: ops.int8_matmul(_I8.to(torch.uint8), _W8), TypeError, "int8"),
    ("mm a int32", lambda: ops.int8_matmul(_I8.int(), _W8), TypeError, "int8"),
    ("mm a bool", lambda: ops.int8_matmul(_I8.bool(), _W8), TypeError, "int8"),
    ("mm a 1-D", lambda: ops.int8_matmul(_I8[0], _W8), ValueError, "2-D"),
    ("mm a 3-D", lambda: ops.int8_matmul(_I8[None], _W8), ValueError, "2-D"),
    ("mm a 0-D", lambda: ops.int8_matmul(_I8[0, 0], _W8), ValueError, "2-D"),
    ("mm w 3-D", lambda: ops.int8_matmul(_I8, _W8[None]), ValueError, "2-D"),
    ("mm K mismatch", lambda: ops.int8_matmul(_I8, _W8[:, :7]), ValueError, "K must match"),
    ("mm a list", lambda: ops.int8_matmul([[1, 2]], _W8), TypeError, "torch.Tensor"),
    ("mm w None", lambda: ops.int8_matmul(_I8, None), TypeError, "torch.Tensor"),
    ("mm a numpy", lambda: ops.int8_matmul(_I8.numpy(), _W8), TypeError, "torch.Tensor"),
    # int8_matmul_packed
    ("mmp wrong n", lambda: ops.int8_matmul_packed(_I8, _PACKED, 5), ValueError, "N=4"),
    ("mmp negative n", lambda: ops.int8_matmul_packed(_I8, _PACKED, -1), ValueError, "N=4"),
    ("mmp K mismatch", lambda: ops.int8_matmul_packed(_I8[:, :7], _PACKED, 4), ValueError, "K=7"),
    ("mmp packed int8", lambda: ops.int8_matmul_packed(_I8, _PACKED.view(torch.int8), 4), TypeError, "uint8"),
    ("mmp packed 2-D", lambda: ops.int8_matmul_packed(_I8, _PACKED[None], 4), TypeError, "1-D uint8"),
    ("mmp packed strided", lambda: ops.int8_matmul_packed(_I8, torch.cat([_PACKED, _PACKED])[::2], 4), ValueError, "contiguous|packed weight"),
    ("mmp packed random", lambda: ops.int8_matmul_packed(_I8, torch.randint(0, 256, (_PACKED.numel(),), dtype=torch.uint8), 4), ValueError, "packed weight"),
    ("mmp raw weights", lambda: ops.int8_matmul_packed(_I8, _W8.view(torch.uint8).flatten(), 4), ValueError, "packed weight"),
    ("mmp a float", lambda: ops.int8_matmul_packed(_F32, _PACKED, 4), TypeError, "int8"),
    ("mmp packed list", lambda: ops.int8_matmul_packed(_I8, [0] * 100, 4), TypeError, "torch.Tensor"),
    # pack / unpack
    ("pack float", lambda: ops.pack_int8_weight(_W8.float()), TypeError, "int8"),
    ("pack 1-D", lambda: ops.pack_int8_weight(_W8[0]), ValueError, "2-D"),
    ("pack 3-D", lambda: ops.pack_int8_weight(_W8[None]), ValueError, "2-D"),
    ("pack None", lambda: ops.pack_int8_weight(None), TypeError, "torch.Tensor"),
    ("unpack int8", lambda: ops.unpack_int8_weight(_PACKED.view(torch.int8)), TypeError, "uint8"),
    ("unpack 2-D", lambda: ops.unpack_int8_weight(_PACKED[None]), TypeError, "1-D"),
    ("unpack empty", lambda: ops.unpack_int8_weight(torch.empty(0, dtype=torch.uint8)), ValueError, "too small"),
    ("unpack zeros", lambda: ops.unpack_int8_weight(torch.zeros(200, dtype=torch.uint8)), ValueError, "magic"),
    ("unpack str", lambda: ops.unpack_int8_weight("packed"), TypeError, "torch.Tensor"),
    ("packed_nbytes negative", lambda: fastinfer._C.packed_nbytes(-1, 4), ValueError, "negative"),
    # quantize_per_token
    ("qpt int8", lambda: ops.quantize_per_token(_I8), TypeError, "float32 or bfloat16"),
    ("qpt float16", lambda: ops.quantize_per_token(_F32.half()), TypeError, "float32 or bfloat16"),
    ("qpt float64", lambda: ops.quantize_per_token(_F32.double()), TypeError, "float32 or bfloat16"),
    ("qpt 0-D", lambda: ops.quantize_per_token(torch.tensor(1.0)), ValueError, "at least 1 dimension"),
    ("qpt list", lambda: ops.quantize_per_token([1.0, 2.0]), TypeError, "torch.Tensor"),
    # int8_linear
    ("lin x int8", lambda: ops.int8_linear(_I8, _PACKED, _SCALE), TypeError, "float32 or bfloat16"),
    ("lin x float64", lambda: ops.int8_linear(_F32.double(), _PACKED, _SCALE), TypeError, "float32 or bfloat16"),
    ("lin K mismatch", lambda: ops.int8_linear(_F32[:, :7], _PACKED, _SCALE), ValueError, "K=7"),
    ("lin N mismatch", lambda: ops.int8_linear(_F32, _PACKED, torch.ones(5)), ValueError, "packed weight is"),
    ("lin scale int", lambda: ops.int8_linear(_F32, _PACKED, _SCALE.int()), TypeError, "w_scale"),
    ("lin scale 0-D", lambda: ops.int8_linear(_F32, _PACKED, torch.tensor(1.0)), TypeError, "w_scale"),
    ("lin bias shape", lambda: ops.int8_linear(_F32, _PACKED, _SCALE, torch.ones(3)), TypeError, "bias"),
    ("lin bias float64", lambda: ops.int8_linear(_F32, _PACKED, _SCALE, torch.ones(4).double()), TypeError, "bias"),
    ("lin packed garbage", lambda: ops.int8_linear(_F32, torch.zeros(_PACKED.numel(), dtype=torch.uint8), _SCALE), ValueError, "magic"),
    ("lin x None", lambda: ops.int8_linear(None, _PACKED, _SCALE), TypeError, "torch.Tensor"),
    # module / conversion
    ("Int8Linear str input", lambda: Int8Linear(8, 4)("x"), TypeError, "tensor"),
    ("Int8Linear wrong K", lambda: Int8Linear(8, 4)(torch.zeros(2, 9)), ValueError, "last dim must be 8"),
    ("from_linear conv", lambda: Int8Linear.from_linear(nn.Conv2d(1, 1, 1)), TypeError, "nn.Linear"),
    ("quantize list", lambda: fastinfer.quantize([nn.Linear(2, 2)]), TypeError, "nn.Module"),
]  # fmt: skip


@pytest.mark.parametrize("call,exc,match", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_inputs_raise_readable_errors(call, exc, match):
    with pytest.raises(exc, match=match) as info:
        call()
    msg = str(info.value)
    assert 10 <= len(msg) <= 500, msg


def test_direct_op_calls_validate_too():
    """torch.ops.fastinfer.* (what compiled graphs call) validate exactly like the Python wrappers."""
    with pytest.raises(TypeError, match="int8"):
        torch.ops.fastinfer.int8_matmul(_F32, _W8)
    with pytest.raises(ValueError, match="K must match"):
        torch.ops.fastinfer.int8_matmul(_I8, _W8[:, :5])
    with pytest.raises(ValueError, match="N=4"):
        torch.ops.fastinfer.int8_matmul_packed(_I8, _PACKED, 7)
    with pytest.raises(ValueError, match="magic"):
        torch.ops.fastinfer.int8_matmul_packed(_I8, torch.zeros_like(_PACKED), 4)
    with pytest.raises(ValueError, match="asked for"):
        torch.ops.fastinfer.unpack_int8_weight(_PACKED, 4, 9)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        torch.ops.fastinfer.quantize_per_token(_I8)
    with pytest.raises(ValueError, match="K=7"):
        torch.ops.fastinfer.int8_linear(_F32[:, :7], _PACKED, _SCALE, None)
    with pytest.raises((TypeError, RuntimeError)):
        torch.ops.fastinfer.int8_matmul_packed(_I8, _PACKED, "4")


def test_bad_calls_never_crash_the_interpreter():
    """A sweep of malformed calls in a subprocess: each must raise a Python exception (a segfault
    would end the subprocess with a negative exit code)."""
    code = r"""
        import torch, fastinfer
        from fastinfer import ops
        w = torch.randint(-128, 128, (20, 40), dtype=torch.int8)
        p = ops.pack_int8_weight(w)
        a = torch.randint(-128, 128, (3, 40), dtype=torch.int8)
        bufs = [p[:n].clone() for n in (0, 1, 16, 63, 64, 65, p.numel() - 1)]
        for i in range(0, 64, 3):
            b = p.clone(); b[i] ^= 0x5A; bufs.append(b)
        for i in range(16, 48):
            b = p.clone(); b[i] = 0xFF; bufs.append(b)
        raised = 0
        for b in bufs:
            for call in (lambda: ops.unpack_int8_weight(b), lambda: ops.int8_matmul_packed(a, b, 20),
                         lambda: ops.int8_linear(a.float(), b, torch.ones(20), None)):
                try:
                    call()
                except (ValueError, TypeError, RuntimeError):
                    raised += 1
        print("raised", raised, "of", 3 * len(bufs))
    """
    res = run_python(code, timeout=180)
    assert res.returncode == 0, f"exit code {res.returncode}: {res.stderr[-2000:]}"
    raised, total = (int(v) for v in res.stdout.split()[1::2])
    # corrupting a byte of k or n's high bytes always breaks the size check; a few flips of bytes
    # that the header does not use (reserved/padding) may be accepted
    assert raised >= total - 3 * 8, res.stdout


# ------------------------------------------------------------------------------------------- CUDA


def test_cuda_status_is_reported_without_loading_cuda_for_cpu_work():
    """CPU-only use never imports fastinfer._C_cuda; info() says whether it is built and usable."""
    res = run_python(
        """
        import sys, torch, fastinfer
        from fastinfer.nn import Int8Linear
        Int8Linear.from_linear(torch.nn.Linear(16, 8))(torch.randn(2, 16))
        assert "fastinfer._C_cuda" not in sys.modules, "CPU work loaded the CUDA module"
        c = fastinfer.info()["cuda"]
        assert set(c) >= {"built", "available"}, c
        assert c["available"] == (c["built"] and torch.cuda.is_available()), c
        print("ok", c["built"])
        """
    )
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_large_output_mappings_are_reused_after_release():
    """A released large output's mapping serves the next output of the same size (no page faults,
    no kernel zeroing); it is never handed out while any view of the old tensor lives."""
    import gc

    a = torch.randint(-128, 128, (1024, 64), dtype=torch.int8, generator=torch.Generator().manual_seed(3))
    w = torch.randint(-128, 128, (2048, 64), dtype=torch.int8, generator=torch.Generator().manual_seed(4))
    ref = int64_ref(a, w)
    c = ops.int8_matmul(a, w)
    ptr = c.data_ptr()
    del c
    gc.collect()
    d = ops.int8_matmul(a, w)
    assert d.data_ptr() == ptr and torch.equal(d, ref)  # reused, and fully overwritten
    keep = d[5:7]
    del d
    gc.collect()
    e = ops.int8_matmul(a, w)  # the old mapping is still owned by `keep`
    assert e.data_ptr() != ptr and torch.equal(e, ref) and torch.equal(keep, ref[5:7])


def test_large_output_mappings_serve_smaller_outputs_and_the_latest_releases():
    """(A fresh process: the mapping cache is per process.) A released mapping also serves a smaller
    output of more than half its size (a CNN's many output sizes), never a larger one; with more
    sizes released than the cache holds, the oldest go and the latest stay; contents are always the
    new result."""
    code = """
        import gc, torch
        from fastinfer import ops
        g = torch.Generator().manual_seed(0)
        a = torch.randint(-128, 128, (1024, 4), dtype=torch.int8, generator=g)  # K = 4: cheap on the ref kernel too
        ws = {n: torch.randint(-128, 128, (n, 4), dtype=torch.int8, generator=g) for n in (2560, 4096, 8192)}
        def out(n):
            c = ops.int8_matmul(a, ws[n])
            assert torch.equal(c, (a.long() @ ws[n].long().T).int())
            return c
        big = out(4096)  # 16 MiB
        ptr = big.data_ptr()
        del big; gc.collect()
        small = out(2560)  # 10 MiB: more than half of it
        assert small.data_ptr() == ptr, "a smaller output did not reuse the released mapping"
        del small; gc.collect()
        larger = out(8192)  # 32 MiB: the 16 MiB mapping cannot serve it
        assert larger.data_ptr() != ptr
        del larger; gc.collect()
        # twenty more distinct sizes released: the cache keeps the latest
        for k in range(20):
            t = ops.int8_matmul(a, torch.randint(-128, 128, (2048 + 512 * (k + 1), 4), dtype=torch.int8, generator=g))
            last = (t.data_ptr(), t.numel())
            del t; gc.collect()
        w = torch.randint(-128, 128, (last[1] // 1024, 4), dtype=torch.int8, generator=g)
        again = ops.int8_matmul(a, w)
        assert again.data_ptr() == last[0], "the latest released mapping was evicted"
        print("ok")
        """
    res = run_python(code, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_large_outputs_on_their_own_mapping_behave_like_tensors():
    """Outputs >= ops.LARGE_OUTPUT_BYTES live on a huge-page mapping owned by the tensor: exact,
    alive as long as any view is, picklable, shareable, and unmapped only when the last view dies."""
    import gc
    import io
    import pickle

    a = torch.randint(-128, 128, (1024, 64), dtype=torch.int8, generator=torch.Generator().manual_seed(7))
    w = torch.randint(-128, 128, (2048, 64), dtype=torch.int8, generator=torch.Generator().manual_seed(8))
    ref = int64_ref(a, w)
    c = ops.int8_matmul(a, w)
    assert c.numel() * 4 >= ops.LARGE_OUTPUT_BYTES
    assert c.is_contiguous() and c.shape == (1024, 2048)
    assert torch.equal(c, ref)
    view = c[100:102]
    del c
    gc.collect()
    for _ in range(3):  # new mappings may land where the old one was
        ops.int8_matmul(a, w).fill_(0)
    assert torch.equal(view, ref[100:102])
    c = ops.int8_matmul(a, w)
    buf = io.BytesIO()
    torch.save(c, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf), ref)
    assert torch.equal(pickle.loads(pickle.dumps(c)), ref)
    c.share_memory_()
    assert torch.equal(c, ref)

    lin = nn.Linear(64, 2048)
    x = torch.randn(1024, 64, generator=torch.Generator().manual_seed(9))
    q = Int8Linear.from_linear(lin)
    y = q(x)
    assert y.numel() * 4 >= ops.LARGE_OUTPUT_BYTES
    assert torch.equal(y, q(x.clone()))
    small = q(x[:8])  # below the threshold: the default allocator
    assert torch.equal(small, y[:8])


@pytest.mark.skipif(UNDER_SANITIZER, reason="under ASan: its allocator replaces glibc malloc (mallopt is refused, the faults are its own)")
def test_steady_state_layer_then_torch_op_takes_no_page_faults():
    """A 3 MiB Int8Linear output consumed by GELU every step: glibc's default trimming gave it back
    to the OS at each free and re-faulted it on the next step (761 faults a step, 3x the time).
    With the malloc settings fastinfer applies at import, the steady state takes no faults; with
    FASTINFER_MALLOC_TUNE=0 they are left alone (and reported as such)."""
    code = """
        import json, resource, torch, fastinfer
        torch.set_num_threads(1)
        q = fastinfer.quantize(torch.nn.Linear(384, 1536).eval())
        x, keep = torch.randn(512, 384), {}
        def step():
            keep["g"] = torch.nn.functional.gelu(q(x))
        with torch.inference_mode():
            for _ in range(20):
                step()
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(20):
                step()
            per_step = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 20
        print(json.dumps({"faults": per_step, "malloc": fastinfer.info()["malloc"]}))
    """
    res = run_python(code)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout)
    assert got["malloc"]["tuned"] and got["malloc"]["opt_out"] == "FASTINFER_MALLOC_TUNE=0", got
    assert got["faults"] < 20, f"{got['faults']} page faults a step (a 3 MiB buffer is 768 pages)"
    res = run_python("import fastinfer; print(fastinfer.info()['malloc']['tuned'])", env={"FASTINFER_MALLOC_TUNE": "0"})
    assert res.returncode == 0 and res.stdout.strip() == "False", res.stderr[-2000:]


def test_outputs_past_the_streaming_size_are_the_same_bits():
    """Outputs of 16 MiB or more are written with non-temporal stores (Epilogue::stream): the values
    must be those of the same rows computed in small calls (cached stores), for the int8 convs (1x1
    and 3x3), the fp32 depthwise conv and the int8 linear."""
    torch.manual_seed(0)
    convs = (nn.Conv2d(4, 96, 1), nn.Conv2d(4, 96, 3, padding=1), nn.Conv2d(96, 96, 3, padding=1, groups=96))
    for conv in convs:
        q = fastinfer.quantize(nn.Sequential(conv.eval()), fastinfer.QuantConfig(progress=False))
        x = torch.randn(16, conv.in_channels, 56, 56).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            y = q(x)
            per_sample = torch.cat([q(x[i : i + 1]) for i in range(16)])
        assert y.numel() * 4 >= 16 << 20
        assert torch.equal(y, per_sample), type(q[0]).__name__
    lin = Int8Linear.from_linear(nn.Linear(8, 4096))
    x = torch.randn(1100, 8)
    with torch.inference_mode():
        y = lin(x)
        chunks = torch.cat([lin(x[i : i + 100]) for i in range(0, 1100, 100)])
    assert y.numel() * 4 >= 16 << 20 and torch.equal(y, chunks)
