"""Command line: `fastinfer info`, `fastinfer optimize` and `fastinfer bench` (also `python -m fastinfer ...`)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    import fastinfer

    print(json.dumps(fastinfer.info(), indent=2))
    return 0


def _load_source(src: str):
    """(float model, is a Hugging Face folder) from SRC: a local transformers model folder (its
    config.json's architectures, else AutoModel) or `module:function` returning an nn.Module."""
    import importlib
    import os

    from torch import nn

    if os.path.isdir(src):
        if not os.path.isfile(os.path.join(src, "config.json")):
            raise SystemExit(f"fastinfer optimize: {src} is a folder without config.json (not a transformers model folder)")
        import transformers

        from fastinfer.hf import architecture_class

        cls = architecture_class(transformers.AutoConfig.from_pretrained(src))
        model = (cls or transformers.AutoModel).from_pretrained(src)
        return model.eval(), True
    module_name, sep, func_name = src.partition(":")
    if not sep or not module_name or not func_name:
        raise SystemExit(f"fastinfer optimize: SRC must be a model folder or module:function, got {src!r}")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"fastinfer optimize: cannot find {src!r} ({type(e).__name__}: {e})") from None
    model = func()
    if not isinstance(model, nn.Module):
        raise SystemExit(f"fastinfer optimize: {src} returned a {type(model).__name__}, not an nn.Module")
    return model.eval(), False


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.1f} KiB"


