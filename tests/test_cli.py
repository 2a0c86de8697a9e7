"""The console script: `fastinfer info` and `fastinfer bench` (dense and sparse suites) on tiny
shapes, and its argument errors."""

from __future__ import annotations

import json

import pytest

import fastinfer
from fastinfer import cli


def test_info_prints_json(capsys):
    assert cli.main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["version"] == fastinfer.__version__ and info["isa"] in fastinfer.available_isas()


@pytest.fixture
def every_round_clean(monkeypatch):
    """These tests check what the tables hold; whether a busy machine's rounds are dropped is
    tests/test_bench_models.py's business (a CI machine may see a daemon run)."""
    from fastinfer.bench import guard

    monkeypatch.setattr(guard.CpuGuard, "clean", lambda self, i: True)


def test_noisy_dense_run_prints_no_figures(capsys, monkeypatch):
    """Every round noisy: each shape is one NOISY row, no figures, and the report still renders."""
    from fastinfer.bench import guard

    monkeypatch.setattr(guard.CpuGuard, "clean", lambda self, i: False)
    rc = cli.main(["bench", "--shapes", "4x64x48", "--rounds", "2", "--batch-ms", "1", "--no-progress",
                   "--threads", "1", "--no-interleaved"])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "| 4x64x48 | NOISY |" in text and "4x64x48: NOISY" in text
    assert "ours Int8Linear" not in text.split("| shape (MxKxN)", 1)[1]


def test_bench_dense_tiny(capsys, tmp_path, every_round_clean):
    out = tmp_path / "bench.md"
    rc = cli.main(["bench", "--shapes", "4x64x48,32x128x64", "--rounds", "2", "--batch-ms", "1", "--no-progress",
                   "--threads", "1", "-o", str(out)])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert out.read_text() == text
    assert "| 4x64x48 | ours Int8Linear" in text and "| 32x128x64 | fp32 nn.Linear" in text
    assert "1.00x (baseline)" in text and "int8 compute ceiling" in text
    assert "NOT EXACT" not in text and "ABORTED" not in text
    # the interleaved rows: each shape's layer right after each torch op, penalty or NOISY, faults
    inter = text.split("## Interleaved", 1)[1]
    for op in ("gelu", "layer_norm", "add"):
        assert f"| 4x64x48 | Int8Linear | {op} |" in inter and f"| 32x128x64 | Int8Linear | {op} |" in inter


def test_bench_sparse_tiny(capsys, every_round_clean):
    rc = cli.main(["bench", "--suite", "sparse", "--shapes", "128x64", "--sparsities", "0.75", "--ms", "1,5",
                   "--quick", "--no-progress", "--threads", "1"])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    for peer in ("ours SparseInt8Linear (csr)", "ours SparseInt8Linear (ell)", "ours SparseInt8Linear (block)", "ours SparseInt8Linear (2:4)",
                 "ours SparseLinear (csr fp32)", "ours SparseLinear (ell fp32)", "torch CSR fp32"):  # fmt: skip
        assert peer in text, peer
    assert "= Int8Linear" in text


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["bench", "--shapes", "4x64"], "must be MxKxN"),
        (["bench", "--shapes", "0x64x64"], "must be positive"),
        (["bench", "--isa", "sse9"], "not available here"),
        (["bench", "--threads", "0"], "--threads must be >= 1"),
        (["bench", "--suite", "sparse", "--sparsities", "1.5"], "--sparsities must be in [0, 1)"),
    ],
)
def test_bench_bad_arguments(capsys, argv, msg):
    assert cli.main(argv) == 2
    assert msg in capsys.readouterr().err
