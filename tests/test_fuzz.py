"""The mutation fuzzer over the kernels' buffers (tests/fuzz_buffers.py): a short run in the default
tests, a long one marked slow, and the harness's own checks (a crash in a child is caught and the
run goes on; the oracle can tell a wrong result)."""

from __future__ import annotations

import json
import os
import sys

import pytest

import fuzz_buffers as fb
from conftest import SUBPROCESS_CWD, UNDER_SANITIZER


@pytest.fixture(autouse=True)
def _children_outside_the_tree(monkeypatch):
    monkeypatch.chdir(SUBPROCESS_CWD)  # children import the installed fastinfer, not the source tree


def _assert_clean(res: dict, per_target: int | None = None) -> None:
    c = res["counts"]
    assert c["crash"] == c["wrong"] == c["other_error"] == 0, res["findings"]
    assert c["raised"] > 0 and c["correct"] > 0, c  # both sides of the validation exercised
    if per_target is not None:
        assert res["tried"] == per_target * len(fb.TARGETS)


def test_short_fuzz_run_every_target():
    """60 mutations of each of the 7 buffer kinds (dense K4N16, csr/ell fp32, csr/2:4/block/ell int8),
    every accepted one checked on every kernel table of this CPU."""
    res = fb.fuzz(seconds=0, seed=int(os.environ.get("FASTINFER_FUZZ_SEED", "0")), batch_size=60, progress=False)
    _assert_clean(res, per_target=60)


@pytest.mark.slow
def test_long_fuzz_run():
    res = fb.fuzz(seconds=float(os.environ.get("FASTINFER_FUZZ_SECONDS", "300")), seed=1, batch_size=500)
    print(f"fuzz: {res['tried']} mutations in {res['seconds']} s: {res['counts']}")
    _assert_clean(res)


@pytest.mark.slow
def test_atheris_run():
    pytest.importorskip("atheris")
    r = fb.subprocess.run([sys.executable, fb.__file__, "--atheris", "--seconds", "120"], capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    counts = json.loads(r.stdout.strip().splitlines()[-1])["counts"]
    print(f"atheris: {counts}")
    assert counts["wrong"] == counts["other_error"] == 0 and counts["raised"] > 0 and counts["correct"] > 0


@pytest.mark.skipif(UNDER_SANITIZER, reason="under ASan: its SEGV handler reports the harness's deliberate SIGSEGV and aborts (SIGABRT)")
def test_a_crash_in_a_child_is_caught_and_the_run_goes_on(monkeypatch):
    monkeypatch.setenv("FASTINFER_FUZZ_SELFTEST_CRASH", "2:4:3")
    res = fb.fuzz(seconds=0, targets=("dense", "2:4", "block"), batch_size=8, progress=False)
    assert res["counts"]["crash"] == 1
    (crash,) = [f for f in res["findings"] if f["outcome"] == "crash"]
    assert (crash["target"], crash["index"], crash["why"]) == ("2:4", 3, "SIGSEGV")
    assert res["tried"] == 3 * 8  # the rest of 2:4 and all of block ran after the crash


def test_oracle_tells_a_wrong_result(monkeypatch):
    oracle = fb.Oracle()
    (_, dense), *_ = fb._seeds()["dense"]
    assert oracle.check("dense", dense) == "correct"
    assert oracle.check("dense", dense[:-1]) == "raised"
    real = oracle.ops.int8_matmul_packed
    monkeypatch.setattr(oracle.ops, "int8_matmul_packed", lambda a, p, n: real(a, p, n) + (a.shape[1] > 0))
    assert oracle.check("dense", dense) == "wrong"


def test_mutations_reproduce_from_their_seed():
    base = bytes(range(256)) * 4
    a = fb.mutate(base, fb._rng(5, "csr-f32", 2, 17))
    b = fb.mutate(base, fb._rng(5, "csr-f32", 2, 17))
    assert a == b and a[0] != base


def test_replay_one_mutation_from_the_command_line():
    r = fb.subprocess.run([sys.executable, fb.__file__, "--target", "block", "--only", "7"], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "block #7: seed buffer block" in r.stderr and "=block 7 " in r.stderr
