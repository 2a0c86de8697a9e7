"""`fastinfer bench --suite models` on the smallest case (and an image case on small images),
`--suite conv` on its smallest layer, and the guard that keeps a busy machine's figures out of the
report."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from fastinfer import cli
from fastinfer.bench import guard as _bench_guard, models as _bench_models


def test_guard_sees_another_process_on_the_cpu():
    """A process spinning on one core during a round is seen as foreign CPU use (on a 2-core
    machine, about half the capacity); the verdict then refuses to print figures."""
    guard = _bench_guard.CpuGuard(max_foreign=0.10)
    spin = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 3: pass"])
    try:
        time.sleep(0.3)  # let it start spinning
        with guard.round():
            time.sleep(0.6)
    finally:
        spin.kill()
        spin.wait()
    frac = guard.rounds[0].foreign_frac
    if frac is None:
        pytest.skip("no /proc/stat here")
    assert frac > 0.9 / guard.ncpu * 0.5, frac  # at least half of one core's worth
    assert not guard.clean(0)
    verdict = guard.verdict(min_clean=1)
    assert verdict is not None and verdict.startswith("NOISY")


def test_unknown_model_case_is_an_error(capsys):
    assert cli.main(["bench", "--suite", "models", "--models", "resnet-9000"]) == 2
    assert "unknown model case" in capsys.readouterr().err


def test_models_suite_smallest_case(capsys, monkeypatch):
    """The MiniLM case at 32x16, one round, no ONNX peers: every torch peer runs, fidelity is
    printed, fastinfer is close to fp32 (cosine of pooled embeddings), and a figure appears only
    when the round was clean."""
    pytest.importorskip("transformers")
    monkeypatch.setattr(_bench_models, "_real_minilm", lambda: None)  # the config-built model: fast
    kernel = _bench_models.hf_attention._kernel
    rc = cli.main(["bench", "--suite", "models", "--models", "minilm-32x16", "--rounds", "1", "--no-onnx",
                   "--no-progress", "--threads", "1"])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "## MiniLM-L6-shaped 32x16" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    for peer in ("fp32", "bf16 model.bfloat16()", "fastinfer", "fastinfer, torch SDPA", "fastinfer bf16"):
        assert peer in rows, (peer, text)
    assert _bench_models.hf_attention._kernel is kernel  # the layer-share pass put the kernel back
    assert any(name.startswith("torch.ao dynamic") for name in rows), text
    cos_mean = float(rows["fastinfer"].split("|")[6])
    assert cos_mean > 0.99, rows["fastinfer"]
    if "NOISY" not in text:
        assert rows["fastinfer"].split("|")[2].strip(), "a clean round must print a time"
    else:
        assert not rows["fastinfer"].split("|")[2].strip(), "a noisy run must not print a time"


def test_figures_above_a_measured_limit_are_not_printed():
    """A figure above what the same run measured the machine can do (490% of the read bandwidth,
    174% of the int8 ceiling, as a busy machine once printed) is named, never printed as a result."""
    from fastinfer.bench import ops as bench_ops

    peaks = {"avx512_vnni": 2.2}
    assert "490% of the read bandwidth" in bench_ops.untrusted({"kind": "ours", "bw_frac": 4.9}, peaks)
    assert "174% of the measured int8" in bench_ops.untrusted({"kind": "ours", "isa": "avx512_vnni", "tops": 3.828}, peaks)
    assert bench_ops.untrusted({"kind": "ours", "isa": "avx512_vnni", "tops": 2.0, "bw_frac": 0.99}, peaks) is None
    assert bench_ops.untrusted({"kind": "float", "tops": 9.0}, peaks) is None  # no int8 ceiling for fp32 peers
    # an ISA whose probe gave nothing (None) is ignored, not compared with
    assert "174%" in bench_ops.untrusted({"kind": "int", "isa": None, "tops": 3.828}, {"avx2": None, **peaks})
    row = {"shape": "1x8x8", "peer": "ours Int8Linear [avx512_vnni, detected]", "kind": "ours", "isa": "avx512_vnni",
           "tops": 0.1, "bw_frac": 4.9, "ms_median": 0.001, "ms_min": 0.001, "M": 1, "baseline": True, "ratio": 1.0,
           "gbps": 900.0, "read_bw_gbps": 180.0, "rounds": 5, "settle_ms": 25.0}  # fmt: skip
    text = bench_ops.format_markdown([row], {"peak_tops": peaks})
    assert "NOT TRUSTED" in text and "900.0" not in text and "490%" in text


def test_noisy_rounds_are_dropped_from_the_samples():
    """time_peers with a guard returns only the rounds the guard found clean."""
    from fastinfer.bench import ops as bench_ops

    class FakeGuard(_bench_guard.CpuGuard):
        def round(self):  # every second round "saw" another process
            ctx = super().round()
            outer = self

            class Ctx:
                def __enter__(self):
                    return ctx.__enter__()

                def __exit__(self, *exc):
                    ctx.__exit__(*exc)
                    outer.rounds[-1].foreign_frac = 0.5 if len(outer.rounds) % 2 == 0 else 0.0

            return Ctx()

    peer = bench_ops.Peer(name="p", kind="float", fn=lambda: None)
    guard = FakeGuard()
    samples = bench_ops.time_peers([peer], rounds=6, target_s=1e-4, settle_s=0.0, guard=guard)
    assert len(guard.rounds) == 6 and len(samples["p"]) == 3
    assert guard.verdict(bench_ops.min_clean_rounds(6)) is None
    assert guard.verdict(4).startswith("NOISY")


# ------------------------------------------------------------------------------ image cases, conv suite


@pytest.fixture
def every_round_clean(monkeypatch):
    """Figures are printed whatever else the machine runs (what the tables hold is checked here;
    dropping busy rounds is test_guard_sees_another_process_on_the_cpu's business)."""
    monkeypatch.setattr(_bench_guard.CpuGuard, "clean", lambda self, i: True)


def test_image_cases_are_selected_by_key_or_prefix():
    assert len(_bench_models.default_cases(["mobilenet", "resnet50"])) == 4  # b16 and b1 of each
    assert len(_bench_models.default_cases(["mobilenet_v2-b1"])) == 1  # a full key: not b16 too
    assert len(_bench_models.default_cases(["image"])) == len(_bench_models.IMAGE_CASES)
    with pytest.raises(ValueError, match="unknown model case"):
        _bench_models.default_cases(["resnet-9000"])


def test_image_case_every_peer(every_round_clean):
    """A small CNN on 32x32 images, one round, every peer this environment has: torch fp32/bf16
    channels_last, fastinfer (fp32 and bf16), and OpenVINO / ONNX Runtime where installed (a peer
    that fails is reported, not fatal). Fidelity columns are filled, "vs best peer" compares with a
    peer that is not ours, and the markdown holds the image table."""
    case = _bench_models.image_case("small_cnn", batch=4, size=32, calib_images=8)
    assert case.kind == "image" and case.inputs["x"].is_contiguous(memory_format=torch.channels_last)
    res = _bench_models.run_case(case, rounds=1, min_clean=1, threads=1, engine=torch.backends.quantized.engine)
    rows = {r["peer"]: r for r in res["rows"]}
    for peer in ("fp32 channels_last", "bf16 channels_last", "fastinfer", "fastinfer bf16"):
        assert peer in rows, (peer, res["errors"])
    for peer in ("openvino fp32", "openvino int8", "onnxruntime int8"):
        assert peer in rows or peer in res["errors"], peer
    assert "torch.ao dynamic" in res["errors"]  # not measured on convs, and said so
    assert "rewrote no block" in res["errors"]["fastinfer no block rewrite"]  # a plain Sequential
    ours = rows["fastinfer"]
    assert ours["cos_mean"] > 0.9 and 0.0 <= ours["top1"] <= 1.0 and ours["sqnr_db"] > 5.0, ours
    assert "Int8Conv2d" in ours["note"] and ours["layer_share"] is not None
    assert rows["fp32 channels_last"]["top1"] == 1.0
    assert res["best_peer"] in rows and not res["best_peer"].startswith("fastinfer")
    assert ours["ms"] > 0 and ours["vs best peer"] > 0 and ours["vs fp32"] > 0
    text = _bench_models.format_markdown([res])
    assert "## small CNN b4 32x32" in text and "| peer | ms / batch | img/s | vs fp32 | vs best peer |" in text
    assert "RANDOM weights" in text and f"best peer (fastest that is not fastinfer's): {res['best_peer']}" in text


def test_models_suite_image_case_cli(capsys):
    """`--suite models --models mobilenet_v2-b1 --image-size 32`: the real MobileNetV2 on small
    images through the command line, one round, torch and fastinfer peers only."""
    rc = cli.main(["bench", "--suite", "models", "--models", "mobilenet_v2-b1", "--image-size", "32", "--rounds", "1",
                   "--no-onnx", "--no-progress", "--threads", "1"])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "## MobileNetV2 b1 32x32" in text and "MobileNetV2 b16" not in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    for peer in ("fp32 channels_last", "bf16 channels_last", "fastinfer", "fastinfer bf16"):
        assert peer in rows, (peer, text)
    assert "35 Int8Conv2d, 17 DepthwiseConv2d" in rows["fastinfer"]
    assert cli.main(["bench", "--suite", "models", "--image-size", "8"]) == 2


def test_conv_suite_tiny(capsys, every_round_clean):
    """`--suite conv` on the smallest named layer at batch 1, and a tiny depthwise layer of our own:
    the three peers, their SQNR check, int8 TOPS against the measured ceiling, the summary line."""
    from fastinfer.bench import conv as bench_conv

    rc = cli.main(["bench", "--suite", "conv", "--convs", "r50-3x3-512", "--batches", "1", "--quick", "--rounds", "2",
                   "--batch-ms", "1", "--no-progress", "--threads", "1"])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "int8 compute ceiling" in text
    for peer in ("fp32 channels_last", "bf16 channels_last", "ours Int8Conv2d"):
        assert f"| ResNet-50 3x3 512->512 at 7x7 | 1 | >= 0 | 7x7 | 0.116 | {peer} |" in text, (peer, text)
    assert "SQNR" in text and "ERROR" not in text and "- ResNet-50 3x3 512->512 at 7x7, batch 1, Int8Conv2d:" in text

    tiny = bench_conv.ConvLayer("tiny-dw", "tiny depthwise 5x5, stride 2", 16, 16, 5, 2, 16, 9, relu_input=True)
    rows = bench_conv.run([tiny], batches=[2], rounds=2, target_s=1e-3, progress=False)
    ours = next(r for r in rows if r["peer"] == "ours Int8Conv2d")
    assert ours["out"] == 5 and ours["tops"] > 0 and ours["vs fp32"] > 0 and ours["check"].startswith("SQNR")
    assert float(ours["check"].split()[1]) > 25.0, ours["check"]
    assert cli.main(["bench", "--suite", "conv", "--convs", "vgg"]) == 2
    assert "unknown conv layer" in capsys.readouterr().err


def test_attention_suite_on_a_tiny_case():
    """`--suite attention` machinery on one tiny case: both peers checked against float64 SDPA first,
    the table printed (figures only when the round was clean)."""
    from fastinfer.bench import attention as bench_attention

    case = bench_attention.Case("tiny", 2, 2, 8, 8, 16, padded=True)
    rows = bench_attention.run(quick=True, rounds=1, progress=False, cases=(case,))
    assert [r["dtype"] for r in rows] == ["float32", "bfloat16", "float32 (bf16 math)"]
    assert rows[0]["err"]["fastinfer"] < 1e-5 and rows[1]["err"]["fastinfer"] < 3e-2 and rows[2]["err"]["fastinfer"] < 3e-2
    text = bench_attention.format_markdown(rows)
    assert "| tiny | float32 | 2x2x8x8x16 |" in text
    for r in rows:
        assert (r["verdict"] is None) == ("speedup" in r)