def _example_batch(model, is_hf: bool, spec: str):
    """The --plan example input: token ids [B, L] (and an all-ones attention mask) for a transformers
    model, else a float32 tensor of that shape (standard normal)."""
    import torch

    try:
        shape = tuple(int(v) for v in spec.lower().replace(",", "x").split("x"))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise SystemExit(f"fastinfer optimize: --plan takes a shape such as 8x128 or 1x3x224x224, got {spec!r}")
    gen = torch.Generator().manual_seed(0)
    if is_hf:
        if len(shape) != 2:
            raise SystemExit(f"fastinfer optimize: --plan for a transformers model is BATCHxTOKENS, got {spec!r}")
        vocab = int(getattr(model.config, "vocab_size", 1000))
        ids = torch.randint(0, vocab, shape, generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return torch.randn(shape, generator=gen)


def _calibration_batches(path: str, is_hf: bool, batch: int) -> list:
    """--calibration FILE: a safetensors file of calibration inputs split along dim 0 into batches
    of `batch` rows: its tensors are the keyword arguments of a transformers model (input_ids,
    attention_mask, ...), or one tensor (any name) that is the input of any other model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if batch < 1:
        raise SystemExit(f"fastinfer optimize: --calibration-batch must be >= 1, got {batch}")
    try:
        tensors = load_file(path)
    except (OSError, SafetensorError, ValueError) as e:
        raise SystemExit(f"fastinfer optimize: --calibration {path!r} is not a readable safetensors file ({e})") from None
    rows = {t.shape[0] if t.dim() else 0 for t in tensors.values()}
    if not tensors or len(rows) != 1 or 0 in rows:
        raise SystemExit(f"fastinfer optimize: --calibration {path!r} must hold tensors with the same number "
                         f"(>= 1) of rows, got {', '.join(f'{k} {list(v.shape)}' for k, v in tensors.items()) or 'none'}")  # fmt: skip
    if not is_hf and len(tensors) != 1:
        raise SystemExit(f"fastinfer optimize: --calibration for a module:function model holds one tensor (its input), "
                         f"got {sorted(tensors)}")  # fmt: skip
    n = rows.pop()
    if is_hf:
        return [{k: v[i : i + batch] for k, v in tensors.items()} for i in range(0, n, batch)]
    (x,) = tensors.values()
    return [x[i : i + batch] for i in range(0, n, batch)]


def _cmd_optimize(args: argparse.Namespace) -> int:
    import os

    import fastinfer

    if args.sparsity is not None and not 0 < args.sparsity < 1:
        raise SystemExit(f"fastinfer optimize: --sparsity must be between 0 and 1, got {args.sparsity}")
    progress = False if args.no_progress else None  # None: a bar for long conversions only
    if args.activations == "static" and not args.calibration:
        raise SystemExit("fastinfer optimize: --activations static needs --calibration FILE (its inputs' ranges give the scales)")
    if args.smoothquant is not None and not args.calibration:
        raise SystemExit("fastinfer optimize: --smoothquant needs --calibration FILE (its inputs' channel maxima)")
    attention = {"auto": True, "fp32": "fp32", "bf16": "bf16", "torch": False}[args.attention]
    handoff = {"auto": True, "bf16": "bf16", "u8": "u8", "off": False}[args.conv_handoff]
    model, is_hf = _load_source(args.src)
    calib = _calibration_batches(args.calibration, is_hf, args.calibration_batch) if args.calibration else None
    float_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if args.plan:
        example = _example_batch(model, is_hf, args.plan)
        prune = {"sparsity": args.sparsity, "pattern": args.pattern} if args.sparsity else None
        cfg = fastinfer.QuantConfig(progress=progress, smoothquant=args.smoothquant, attention=attention,
                                    conv_handoff=handoff)  # fmt: skip
        model, _ = fastinfer.optimize(model, example, quantize=not args.no_quantize, prune=prune, config=cfg,
                                      calibration_data=calib, min_sqnr_db=args.min_sqnr,
                                      max_model_sqnr_drop_db=args.max_model_sqnr_drop, progress=progress)  # fmt: skip
    else:
        if args.sparsity:
            model = fastinfer.prune(model, args.sparsity, pattern=args.pattern, progress=progress)
        if not args.no_quantize:
            cfg = fastinfer.QuantConfig(progress=progress, activations=args.activations, smoothquant=args.smoothquant,
                                        attention=attention, conv_handoff=handoff)  # fmt: skip
            model = fastinfer.quantize(model, cfg, calibration_data=calib)
        if args.sparsity:
            model = fastinfer.sparsify(model, progress=progress)
    if is_hf:
        path = fastinfer.save_pretrained(model, args.out)
    else:
        fastinfer.save(model, args.out)
        path = args.out
    report = model.__dict__.get("_fastinfer_report")
    if args.plan:
        print(fastinfer.report(model))
    elif report is not None:
        print(report)
    if args.sparsity and not args.plan:
        print()
        for row in fastinfer.sparsity_report(model):
            print(row)
    size = os.path.getsize(path)
    print(f"\nwritten {path}: {_size(size)} (the float state_dict: {_size(float_bytes)}). "
          f"Load with fastinfer.{'from_pretrained(folder)' if is_hf else 'load(path, float_model)'}.")  # fmt: skip
    return 0


DEMO_CASES = ("minilm-8x128", "minilm-32x16", "mobilenet_v2-b16")


def _cmd_demo(args: argparse.Namespace) -> int:
    """A MiniLM-shaped encoder and a MobileNetV2, built here (no network), or a local model folder
    (--model), timed side by side."""
    import torch

    from fastinfer.bench import models as bench_models, ops as bench_ops

    if args.image_size < 32:
        print("fastinfer demo: error: --image-size must be >= 32", file=sys.stderr)
        return 2
    builders = None
    if args.model is not None:
        import os

        if not os.path.isfile(os.path.join(args.model, "config.json")):
            print(f"fastinfer demo: error: --model {args.model!r} is not a transformers model folder (no config.json)",
                  file=sys.stderr)  # fmt: skip
            return 2
        try:
            batch, tokens = (int(v) for v in args.shape.lower().split("x"))
            assert batch >= 1 and tokens >= 1
        except (ValueError, AssertionError):
            print(f"fastinfer demo: error: --shape must be BATCHxTOKENS such as 8x128, got {args.shape!r}", file=sys.stderr)
            return 2
        builders = [lambda: bench_models.folder_case(args.model, batch, tokens)]
    torch.set_num_threads(args.threads)
    meta = bench_ops.environment_meta(command=_command(args), dram=False, peaks=False)
    results = bench_models.run(list(DEMO_CASES), quick=not args.full, threads=args.threads, onnx=args.peers,
                               progress=not args.no_progress, image_size=args.image_size, builders=builders)  # fmt: skip
    print(bench_models.format_markdown(results, meta), end="")
    if args.chart:
        try:
            written = write_chart(results, args.chart)
        except ImportError:
            print(f"(no chart: matplotlib is not installed; pip install \"fastinfer[demo]\" for {args.chart})")
        else:
            print(f"(chart of speed vs fidelity written to {written})")
    return 0


def write_chart(results: list[dict], path: str) -> str:
    """A PNG: speed vs fp32 (y) against the cosine distance of the outputs to fp32 (x, log), one
    panel per case; peers without a clean timing are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [r for r in results if any("vs fp32" in row for row in r["rows"])]
    fig, axes = plt.subplots(1, max(1, len(cases)), figsize=(5 * max(1, len(cases)), 4), squeeze=False)
    for ax, res in zip(axes[0], cases):
        for row in res["rows"]:
            if "vs fp32" not in row or "cos_mean" not in row:
                continue
            x = max(1.0 - row["cos_mean"], 1e-7)  # fp32 itself sits at the left edge
            ax.scatter([x], [row["vs fp32"]], s=30)
            ax.annotate(row["peer"], (x, row["vs fp32"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("1 - cosine to fp32 (lower: closer)")
        ax.set_ylabel("speed vs fp32 (x)")
        ax.set_title(res["case"], fontsize=9)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _command(args: argparse.Namespace) -> str:
    return "fastinfer " + " ".join(shlex.quote(a) for a in args._argv)


def _emit(args: argparse.Namespace, text: str) -> None:
    """Prints a suite's markdown and, with -o, writes the same text to the file."""
    print(text, end="")
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
        print(f"(written to {args.output})", file=sys.stderr)


def _cmd_bench_sparse(args: argparse.Namespace) -> int:
    import torch

    from fastinfer.bench import ops as bench_ops, sparse as bench_sparse

    try:
        sparsities = [float(s) for s in args.sparsities.split(",")] if args.sparsities else list(bench_sparse.SPARSITIES)
        ms = [int(m) for m in args.ms.split(",")] if args.ms else list(bench_sparse.MS)
        if any(not 0 <= s < 1 for s in sparsities) or any(m < 1 for m in ms):
            raise ValueError("--sparsities must be in [0, 1) and --ms positive")
        shapes = bench_sparse.WEIGHT_SHAPES
        if args.shapes:  # KxN here
            shapes = []
            for t in args.shapes.split(","):
                k, n = (int(v) for v in t.lower().split("x"))
                shapes.append((k, n))
    except ValueError as e:
        print(f"fastinfer bench: error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    meta = bench_ops.environment_meta(command=_command(args), dram=False)
    timing = (3, 0.01, 0.01) if args.quick else bench_sparse.TIMING
    rows = bench_sparse.run(bench_sparse.default_cases(shapes, sparsities), ms=ms,
                             progress=not args.no_progress, timing=timing)  # fmt: skip
    text = bench_sparse.format_markdown(rows, meta)
    _emit(args, text)
    return 0


def _cmd_bench_models(args: argparse.Namespace) -> int:
    import torch

    from fastinfer.bench import models as bench_models, ops as bench_ops

    try:
        names = [n.strip() for n in args.models.split(",") if n.strip()] if args.models else None
        bench_models.default_cases(names)  # validates the names before any model is built
        if args.rounds is not None and args.rounds < 1:
            raise ValueError("--rounds must be >= 1")
        if args.image_size < 32:
            raise ValueError("--image-size must be >= 32 (the image models downsample 32x)")
    except ValueError as e:
        print(f"fastinfer bench: error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    meta = bench_ops.environment_meta(command=_command(args), dram=False, peaks=False)
    results = bench_models.run(names, quick=args.quick, rounds=args.rounds, threads=args.threads,
                                onnx=not args.no_onnx, progress=not args.no_progress,
                                image_size=args.image_size)  # fmt: skip
    text = bench_models.format_markdown(results, meta)
    _emit(args, text)
    return 0


def _cmd_bench_conv(args: argparse.Namespace) -> int:
    import torch

    from fastinfer.bench import conv as bench_conv, ops as bench_ops

    try:
        layers = bench_conv.select([n.strip() for n in args.convs.split(",") if n.strip()] if args.convs else None)
        batches = [int(b) for b in args.batches.split(",")] if args.batches else list(bench_conv.BATCHES)
        if any(b < 1 for b in batches):
            raise ValueError("--batches must be positive")
        if args.rounds is not None and args.rounds < 1:
            raise ValueError("--rounds must be >= 1")
        if args.threads is not None and args.threads < 1:
            raise ValueError("--threads must be >= 1")
    except ValueError as e:
        print(f"fastinfer bench: error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    meta = bench_ops.environment_meta(command=_command(args), dram=False)  # peaks: the int8 ceiling
    rows = bench_conv.run(layers, batches, quick=args.quick, rounds=args.rounds,
                          target_s=args.batch_ms / 1e3 if args.batch_ms else None, progress=not args.no_progress)  # fmt: skip
    _emit(args, bench_conv.format_markdown(rows, meta))
    return 0


def _cmd_bench_attention(args: argparse.Namespace) -> int:
    import torch

    from fastinfer.bench import attention as bench_attention, ops as bench_ops

    if args.rounds is not None and args.rounds < 1:
        print("fastinfer bench: error: --rounds must be >= 1", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    meta = bench_ops.environment_meta(command=_command(args), dram=False, peaks=False)
    rows = bench_attention.run(quick=args.quick, rounds=args.rounds, progress=not args.no_progress)
    _emit(args, bench_attention.format_markdown(rows, meta))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    import fastinfer
    from fastinfer.bench import ops as bench_ops

    if args.suite == "sparse":
        return _cmd_bench_sparse(args)
    if args.suite == "models":
        return _cmd_bench_models(args)
    if args.suite == "conv":
        return _cmd_bench_conv(args)
    if args.suite == "attention":
        return _cmd_bench_attention(args)

    try:
        if args.shapes:
            shapes = dict(bench_ops.parse_shape(s) for s in args.shapes.split(",") if s.strip())
        else:
            shapes = dict(bench_ops.SHAPES)
        if args.isa:
            isas = [i.strip() for i in args.isa.split(",") if i.strip()]
            bad = [i for i in isas if i not in fastinfer.available_isas()]
            if bad:
                raise ValueError(
                    f"--isa {', '.join(bad)}: not available here (available: "
                    f"{', '.join(fastinfer.available_isas())})"
                )
        else:
            isas = bench_ops.default_isas()
        if args.threads is not None and args.threads < 1:
            raise ValueError("--threads must be >= 1")
    except ValueError as e:
        print(f"fastinfer bench: error: {e}", file=sys.stderr)
        return 2

    if args.threads is not None:
        torch.set_num_threads(args.threads)  # fastinfer follows torch's thread count
    meta = bench_ops.environment_meta(command=_command(args))
    results = bench_ops.run(
        shapes, isas=isas, progress=not args.no_progress, quick=args.quick,
        rounds=args.rounds, target_s=args.batch_ms / 1e3 if args.batch_ms else None,
    )  # fmt: skip
    text = bench_ops.format_markdown(results, meta)
    if not args.no_interleaved:
        from fastinfer.bench import interleaved

        shapes_i = list(shapes.values()) if args.shapes else list(interleaved.SHAPES)
        rows = interleaved.run(shapes_i, rounds=3 if args.quick else 7, progress=not args.no_progress)
        text += "\n" + interleaved.format_markdown(rows)
    _emit(args, text)
    aborted = [r for r in results if r.get("peer") == "ABORTED"]
    return 1 if aborted else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastinfer", description="fastinfer: exact int8 CPU kernels for PyTorch")
    from fastinfer._runtime import __version__

    parser.add_argument("--version", action="version", version=f"fastinfer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("info", help="what this installation can do here (JSON)")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser(
        "optimize",
        help="convert a model (a transformers folder or module:function) and save it",
        description="Loads SRC (a local transformers model folder, or module:function returning an "
        "nn.Module), optionally prunes it (magnitude), quantizes it to int8, keeps the layers whose "
        "zeros pay sparse, writes it (a folder for fastinfer.from_pretrained, or a file for "
        "fastinfer.load) and prints the per-layer report. With --plan SHAPE, fastinfer.optimize "
        "decides instead, layer by layer: each candidate (float, int8 dynamic, int8 weight-only, the "
        "sparse format the zeros allow) is timed at the shapes an example batch of SHAPE gives, and "
        "the fastest within --min-sqnr is kept (static int8 among the candidates when --calibration is given).",
    )
    p.add_argument("src", help="model folder (config.json + weights) or module:function")
    p.add_argument("--out", required=True, help="output folder (transformers SRC) or .safetensors file")
    p.add_argument("--sparsity", type=float, help="prune this fraction of each layer's weights first (0 < s < 1)")
    p.add_argument("--pattern", default="unstructured", help="pruning pattern: unstructured, 2:4, block (default unstructured)")
    p.add_argument("--no-quantize", action="store_true", help="prune and sparsify only (float sparse layers)")
    p.add_argument("--activations", choices=("dynamic", "static", "none"), default="dynamic",
                   help="dynamic: int8 activations per token (default); static: one calibrated scale per layer "
                   "(needs --calibration); none: weight-only int8")
    p.add_argument("--calibration", metavar="FILE", help="a .safetensors file of calibration inputs (transformers: "
                   "input_ids [N, L] and optionally attention_mask; else one tensor, the model's input), split into "
                   "batches along dim 0: static scales, SmoothQuant, and --plan's SQNR")
    p.add_argument("--calibration-batch", type=int, default=8, help="rows per calibration batch (default 8)")
    p.add_argument("--smoothquant", type=float, metavar="ALPHA", help="SmoothQuant with this alpha (needs --calibration)")
    p.add_argument("--plan", metavar="SHAPE", help="measure per layer at an example batch of SHAPE "
                   "(BATCHxTOKENS for a transformers model, else the input tensor's shape) and keep the fastest")
    p.add_argument("--min-sqnr", type=float, default=25.0, help="with --plan: output SQNR each layer must keep, dB (default 25)")
    p.add_argument("--max-model-sqnr-drop", type=float, default=1.0, metavar="DB",
                   help="with --plan: how far the whole model's output SQNR may fall below plain quantization's "
                   "before the less accurate layer choices go back (default 1)")
    p.add_argument("--attention", choices=("auto", "fp32", "bf16", "torch"), default="auto",
                   help="a transformers model's attention: fastinfer's kernel in fp32 (fp32), with bf16 products "
                   "for fp32 q, k, v (bf16), or torch's SDPA as it was (torch); auto (default): fp32, or with "
                   "--plan the fastest of the three within --max-model-sqnr-drop, measured")
    p.add_argument("--conv-handoff", choices=("auto", "bf16", "u8", "off"), default="auto",
                   help="what chained convs hand each other (QuantConfig.conv_handoff): bf16, uint8 after relu6 "
                   "(u8), or each its input's dtype (off); auto (default): bf16, or with --plan uint8 where it "
                   "is faster within --max-model-sqnr-drop, measured")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_optimize)

    p = sub.add_parser(
        "demo",
        help="a MiniLM-shaped encoder and a MobileNetV2, fp32 / bf16 / torch.ao / fastinfer, speed and fidelity",
        description="Builds a MiniLM-shaped encoder (the real all-MiniLM-L6-v2 weights where the package "
        "is installed, else random ones) and a MobileNetV2 here, with no network; times fp32, "
        "model.bfloat16(), torch.ao dynamic int8 and fastinfer side by side (rounds interleaved) and "
        "prints speed and fidelity tables; writes a PNG chart of speed vs fidelity (needs matplotlib: "
        "pip install \"fastinfer[demo]\"). --model FOLDER runs a local transformers model folder instead.",
    )
    p.add_argument("--chart", default="fastinfer-demo.png", metavar="FILE.png", help="chart file ('' for none)")
    p.add_argument("--full", action="store_true", help="the full number of rounds (default: quick)")
    p.add_argument("--peers", action="store_true", help="also ONNX Runtime and OpenVINO where installed")
    p.add_argument("--image-size", type=int, default=160, help="MobileNetV2 image side (default 160)")
    p.add_argument("--model", metavar="FOLDER", help="a local transformers model folder to run instead of the built-in "
                   "cases (an encoder on random ids, or a causal LM generating 16 tokens)")
    p.add_argument("--shape", default="8x128", help="with --model: BATCHxTOKENS (default 8x128)")
    p.add_argument("--threads", type=int, default=2, help="torch (and fastinfer) threads (default: 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "bench",
        help="Int8Linear vs PyTorch's CPU peers, side by side (markdown table)",
        description="Times Int8Linear against fp32/bf16 nn.Linear, quantize_dynamic (per quantized "
        "engine) and torch._int_mm in one process, interleaved, and prints a markdown table of "
        "times, TOPS, ratios and (for small M) weight bandwidth.",
    )
    p.add_argument(
        "--suite", choices=("dense", "ops", "sparse", "models", "conv", "attention"), default="dense",
        help="dense (= ops): Int8Linear vs PyTorch peers (default); sparse: sparse layers vs dense and "
        "torch CSR; models: whole models (MiniLM, BERT-base, GPT-2 generate; MobileNetV2, ResNet-50/18, "
        "EfficientNet-Lite0) vs bf16, torch.ao, ONNX Runtime and OpenVINO; conv: single conv layers "
        "of those image models, Int8Conv2d vs fp32/bf16 channels_last nn.Conv2d; attention: the fused "
        "attention kernel vs torch's SDPA on MiniLM / BERT / GPT-2 shapes",
    )  # fmt: skip
    p.add_argument("--models", help="--suite models: comma-separated cases or prefixes (minilm, bert-base, "
                   "gpt2-generate, mobilenet_v2, resnet50, efficientnet_lite0, resnet18, minilm-32x16, "
                   "resnet50-b1, ...; image = every image case; default: all)")  # fmt: skip
    p.add_argument("--image-size", type=int, default=224,
                   help="--suite models: image side of the image cases (default 224; smaller for a quick look)")
    p.add_argument("--convs", help="--suite conv: comma-separated layers or prefixes (mbv2, lite0, r50, "
                   "mbv2-dw3x3-144-s2, r50-stem-7x7, ...; default: all)")  # fmt: skip
    p.add_argument("--batches", help="--suite conv: comma-separated batch sizes (default 16,1)")
    p.add_argument("--no-interleaved", action="store_true",
                   help="--suite ops: skip the rows that time each layer right after a torch op")
    p.add_argument("--no-onnx", action="store_true", help="--suite models: skip the ONNX Runtime and OpenVINO peers")
    p.add_argument("--shapes", help="comma-separated MxKxN list (default: the five standard shapes); "
                   "with --suite sparse: KxN weight shapes")  # fmt: skip
    p.add_argument("--sparsities", help="--suite sparse: comma-separated sparsities (default 0.5,0.75,0.9,0.95)")
    p.add_argument("--ms", help="--suite sparse: comma-separated batch sizes M (default 1,16,128,512)")
    p.add_argument("--threads", type=int, default=2, help="torch (and fastinfer) threads (default: 2)")
    p.add_argument(
        "--isa", help="comma-separated ISAs for Int8Linear, first one is the baseline "
        "(default: detected, then avx512_vnni and avx2 where available)",
    )  # fmt: skip
    p.add_argument("--quick", action="store_true", help="fewer and shorter rounds (a rough look)")
    p.add_argument("--rounds", type=int, help="timing rounds (default: 15, --quick: 5)")
    p.add_argument("--batch-ms", type=float, help="length of one timed batch in ms (default: 25, --quick: 10)")
    p.add_argument("--output", "-o", metavar="FILE.md", help="also write the markdown to FILE.md")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args._argv = argv
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
