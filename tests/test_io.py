"""fastinfer.save / fastinfer.load: round trips bit-identical for every layer kind (on every ISA,
and in a fresh interpreter with a lower ISA forced), a float model turned into the optimized one
from the file alone, and a battery of damaged or edited files each raising a clear error in a
child process."""

from __future__ import annotations

import copy
import json
import os
import re
import zlib

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import fastinfer
from conftest import ISAS, run_python, sparse_int8
from fastinfer import ops
from fastinfer.io import FileFormatError, read_metadata
from fastinfer.nn import DepthwiseConv2d, Fused, Int8Conv1d, Int8Conv2d, Int8Linear, SparseInt8Linear, SparseLinear


class Net(nn.Module):
    """A little of everything quantize converts: conv + BatchNorm + ReLU (folded and fused), a
    depthwise conv, linears with a LayerNorm left float."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(8, 64)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(64, hidden)
        self.norm = nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.dw(self.conv(x))).flatten(1)
        return self.norm(self.fc2(self.act(self.fc1(x))))


def _net(seed: int = 0, hidden: int = 16) -> Net:
    torch.manual_seed(seed)
    model = Net(hidden).eval()
    bn = model.conv[1]
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    model.norm.weight.data.uniform_(0.5, 1.5)
    return model


def _quantized(seed: int = 0) -> nn.Module:
    """Net quantized, with fc2 pruned and stored sparse ("ell": its buffer has indices to validate)."""
    q = fastinfer.quantize(_net(seed))
    w = q.fc2.weight_int8.clone()
    w[::2] = 0
    w[:, ::3] = 0
    q.fc2.set_weight(w, q.fc2.weight_scale.clone())
    q.fc2 = SparseInt8Linear.from_int8linear(q.fc2, "ell")
    return q


def _x(seed: int = 1) -> torch.Tensor:
    return torch.randn(3, 3, 10, 10, generator=torch.Generator().manual_seed(seed))


def test_round_trip_into_a_float_model_is_bit_identical(tmp_path, isa):
    q = _quantized()
    path = tmp_path / "net.safetensors"
    fastinfer.save(q, path)
    loaded = fastinfer.load(path, _net(seed=5))  # other float weights: the file's replace them
    assert type(loaded.conv[0]) is Int8Conv2d and loaded.conv[0].activation == "relu"
    assert type(loaded.conv[1]) is Fused and (loaded.conv[1].was, loaded.conv[1].into) == ("BatchNorm2d", "conv.0")
    assert type(loaded.dw) is DepthwiseConv2d and type(loaded.fc1) is Int8Linear
    assert type(loaded.fc2) is SparseInt8Linear and loaded.fc2.format == "ell"
    x = _x()
    assert torch.equal(loaded(x), q(x))
    assert torch.equal(loaded(x.bfloat16()), q(x.bfloat16()))
    a, b = q.state_dict(), loaded.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert repr(loaded) == repr(q)
    assert not loaded.training
    assert [r.result for r in fastinfer.conversion_report(loaded)] == [r.result for r in fastinfer.conversion_report(q)]


def test_load_takes_a_builder_a_converted_model_or_none(tmp_path):
    q = _quantized()
    path = tmp_path / "net.safetensors"
    fastinfer.save(q, path)
    x = _x()
    assert torch.equal(fastinfer.load(path, lambda: _net(seed=7))(x), q(x))
    assert torch.equal(fastinfer.load(path, _quantized(seed=3))(x), q(x))  # into an already-converted model
    with pytest.raises(TypeError, match=r"holds a 'test_io.Net'; pass a float model of that architecture"):
        fastinfer.load(path)
    with pytest.raises(TypeError, match="the model callable returned a int"):
        fastinfer.load(path, lambda: 3)
    with pytest.raises(TypeError, match="model must be an nn.Module, a callable building one, or None"):
        fastinfer.load(path, 3)
    # a file holding one layer needs no model
    layer = Int8Linear.from_linear(nn.Linear(40, 24), activation="gelu")
    fastinfer.save(layer, tmp_path / "layer.safetensors")
    back = fastinfer.load(tmp_path / "layer.safetensors")
    xs = torch.randn(5, 40)
    assert type(back) is Int8Linear and back.activation == "gelu" and torch.equal(back(xs), layer(xs))


@pytest.mark.parametrize("fmt", ops.SPARSE_FORMATS)
def test_every_sparse_format_round_trips(tmp_path, fmt, isa):
    n, k = 48, 128
    dense = Int8Linear(k, n)
    dense.set_weight(sparse_int8(fmt, n, k, 0.3, seed=11), torch.rand(n, generator=torch.Generator().manual_seed(12)))
    dense.bias.uniform_(-1, 1)
    model = nn.Sequential(SparseInt8Linear.from_int8linear(dense, fmt), nn.ReLU())
    if fmt in ops.sparse.formats_for(torch.float32):
        lin = nn.Linear(n, 16)
        with torch.no_grad():
            lin.weight[:, ::2] = 0
        model.append(SparseLinear.from_linear(lin, fmt))
    fastinfer.save(model, tmp_path / "s.safetensors")
    skeleton = nn.Sequential(nn.Linear(k, n), nn.ReLU(), *([nn.Linear(n, 16)] if len(model) == 3 else []))
    loaded = fastinfer.load(tmp_path / "s.safetensors", skeleton)
    assert [type(m) for m in loaded] == [type(m) for m in model]
    assert loaded[0].format == fmt and torch.equal(loaded[0].weight_int8, model[0].weight_int8)
    x = torch.randn(7, k)
    assert torch.equal(loaded(x), model(x))


def test_conv1d_and_grouped_convs_round_trip(tmp_path, isa):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv1d(6, 12, 5, stride=2, padding="valid"), nn.Conv1d(12, 12, 3, padding=1, groups=3)).eval()
    q = fastinfer.quantize(model)
    assert all(type(m) is Int8Conv1d for m in q)
    fastinfer.save(q, tmp_path / "c.safetensors")
    loaded = fastinfer.load(tmp_path / "c.safetensors", nn.Sequential(nn.Conv1d(6, 12, 5, stride=2), nn.Conv1d(12, 12, 3, padding=1, groups=3)))
    x = torch.randn(2, 6, 33)
    assert torch.equal(loaded(x), q(x))
    q2 = fastinfer.quantize(nn.Sequential(nn.Conv2d(4, 6, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2)).eval())
    fastinfer.save(q2, tmp_path / "g.safetensors")
    loaded2 = fastinfer.load(tmp_path / "g.safetensors", nn.Sequential(nn.Conv2d(4, 6, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2)))
    x2 = torch.randn(2, 4, 9, 11).to(memory_format=torch.channels_last)
    assert torch.equal(loaded2(x2), q2(x2))


def test_shared_and_tied_modules_stay_shared(tmp_path):
    shared = nn.Linear(16, 16)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(16, 4))
    model[3].weight = nn.Parameter(model[3].weight.detach().clone())
    tied = nn.Sequential(nn.Embedding(10, 16), nn.Linear(16, 10, bias=False))
    tied[1].weight = tied[0].weight  # a float tied pair: stored once, loaded into both
    q = nn.ModuleDict({"mlp": fastinfer.quantize(model), "tied": tied})
    fastinfer.save(q, tmp_path / "t.safetensors")
    info = read_metadata(tmp_path / "t.safetensors")
    assert info["aliases"] == {"tied.1.weight": "tied.0.weight", "mlp.2.weight_int8": "mlp.0.weight_int8",
                               "mlp.2.weight_scale": "mlp.0.weight_scale", "mlp.2.bias": "mlp.0.bias"}  # fmt: skip
    skeleton = nn.ModuleDict({"mlp": (lambda s: nn.Sequential(s, nn.ReLU(), s, nn.Linear(16, 4)))(nn.Linear(16, 16)),
                              "tied": nn.Sequential(nn.Embedding(10, 16), nn.Linear(16, 10, bias=False))})  # fmt: skip
    skeleton["tied"][1].weight = skeleton["tied"][0].weight
    loaded = fastinfer.load(tmp_path / "t.safetensors", skeleton)
    assert loaded["mlp"][0] is loaded["mlp"][2] and type(loaded["mlp"][0]) is Int8Linear
    assert loaded["tied"][1].weight is loaded["tied"][0].weight
    x = torch.randn(3, 16)
    assert torch.equal(loaded["mlp"](x), q["mlp"](x))
    assert torch.equal(loaded["tied"](torch.tensor([1, 2])), tied(torch.tensor([1, 2])))


def test_hugging_face_models_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32)  # fmt: skip
    torch.manual_seed(0)
    bert = fastinfer.quantize(transformers.BertModel(cfg).eval())
    fastinfer.save(bert, tmp_path / "bert.safetensors")
    loaded = fastinfer.load(tmp_path / "bert.safetensors", lambda: transformers.BertModel(cfg))
    ids = torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(1))
    assert torch.equal(loaded(ids).last_hidden_state, bert(ids).last_hidden_state)
    gcfg = transformers.GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    gpt = fastinfer.quantize(transformers.GPT2LMHeadModel(gcfg).eval())
    fastinfer.save(gpt, tmp_path / "gpt2.safetensors")
    loaded = fastinfer.load(tmp_path / "gpt2.safetensors", lambda: transformers.GPT2LMHeadModel(gcfg))
    assert type(loaded.transformer.h[0].attn.c_attn) is Int8Linear  # from a transformers Conv1D
    ids = torch.randint(0, 100, (1, 7), generator=torch.Generator().manual_seed(2))
    assert torch.equal(loaded(ids).logits, gpt(ids).logits)


def test_a_float_model_round_trips_too(tmp_path):
    model = _net()
    fastinfer.save(model, tmp_path / "f.safetensors", metadata={"trained_on": "nothing"})
    assert read_metadata(tmp_path / "f.safetensors")["user"] == {"trained_on": "nothing"}
    loaded = fastinfer.load(tmp_path / "f.safetensors", _net(seed=4))
    x = _x()
    assert torch.equal(loaded(x), model(x))


def test_strict_false_loads_the_overlap(tmp_path):
    q = fastinfer.quantize(nn.Sequential(nn.Linear(8, 8), nn.ReLU()))
    fastinfer.save(q, tmp_path / "p.safetensors")
    bigger = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(FileFormatError, match=r"1 tensor\(s\)|2 tensor\(s\) of the model are not in the file \(2.weight, 2.bias\)"):
        fastinfer.load(tmp_path / "p.safetensors", bigger)
    kept = bigger[2].weight.detach().clone()
    loaded = fastinfer.load(tmp_path / "p.safetensors", bigger, strict=False)
    x = torch.randn(2, 8)
    assert torch.equal(loaded[0](x), q[0](x)) and torch.equal(loaded[2].weight, kept)


def test_a_failed_save_leaves_the_old_file(tmp_path):
    path = tmp_path / "keep.safetensors"
    fastinfer.save(nn.Linear(4, 4), path)
    before = path.read_bytes()
    with torch.device("meta"):
        empty = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="'weight' is on the meta device"):
        fastinfer.save(empty, path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["keep.safetensors"]
    with pytest.raises(TypeError, match="expects an nn.Module"):
        fastinfer.save({"a": torch.ones(1)}, path)


def test_lower_isa_in_a_fresh_interpreter_gives_the_same_outputs(tmp_path):
    """The file is portable: loaded in a new process with FASTINFER_ISA forcing each lower ISA, the
    layers re-pack for it and give exactly what the same ISA gives on the model that was saved."""
    q = _quantized()
    fastinfer.save(q, tmp_path / "net.safetensors")
    x = _x()
    expected = {"x": x}
    for isa in ISAS:
        fastinfer.set_isa(isa)
        expected[isa] = q(x)
    save_file(expected, str(tmp_path / "expected.safetensors"))
    for isa in ISAS[:-1] or ISAS:
        r = run_python(f"""
            import sys, torch, fastinfer
            from safetensors.torch import load_file
            sys.path.insert(0, {os.path.dirname(__file__)!r})
            from test_io import _net
            assert fastinfer.info()["isa"] == {isa!r}, fastinfer.info()["isa"]
            exp = load_file({str(tmp_path / 'expected.safetensors')!r})
            model = fastinfer.load({str(tmp_path / 'net.safetensors')!r}, _net(seed=9))
            print("same" if torch.equal(model(exp["x"]), exp[{isa!r}]) else "DIFFERENT")
        """, env={"FASTINFER_ISA": isa})  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.strip().endswith("same"), (isa, r.stdout, r.stderr[-1000:])


# ------------------------------------------------------------------------------ damaged and edited files


def _split(raw: bytes) -> tuple[dict, bytearray]:
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), bytearray(raw[8 + n :])


def _join(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return len(h).to_bytes(8, "little") + h + bytes(data)


def _edit_info(raw: bytes, fn) -> bytes:
    header, data = _split(raw)
    info = json.loads(header["__metadata__"]["fastinfer"])
    fn(info)
    header["__metadata__"]["fastinfer"] = json.dumps(info)
    return _join(header, data)


def _edit_tensor(raw: bytes, key: str, fn, fix_crc: bool) -> bytes:
    """fn(bytearray of the tensor's bytes) edits them in place; fix_crc=True recomputes the file's
    checksum (a deliberate edit that the layer's own validation must catch)."""
    header, data = _split(raw)
    start, end = header[key]["data_offsets"]
    chunk = bytearray(data[start:end])
    fn(chunk)
    data[start:end] = chunk
    if fix_crc:
        info = json.loads(header["__metadata__"]["fastinfer"])
        info["crc32"][key] = zlib.crc32(bytes(chunk))
        header["__metadata__"]["fastinfer"] = json.dumps(info)
    return _join(header, data)


def _edit_header(raw: bytes, fn) -> bytes:
    header, data = _split(raw)
    fn(header)
    return _join(header, data)


def _swap_offsets(h: dict, a: str, b: str) -> None:
    h[a]["data_offsets"], h[b]["data_offsets"] = h[b]["data_offsets"], h[a]["data_offsets"]


def _drop_tensor(raw: bytes, key: str) -> bytes:
    """The file rewritten without one tensor (and its checksum): a well-formed file that lacks it."""
    import safetensors.torch

    header, _ = _split(raw)
    tensors = safetensors.torch.load(raw)
    del tensors[key]
    info = json.loads(header["__metadata__"]["fastinfer"])
    del info["crc32"][key]
    return safetensors.torch.save(tensors, metadata={**header["__metadata__"], "fastinfer": json.dumps(info)})


def _nan_scale(chunk: bytearray) -> None:
    chunk[0:4] = bytes.fromhex("0000c07f")  # a float32 NaN


def _ell_index_out_of_range(chunk: bytearray) -> None:
    chunk[192] = 64  # the first step's window holds input 64 of a 64-input window (test_sparse's tamper)


def _battery(raw: bytes) -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, regex the error must match)."""
    n = int.from_bytes(raw[:8], "little")
    header, _ = _split(raw)
    bad_json = raw[:8] + raw[8 : 8 + n].replace(b'"dtype"', b'"dtype', 1) + raw[8 + n :]
    cases = {
        "empty file": (b"", "not a readable safetensors file"),
        "cut in the length": (raw[:5], "not a readable safetensors file"),
        "cut in the header": (raw[: 8 + n // 2], "not a readable safetensors file"),
        "cut in the data": (raw[: 8 + n + (len(raw) - 8 - n) // 2], "not a readable safetensors file"),
        "last byte cut": (raw[:-1], "not a readable safetensors file"),
        "header length 2^60": ((1 << 60).to_bytes(8, "little") + raw[8:], "not a readable safetensors file"),
        "header JSON broken": (bad_json, "not a readable safetensors file"),
        "offsets out of range": (_edit_header(raw, lambda h: h["fc1.bias"].update(data_offsets=[0, 1 << 40])),
                                 "not a readable safetensors file"),
        "dtype edited (same size)": (_edit_header(raw, lambda h: h["fc1.weight_int8"].update(dtype="U8")),
                                     r"tensor 'fc1.weight_int8' \(layer 'fc1'\) is U8 \[64, 8\] in the file, the model expects I8"),
        "shape edited (same size)": (_edit_header(raw, lambda h: h["fc1.weight_int8"].update(shape=[8, 64])),
                                     r"'fc1.weight_int8' \(layer 'fc1'\) is I8 \[8, 64\] in the file, the model expects I8 \[64, 8\]"),
        "offsets of two tensors swapped": (_edit_header(raw, lambda h: _swap_offsets(h, "fc1.weight_scale", "fc1.bias")),
                                           r"tensor 'fc1\.(weight_scale|bias)' \(layer 'fc1'\) fails its checksum"),
        "a weight byte flipped": (_edit_tensor(raw, "conv.0.weight_int8", lambda c: c.__setitem__(5, c[5] ^ 1), False),
                                  r"'conv.0.weight_int8' \(layer 'conv.0'\) fails its checksum"),
        "a tensor removed": (_drop_tensor(raw, "norm.bias"),
                             r"1 tensor\(s\) of the model are not in the file \(norm.bias\)"),
        "not a fastinfer file": (_edit_header(raw, lambda h: h["__metadata__"].pop("fastinfer")),
                                 "without fastinfer metadata"),
        "metadata JSON broken": (_edit_header(raw, lambda h: h["__metadata__"].update(fastinfer="{")),
                                 "fastinfer metadata is not valid JSON"),
        "newer format": (_edit_info(raw, lambda i: i.update(format_version=99)), "in file format 99; this fastinfer"),
        "unknown layer kind": (_edit_info(raw, lambda i: i["layers"]["fc1"].update(kind="Int4Linear")),
                               r"layer 'fc1': unknown layer kind 'Int4Linear'"),
        "config of the wrong type": (_edit_info(raw, lambda i: i["layers"]["fc1"]["config"].update(in_features="8")),
                                     r"layer 'fc1': config in_features='8' has the wrong type"),
        "config that cannot build": (_edit_info(raw, lambda i: i["layers"]["dw"]["config"].update(activation="tanh")),
                                     r"layer 'dw': its config cannot build a DepthwiseConv2d"),
        "config for another shape": (_edit_info(raw, lambda i: i["layers"]["fc1"]["config"].update(out_features=65)),
                                     r"layer 'fc1': the file holds Int8Linear\(in_features=8, out_features=65.*the model has Linear"),
        "layer at a missing name": (_edit_info(raw, lambda i: i["layers"].update({"head.out": i["layers"]["fc1"]})),
                                    r"layer 'head.out' \(Int8Linear\) has no module at that name"),
        "alias to nothing": (_edit_info(raw, lambda i: i["aliases"].update({"x.weight": "nope"})),
                             r"alias 'x.weight' -> 'nope' does not name a stored tensor"),
        "checksums missing": (_edit_info(raw, lambda i: i["crc32"].pop("fc1.bias")), "checksums do not cover"),
        "sparse index out of range (checksum fixed)": (
            _edit_tensor(raw, "fc2.sparse_weight", _ell_index_out_of_range, True),
            r"layer 'fc2' \(SparseInt8Linear\): fc2.sparse_weight: not a valid fastinfer sparse weight.*index out of range"),
        "NaN scale (checksum fixed)": (_edit_tensor(raw, "fc1.weight_scale", _nan_scale, True),
                                       r"layer 'fc1' \(Int8Linear\): fc1.weight_scale: scales must be finite"),
        "NaN conv scale (checksum fixed)": (_edit_tensor(raw, "conv.0.weight_scale", _nan_scale, True),
                                            r"layer 'conv.0' \(Int8Conv2d\): conv.0.weight_scale: scales must be finite"),
    }  # fmt: skip
    assert "fc2.sparse_weight" in header
    return cases


def test_damaged_or_edited_files_raise_clear_errors_in_a_child(tmp_path):
    q = _quantized()
    good = tmp_path / "good.safetensors"
    fastinfer.save(q, good)
    raw = good.read_bytes()
    cases = _battery(raw)
    names = {}
    for i, (name, (data, _)) in enumerate(cases.items()):
        (tmp_path / f"case{i}.safetensors").write_bytes(data)
        names[i] = name
    save_file({"x": _x(), "y": q(_x())}, str(tmp_path / "expected.safetensors"))
    # plus: the right file for the wrong model, and a file that is no file
    r = run_python(f"""
        import sys, torch, fastinfer
        from safetensors.torch import load_file
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_io import _net
        d = {str(tmp_path)!r}
        exp = load_file(d + "/expected.safetensors")
        ok = fastinfer.load(d + "/good.safetensors", _net(seed=2))
        print("good:", "same" if torch.equal(ok(exp["x"]), exp["y"]) else "DIFFERENT", flush=True)
        def attempt(label, path, model):
            try:
                fastinfer.load(path, model)
                print(label, "|| LOADED", flush=True)
            except Exception as e:
                print(label, "||", type(e).__name__, "||", str(e).replace(chr(10), " "), flush=True)
        for i in range({len(cases)}):
            attempt(f"case{{i}}", f"{{d}}/case{{i}}.safetensors", _net(seed=2))
        attempt("wrong model", d + "/good.safetensors", _net(seed=2, hidden=24))
        attempt("a directory", d, _net(seed=2))
    """)  # fmt: skip
    assert r.returncode == 0, f"the child died (exit {r.returncode}): {r.stdout[-3000:]} {r.stderr[-3000:]}"
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "good: same"
    results = dict(line.split(" || ", 1) for line in lines[1:])
    for i, name in names.items():
        outcome = results[f"case{i}"]
        assert re.search(cases[name][1], outcome), f"{name}: {outcome}"
        assert outcome.startswith("FileFormatError"), f"{name}: {outcome}"
    assert re.match(r"FileFormatError \|\| .*layer 'fc2': the file holds SparseInt8Linear\(in_features=64, out_features=16, "
                    r".*the model has Linear\(in_features=64, out_features=24, bias=True\) there: the file is for another model",
                    results["wrong model"]), results["wrong model"]  # fmt: skip
    assert results["a directory"].startswith("FileNotFoundError || fastinfer.load: no file at"), results["a directory"]
    assert len(cases) >= 20


# ------------------------------------------------------------------------------- Hugging Face folders


def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32, architectures=["BertModel"])  # fmt: skip
    torch.manual_seed(0)
    return transformers, transformers.BertModel(cfg).eval()


def test_hf_folder_round_trip_bert_and_gpt2(tmp_path):
    transformers, bert = _tiny_bert()
    q = fastinfer.quantize(bert)
    mark = dict(q.config.quantization_config)  # quantize's (tests below: transformers' loader refuses it)
    fastinfer.save_pretrained(q, tmp_path / "bert")
    assert sorted(p.name for p in (tmp_path / "bert").iterdir()) == ["config.json", "fastinfer.safetensors"]
    assert q.config.quantization_config == mark  # the model's own config is left as it was
    loaded = fastinfer.from_pretrained(tmp_path / "bert")  # the class from config.json's architectures
    assert type(loaded) is transformers.BertModel
    ids = torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(1))
    assert torch.equal(loaded(ids).last_hidden_state, q(ids).last_hidden_state)
    gcfg = transformers.GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    gpt = fastinfer.quantize(transformers.GPT2LMHeadModel(gcfg).eval())
    fastinfer.save_pretrained(gpt, tmp_path / "gpt2")
    loaded = fastinfer.from_pretrained(tmp_path / "gpt2", transformers.AutoModelForCausalLM)
    ids = torch.randint(0, 100, (1, 7), generator=torch.Generator().manual_seed(2))
    assert torch.equal(loaded(ids).logits, gpt(ids).logits)
    out = loaded.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(out, gpt.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0))


def test_transformers_own_from_pretrained_does_not_silently_load_floats(tmp_path):
    transformers, bert = _tiny_bert()
    q = fastinfer.quantize(bert)
    fastinfer.save_pretrained(q, tmp_path / "ours")
    # refused: by the "fastinfer" quantization method where fastinfer is imported (here), else for
    # the missing float weights file
    with pytest.raises(ValueError, match="converted by fastinfer"):
        transformers.BertModel.from_pretrained(tmp_path / "ours")
    # the other way round: transformers' save_pretrained of a fastinfer model, refused with the way out
    q.save_pretrained(tmp_path / "theirs")
    with pytest.raises(FileFormatError, match=r"written by transformers' save_pretrained from a fastinfer model.*"
                                              r"fastinfer.save_pretrained"):  # fmt: skip
        fastinfer.from_pretrained(tmp_path / "theirs")
    with pytest.raises(TypeError, match="expects a transformers model"):
        fastinfer.save_pretrained(nn.Linear(2, 2), tmp_path / "x")
    with pytest.raises(FileExistsError, match="already holds a model.safetensors"):
        fastinfer.save_pretrained(q, tmp_path / "theirs")


# -------------------------------------------------------------------------------- fastinfer optimize


def test_cli_optimize_conv_handoff(tmp_path):
    (tmp_path / "mymodels.py").write_text(
        "import torch\nfrom fastinfer.bench import cnn\n\n"
        "def block():\n    torch.manual_seed(0)\n"
        "    return cnn.settle_batchnorm(torch.nn.Sequential(cnn.conv_bn_act(3, 16), cnn.InvertedResidual(16, 16, 1, 6)), size=16)\n"
    )
    env = {"PYTHONPATH": str(tmp_path)}
    for flag, want in (("u8", torch.uint8), ("off", None)):
        out = tmp_path / f"{flag}.safetensors"
        r = run_python(f"import sys; from fastinfer.cli import main; sys.exit(main(['optimize', 'mymodels:block', '--out', "
                       f"{str(out)!r}, '--conv-handoff', {flag!r}, '--no-progress']))", env=env)  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        from fastinfer.bench import cnn

        loaded = fastinfer.load(out, nn.Sequential(cnn.conv_bn_act(3, 16), cnn.InvertedResidual(16, 16, 1, 6)))
        assert loaded[1].conv[0][0].output_dtype == want and loaded[1].conv[1][0].output_dtype == want


def test_cli_optimize_module_function_and_hf_folder(tmp_path):
    (tmp_path / "mymodels.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "def small():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32)).eval()\n"
    )
    out = tmp_path / "small.safetensors"
    env = {"PYTHONPATH": str(tmp_path)}
    r = run_python(f"import sys; from fastinfer.cli import main; sys.exit(main(['optimize', 'mymodels:small', '--out', {str(out)!r}]))", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "layer  was     now         detail\n0      Linear  Int8Linear  gelu fused\n" in r.stdout, r.stdout
    assert re.search(rf"written {re.escape(str(out))}: [0-9.]+ KiB \(the float state_dict: [0-9.]+ KiB\)", r.stdout), r.stdout
    torch.manual_seed(0)
    ref = fastinfer.quantize(nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32)).eval())
    loaded = fastinfer.load(out, nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32)))
    x = torch.randn(4, 64)
    assert torch.equal(loaded(x), ref(x))
    # pruned + sparse: the report lists the sparsity of each layer
    r = run_python(f"import sys; from fastinfer.cli import main; sys.exit(main(['optimize', 'mymodels:small', '--out', "
                   f"{str(tmp_path / 'sparse.safetensors')!r}, '--sparsity', '0.9']))", env=env)  # fmt: skip
    assert r.returncode == 0 and "sparsity 90.00%" in r.stdout, (r.stdout, r.stderr[-2000:])
    r = run_python("import sys; from fastinfer.cli import main; sys.exit(main(['optimize', 'mymodels:nothing', '--out', 'x']))", env=env)
    assert r.returncode != 0 and "cannot find 'mymodels:nothing'" in r.stderr
    transformers, bert = _tiny_bert()
    bert.save_pretrained(tmp_path / "bert-float")
    r = run_python(f"import sys; from fastinfer.cli import main; sys.exit(main(['optimize', {str(tmp_path / 'bert-float')!r}, "
                   f"'--out', {str(tmp_path / 'bert-int8')!r}]))")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    loaded = fastinfer.from_pretrained(tmp_path / "bert-int8")
    ref = fastinfer.quantize(transformers.BertModel.from_pretrained(tmp_path / "bert-float").eval())
    ids = torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(1))
    assert torch.equal(loaded(ids).last_hidden_state, ref(ids).last_hidden_state)
    # --attention bf16: the folder names the bf16 attention and loads with it
    r = run_python(f"import sys; from fastinfer.cli import main; sys.exit(main(['optimize', {str(tmp_path / 'bert-float')!r}, "
                   f"'--out', {str(tmp_path / 'bert-bf16')!r}, '--attention', 'bf16']))")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    loaded = fastinfer.from_pretrained(tmp_path / "bert-bf16")
    if fastinfer.ops.attention_native():
        assert loaded.config._attn_implementation == "fastinfer_bf16"
    ref = fastinfer.quantize(transformers.BertModel.from_pretrained(tmp_path / "bert-float").eval(),
                             fastinfer.QuantConfig(attention="bf16"))  # fmt: skip
    assert torch.equal(loaded(ids).last_hidden_state, ref(ids).last_hidden_state)


def test_cli_optimize_plan_and_weight_only(tmp_path):
    """--plan measures per layer and prints fastinfer.report; --activations none builds weight-only
    layers; both files load back to the model that was printed."""
    (tmp_path / "mymodels.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "def small():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32)).eval()\n"
    )
    env = {"PYTHONPATH": str(tmp_path)}
    out = tmp_path / "wo.safetensors"
    r = run_python(f"import sys; from fastinfer.cli import main; sys.exit(main(['optimize', 'mymodels:small', '--out', "
                   f"{str(out)!r}, '--activations', 'none']))", env=env)  # fmt: skip
    assert r.returncode == 0 and "0      Linear  WeightOnlyInt8Linear  weight-only; gelu fused" in r.stdout, (r.stdout, r.stderr[-2000:])
    from fastinfer.nn import WeightOnlyInt8Linear

    loaded = fastinfer.load(out, nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32)))
    assert type(loaded[0]) is WeightOnlyInt8Linear
    out = tmp_path / "plan.safetensors"
    r = run_python(f"import sys; from fastinfer.cli import main; sys.exit(main(['optimize', 'mymodels:small', '--out', "
                   f"{str(out)!r}, '--plan', '4x64', '--no-progress']))", env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert lines[0].startswith("| layer | module | kernel |") and lines[2].startswith("| 0 | ") and "| 4x64 float32 |" in lines[2]
    assert re.search(r"measured layers [0-9.]+ ms float -> [0-9.]+ ms", r.stdout), r.stdout
    module = lines[2].split(" | ")[1]
    loaded = fastinfer.load(out, nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32)))
    assert type(loaded[0]).__name__ == module
    r = run_python("import sys; from fastinfer.cli import main; sys.exit(main(['optimize', 'mymodels:small', '--out', "
                   "'x.safetensors', '--plan', '4xq']))", env=env)  # fmt: skip
    assert r.returncode != 0 and "--plan takes a shape" in r.stderr
    transformers, bert = _tiny_bert()
    bert.save_pretrained(tmp_path / "bert-float")
    r = run_python(f"import sys; from fastinfer.cli import main; sys.exit(main(['optimize', {str(tmp_path / 'bert-float')!r}, "
                   f"'--out', {str(tmp_path / 'bert-plan')!r}, '--plan', '2x9', '--no-progress']))")  # fmt: skip
    assert r.returncode == 0 and "encoder.layer.0.attention.self.query" in r.stdout, r.stderr[-2000:]
    loaded = fastinfer.from_pretrained(tmp_path / "bert-plan")
    ids = torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.isfinite(loaded(ids).last_hidden_state).all()


# ------------------------------------------------------------------------------------- fastinfer demo


def test_demo_chart_is_a_png_of_every_timed_peer(tmp_path):
    pytest.importorskip("matplotlib")
    from fastinfer.cli import write_chart

    results = [{"case": "MiniLM 8x128", "rows": [{"peer": "fp32", "vs fp32": 1.0, "cos_mean": 1.0},
                                                  {"peer": "fastinfer", "vs fp32": 3.3, "cos_mean": 0.9977},
                                                  {"peer": "untimed", "cos_mean": 0.99}]},
               {"case": "noisy", "rows": [{"peer": "fp32", "cos_mean": 1.0}]}]  # fmt: skip
    path = write_chart(results, str(tmp_path / "c.png"))
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    r = run_python(f"import sys; from fastinfer.cli import main; sys.exit(main(['demo', '--image-size', '64', "
                   f"'--no-progress', '--chart', {str(tmp_path / 'd.png')!r}]))", timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "## MobileNetV2 b16 64x64" in r.stdout and "| fastinfer |" in r.stdout and "chart of speed vs fidelity" in r.stdout
    assert (tmp_path / "d.png").stat().st_size > 5000


def test_demo_on_a_model_folder(tmp_path):
    """fastinfer demo --model FOLDER: an encoder folder and a causal LM folder, every peer in the table."""
    transformers, bert = _tiny_bert()
    bert.save_pretrained(tmp_path / "bert")
    torch.manual_seed(0)
    gpt = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=120, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                                               architectures=["GPT2LMHeadModel"])).eval()  # fmt: skip
    gpt.save_pretrained(tmp_path / "gpt")
    for folder, case in (("bert", "## bert 2x8"), ("gpt", "## gpt generate b1 8+16")):
        shape = "2x8" if folder == "bert" else "1x8"
        r = run_python(f"import sys; from fastinfer.cli import main; sys.exit(main(['demo', '--model', {str(tmp_path / folder)!r}, "
                       f"'--shape', {shape!r}, '--no-progress', '--chart', '']))", timeout=600)  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        assert case in r.stdout, r.stdout[:3000]
        for peer in ("| fp32 |", "| fastinfer |", "| fastinfer weight-only |", "| fastinfer smoothquant |", "| fastinfer optimize |"):
            assert peer in r.stdout, (peer, r.stdout[:3000])
    r = run_python(f"import sys; from fastinfer.cli import main; sys.exit(main(['demo', '--model', {str(tmp_path)!r}]))")
    assert r.returncode == 2 and "not a transformers model folder" in r.stderr
    r = run_python(f"import sys; from fastinfer.cli import main; sys.exit(main(['demo', '--model', {str(tmp_path / 'bert')!r}, '--shape', '8']))")
    assert r.returncode == 2 and "--shape must be BATCHxTOKENS" in r.stderr


def test_transformers_round_trip_of_a_converted_model_is_refused_not_random(tmp_path):
    """transformers' save_pretrained then from_pretrained of a converted model used to return a
    float model whose int8 layers were 'newly initialized' (random), with a warning only. quantize()
    and load() mark the config and fastinfer registers a quantization method that refuses."""
    transformers, bert = _tiny_bert()
    q = fastinfer.quantize(bert)
    assert q.config.quantization_config["quant_method"] == "fastinfer"
    assert "quantization_config" not in bert.config.__dict__  # the float original is not marked
    q.save_pretrained(tmp_path / "theirs")
    with pytest.raises(ValueError, match=r"converted by fastinfer.*fastinfer.save_pretrained"):
        transformers.BertModel.from_pretrained(tmp_path / "theirs")
    fastinfer.save(q, tmp_path / "m.safetensors")
    loaded = fastinfer.load(tmp_path / "m.safetensors", lambda: _tiny_bert()[1])
    assert loaded.config.quantization_config["quant_method"] == "fastinfer"
    # nothing converted: nothing marked (an attention-only switch saves as a plain float model)
    plain = fastinfer.quantize(bert, fastinfer.QuantConfig(skip=["*"]))
    assert "quantization_config" not in plain.config.__dict__
    fastinfer.save_pretrained(q, tmp_path / "ours")  # and our own folders keep working
    assert fastinfer.from_pretrained(tmp_path / "ours", transformers.BertModel).config.quantization_config["quant_method"] == "fastinfer"
    # a process that never imported fastinfer: our folder still fails (no float weights file), the
    # one transformers wrote loads with a warning only (nothing of ours runs there)
    r = run_python(f"""
        import transformers
        try:
            transformers.BertModel.from_pretrained({str(tmp_path / "ours")!r})
        except OSError as e:
            print("refused", "model.safetensors" in str(e))
        """)
    assert r.returncode == 0 and "refused True" in r.stdout, (r.stdout, r.stderr[-800:])


def test_cli_optimize_static_with_calibration_file(tmp_path):
    """--activations static (and --smoothquant) read their calibration inputs from a safetensors
    file; the written model loads back to the one quantize() gives on the same batches."""
    from safetensors.torch import save_file

    from fastinfer.nn import StaticInt8Linear

    (tmp_path / "mymodels.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "def small():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32)).eval()\n"
    )
    env = {"PYTHONPATH": str(tmp_path)}
    calib = torch.randn(20, 64, generator=torch.Generator().manual_seed(3))
    save_file({"x": calib}, tmp_path / "calib.safetensors")
    out = tmp_path / "static.safetensors"
    r = run_python(f"import sys; from fastinfer.cli import main; sys.exit(main(['optimize', 'mymodels:small', '--out', "
                   f"{str(out)!r}, '--activations', 'static', '--smoothquant', '0.5', '--calibration', "
                   f"{str(tmp_path / 'calib.safetensors')!r}, '--calibration-batch', '8']))", env=env)  # fmt: skip
    assert r.returncode == 0, (r.stdout, r.stderr[-2000:])
    assert re.search(r"0      Linear  StaticInt8Linear  static \(input scale [0-9.e-]+\); gelu fused; SmoothQuant", r.stdout), r.stdout
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32)).eval()
    ref = fastinfer.quantize(model, fastinfer.QuantConfig(activations="static", smoothquant=0.5),
                             calibration_data=[calib[:8], calib[8:16], calib[16:]])  # fmt: skip
    loaded = fastinfer.load(out, copy.deepcopy(model))
    assert type(loaded[0]) is StaticInt8Linear and torch.equal(loaded[0].x_scale, ref[0].x_scale)
    x = torch.randn(4, 64)
    assert torch.equal(loaded(x), ref(x))
    r = run_python(f"import sys; from fastinfer.cli import main; sys.exit(main(['optimize', 'mymodels:small', '--out', "
                   f"{str(out)!r}, '--activations', 'static']))", env=env)  # fmt: skip
    assert r.returncode != 0 and "needs --calibration FILE" in r.stderr
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    r = run_python(f"import sys; from fastinfer.cli import main; sys.exit(main(['optimize', 'mymodels:small', '--out', "
                   f"{str(out)!r}, '--activations', 'static', '--calibration', {str(tmp_path / 'junk.safetensors')!r}]))", env=env)  # fmt: skip
    assert r.returncode != 0 and "not a readable safetensors file" in r.stderr, r.stderr[-2000:]
    # a transformers folder: the file's tensors are the model's keyword inputs
    transformers, bert = _tiny_bert()
    bert.save_pretrained(tmp_path / "bert-float")
    ids = torch.randint(0, 120, (6, 9), generator=torch.Generator().manual_seed(4))
    save_file({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, tmp_path / "ids.safetensors")
    r = run_python(f"import sys; from fastinfer.cli import main; sys.exit(main(['optimize', {str(tmp_path / 'bert-float')!r}, "
                   f"'--out', {str(tmp_path / 'bert-static')!r}, '--activations', 'static', '--calibration', "
                   f"{str(tmp_path / 'ids.safetensors')!r}, '--no-progress']))")  # fmt: skip
    assert r.returncode == 0 and "StaticInt8Linear" in r.stdout, r.stderr[-2000:]
    loaded = fastinfer.from_pretrained(tmp_path / "bert-static")
    assert sum(type(m) is StaticInt8Linear for m in loaded.modules()) > 0
