"""A residual added in the int8 conv's epilogue (act(conv(x) + b + residual), rounded once), and
the block rewrite that uses it: quantize() traces a ResNet / MobileNet block with torch.fx and
moves its conv -> add -> activation (and a shared ReLU module) into the convs' epilogues. Equal to
the unfused path bit for bit in float32, every ISA alike; files, compile, hooks, gradients."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastinfer
from conftest import assert_same, sqnr
from fastinfer import ops
from fastinfer.bench import cnn
from fastinfer.nn import Int8Conv2d

FP32, BF16, CL = torch.float32, torch.bfloat16, torch.channels_last
SHAPES = [(1, 64, 96, 1, 0), (3, 20, 37, 2, 1), (1, 3, 5, 1, 0), (3, 16, 16, 1, 1), (5, 8, 24, 1, 2)]


def _conv_args(k, cin, cout, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-127, 128, (cout, cin, k, k), dtype=torch.int8, generator=g)
    return ops.pack_conv_weight(w), torch.rand(cout, generator=g) * 0.01, torch.randn(cout, generator=g)


def _op(x, packed, scale, bias, k, stride, pad, act=0, out_dtype=None, residual=None):
    return torch.ops.fastinfer.int8_conv2d(x, packed, scale, bias, [k, k], [stride, stride], [pad] * 4, [1, 1], 1,
                                           act, out_dtype, residual)  # fmt: skip


@pytest.mark.parametrize("act", [0, 2, 3, 4])
@pytest.mark.parametrize("k,cin,cout,stride,pad", SHAPES)
def test_residual_in_the_epilogue_equals_the_unfused_sum(isa, k, cin, cout, stride, pad, act):
    """float32: act(conv + r) equals torch's act(conv(x) + r) bit for bit (both one fp32 add);
    bfloat16: the fp32 sum of the conv's fp32 output and r, activated, rounded once."""
    packed, scale, bias = _conv_args(k, cin, cout, seed=k * 100 + cin)
    x = torch.randn(3, cin, 11, 13).contiguous(memory_format=CL)
    y = _op(x, packed, scale, bias, k, stride, pad)
    r = torch.randn_like(y) * 3
    act_fn = {0: lambda t: t, 2: torch.relu, 3: lambda t: F.hardtanh(t, 0, 6), 4: None}[act]
    fused = _op(x, packed, scale, bias, k, stride, pad, act, None, r)
    if act_fn is not None:
        assert_same(fused, act_fn(y + r), "float32")
    else:  # silu: the epilogue's own formula, on the same sum
        assert_same(fused, _op(x, packed, scale, bias + 0.0, k, stride, pad, 4, None, r), "float32 silu, twice")
    xb, rb = x.bfloat16(), r.bfloat16()
    y32 = _op(xb, packed, scale, bias, k, stride, pad, 0, FP32)  # the fp32 epilogue of the bf16 input
    fb = _op(xb, packed, scale, bias, k, stride, pad, act, None, rb)
    assert fb.dtype == BF16 and fb.is_contiguous(memory_format=CL) == x.is_contiguous(memory_format=CL)
    if act_fn is not None:
        assert_same(fb, act_fn(y32 + rb.float()).bfloat16(), "bfloat16: rounded once")


def test_every_isa_gives_the_same_bits():
    packed, scale, bias = _conv_args(3, 24, 40, seed=5)
    x = torch.randn(2, 24, 15, 9).bfloat16().contiguous(memory_format=CL)
    r = torch.randn(2, 40, 15, 9).bfloat16().contiguous(memory_format=CL)
    outs = {}
    for isa in fastinfer.available_isas():
        fastinfer.set_isa(isa)
        outs[isa] = _op(x, packed, scale, bias, 3, 1, 1, 2, None, r)
    first = next(iter(outs.values()))
    for isa, out in outs.items():
        assert torch.equal(out, first), isa


def test_residual_checks_and_empty_images():
    packed, scale, bias = _conv_args(1, 8, 16, seed=1)
    x = torch.randn(2, 8, 4, 4)
    r = torch.randn(2, 16, 4, 4)
    with pytest.raises(ValueError, match="output's shape"):
        _op(x, packed, scale, bias, 1, 1, 0, 2, None, r[:, :, :3])
    with pytest.raises(TypeError, match="output's dtype"):
        _op(x, packed, scale, bias, 1, 1, 0, 2, None, r.bfloat16())
    with pytest.raises(TypeError, match="output's dtype"):
        _op(x, packed, scale, bias, 1, 1, 0, 3, torch.uint8, r)
    dw = ops.pack_conv_weight(torch.ones(8, 1, 3, 3, dtype=torch.int8), 8)
    with pytest.raises(ValueError, match="depthwise"):
        torch.ops.fastinfer.int8_conv2d(x, dw, torch.ones(8), None, [3, 3], [1, 1], [1] * 4, [1, 1], 8, 0, None,
                                        torch.randn(2, 8, 4, 4))  # fmt: skip
    empty = torch.zeros(2, 0, 4, 4)  # no input channels: act(bias + r) everywhere
    p0 = ops.pack_conv_weight(torch.zeros(16, 0, 1, 1, dtype=torch.int8))
    assert_same(_op(empty, p0, scale, bias, 1, 1, 0, 2, None, r), torch.relu(bias[None, :, None, None] + r))


def test_gradients_reach_x_and_the_residual():
    packed, scale, bias = _conv_args(3, 6, 10, seed=2)
    x = torch.randn(2, 6, 7, 7, requires_grad=True)
    r = torch.randn(2, 10, 7, 7, requires_grad=True)
    out = _op(x, packed, scale, bias, 3, 1, 1, 2, None, r)
    out.sum().backward()
    mask = (out > 0).float()
    assert torch.equal(r.grad, mask), "d out / d r: relu's mask"
    x2 = x.detach().clone().requires_grad_()
    _op(x2, packed, scale, bias, 3, 1, 1, 2, None, r.detach()).sum().backward()
    assert torch.equal(x.grad, x2.grad)


def test_opcheck_and_compile():
    packed, scale, bias = _conv_args(3, 6, 10, seed=3)
    x = torch.randn(2, 6, 7, 7).contiguous(memory_format=CL)
    r = torch.randn(2, 10, 7, 7).contiguous(memory_format=CL)
    args = (x, packed, scale, bias, [3, 3], [1, 1], [1] * 4, [1, 1], 1, 2, None, r)
    torch.library.opcheck(torch.ops.fastinfer.int8_conv2d.default, args)
    f = torch.compile(lambda a, b: _op(a, packed, scale, bias, 3, 1, 1, 2, None, b), fullgraph=True)
    assert_same(f(x, r), _op(x, packed, scale, bias, 3, 1, 1, 2, None, r))


def test_layer_residual_and_its_fallback():
    torch.manual_seed(4)
    conv = Int8Conv2d.from_conv(nn.Conv2d(8, 16, 3, padding=1))
    plain = Int8Conv2d.from_conv(conv_f := nn.Conv2d(8, 16, 3, padding=1))
    plain.set_weight(conv.weight_int8, conv.weight_scale)
    plain.bias.copy_(conv.bias)
    conv.activation = "relu"
    x = torch.randn(2, 8, 6, 6)
    r = torch.randn(2, 16, 6, 6)
    assert_same(conv(x, r), torch.relu(plain(x) + r), "in the kernel")
    assert_same(conv(x[0], r[0]), torch.relu(plain(x[:1]) + r[:1])[0], "unbatched")
    # another dtype, or a broadcast residual: torch's add after the conv, as the unfused block
    assert_same(conv(x.bfloat16(), r), torch.relu(plain(x.bfloat16()) + r), "bf16 output + fp32 residual")
    assert_same(conv(x, r[:, :1]), torch.relu(plain(x) + r[:, :1]), "broadcast")
    assert_same(conv(x, 1.5 * torch.ones(())), torch.relu(plain(x) + 1.5), "a 0-d residual")
    del conv_f


# ------------------------------------------------------------------------------ block rewrite


class _Functional(nn.Module):
    """A BasicBlock written with functional relu and `+=`."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.b = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        out = F.relu(self.bn(self.a(x)))
        out = self.b(out)
        out += x
        return F.relu(out)


class _Branchy(nn.Module):
    """Data-dependent control flow: fx cannot trace it, so it is left as it is."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(16, 16, 1)
        self.relu = nn.ReLU()

    def forward(self, x):
        y = self.a(x)
        return self.relu(y + x) if bool(x.sum() > 0) else self.relu(y)


class _Reuses(nn.Module):
    """The conv's output also leaves the block: the add cannot be moved into it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(16, 16, 1)

    def forward(self, x):
        y = self.a(x)
        return torch.relu(y + x), y


def _unrewritten(model):
    return fastinfer.quantize(model, fastinfer.QuantConfig(rewrite_blocks=False))


@pytest.mark.parametrize("build", [cnn.resnet18, cnn.mobilenet_v2])
def test_rewritten_models_equal_the_unfused_ones_in_float32(build):
    torch.manual_seed(0)
    model = build(num_classes=10).eval().to(memory_format=CL)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=CL)
    q, q0 = fastinfer.quantize(model), _unrewritten(model)
    report = fastinfer.conversion_report(q)
    rows = {r.name: r.detail for r in report}
    rewritten = [n for n, d in rows.items() if "rewritten with torch.fx" in d]
    if build is cnn.resnet18:
        assert len(rewritten) == 16 and "residual add + relu fused" in rows["layer1.0.conv2"]
        assert "relu fused" in rows["layer1.0.conv1"] and type(q.layer1[0]).__name__ == "BasicBlock"
        assert isinstance(q.layer1[0], torch.fx.GraphModule)
    else:
        assert len(rewritten) == 10 and all("residual add fused" in rows[n] for n in rewritten)
        assert type(q.features[3].conv) is nn.Sequential and q.features[3].conv[2] is not None, "containers kept"
        assert "35 activations fused, 10 residual adds fused" in report.summary()
    with torch.inference_mode():
        ref = q(x)
        assert_same(ref, q0(x), "float32: the same bits")
        qb, q0b = fastinfer.quantize(model.bfloat16()), _unrewritten(model.bfloat16())
        fused, unfused = sqnr(ref, qb(x.bfloat16()).float()), sqnr(ref, q0b(x.bfloat16()).float())
        assert fused > unfused - 1.0, f"bf16 with the add in the epilogue (one rounding fewer): {fused:.1f} vs {unfused:.1f} dB"
    assert set(q.state_dict()) == set(q0.state_dict())


def test_functional_blocks_and_what_is_left_alone():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 8, 8)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), _Functional()).eval()
    q, q0 = fastinfer.quantize(model), _unrewritten(model)
    assert isinstance(q[1], torch.fx.GraphModule) and q[1].a.activation == "relu" and q[1].b.activation == "relu"
    assert "self.b(a_1, residual = x)" in q[1].code
    with torch.inference_mode():
        assert_same(q(x), q0(x))
    # fx cannot trace the whole model (data-dependent branch): the BatchNorm stays, nothing is fused
    # into the conv before it; the block with the branch and the one whose conv output leaves it stay
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), _Functional(), _Branchy(), _Reuses()).eval()
    q, q0 = fastinfer.quantize(model), _unrewritten(model)
    assert q[1].a.activation is None and type(q[1].bn) is nn.BatchNorm2d
    assert type(q[2]) is _Branchy and type(q[3]) is _Reuses and q[2].a.activation is None and q[3].a.activation is None
    with torch.inference_mode():
        for a, b in zip(q(x), q0(x)):
            assert_same(a, b)


def test_hooked_blocks_and_config_keep_the_forward():
    torch.manual_seed(2)
    model = cnn.resnet18(num_classes=10).eval()
    model.layer1[0].register_forward_hook(lambda *a: None)
    seen = []
    model.layer1[1].relu.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    q = fastinfer.quantize(model)
    assert type(q.layer1[0]) is cnn.BasicBlock, "a hooked block keeps its forward"
    blk = q.layer1[1]  # its ReLU is hooked: every call of it stays, the add alone moves
    assert isinstance(blk, torch.fx.GraphModule) and blk.conv1.activation is None and blk.conv2.activation is None
    assert "residual = " in blk.code and blk.code.count("self.relu(") == 2
    with torch.inference_mode():
        q(torch.randn(1, 3, 32, 32))
    assert len(seen) == 2, "the hook sees both of its calls"
    for cfg in (fastinfer.QuantConfig(fuse_activations=False), fastinfer.QuantConfig(rewrite_blocks=False)):
        off = fastinfer.quantize(model, cfg)
        assert not any(isinstance(m, torch.fx.GraphModule) for m in off.modules())
    with pytest.raises(TypeError, match="rewrite_blocks"):
        fastinfer.QuantConfig(rewrite_blocks="yes")


def test_optimize_rewrites_after_choosing_the_layers(monkeypatch):
    """A conv the planner leaves float keeps its call; the int8 ones around it are fused."""
    from conftest import pin_planner_times

    torch.manual_seed(5)
    model = cnn.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    pin_planner_times(monkeypatch, lambda lay, name: {"float": 1.0}.get(name, 5.0) if lay.name == "layer1.0.conv2" else
                      {"float": 5.0}.get(name, 1.0))  # fmt: skip
    fast, plan = fastinfer.optimize(model, x)
    blk = fast.layer1[0]
    assert type(blk.conv2) is nn.Conv2d and isinstance(blk, torch.fx.GraphModule) and blk.conv1.activation == "relu"
    assert "residual" not in blk.code and isinstance(fast.layer1[1], torch.fx.GraphModule)
    notes = {r.name: r.note for r in plan}
    assert "residual add + relu fused" in notes["layer1.1.conv2"]
    with torch.inference_mode():
        assert sqnr(model(x), fast(x)) > 25


def test_rewritten_models_save_load_pickle_and_compile(tmp_path):
    torch.manual_seed(3)
    model = cnn.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    q = fastinfer.quantize(model)
    with torch.inference_mode():
        ref = q(x)
    fastinfer.save(q, tmp_path / "r18.safetensors")
    # format 2 only where a block was rewritten: a reader of format 1 would rebuild its forward
    assert fastinfer.io.read_metadata(tmp_path / "r18.safetensors")["format_version"] == 2
    fastinfer.save(fastinfer.quantize(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())), tmp_path / "plain.safetensors")
    assert fastinfer.io.read_metadata(tmp_path / "plain.safetensors")["format_version"] == 1
    back = fastinfer.load(tmp_path / "r18.safetensors", cnn.resnet18(num_classes=10).eval())
    buf = io.BytesIO()
    torch.save(q, buf)
    buf.seek(0)
    pickled = torch.load(buf, weights_only=False)
    with torch.inference_mode():
        assert_same(back(x), ref, "fastinfer.save -> load (re-quantized, rewritten again)")
        assert_same(pickled(x), ref, "torch.save of the whole model")
    torch._dynamo.reset()
    assert_same(torch.compile(q, fullgraph=True)(x), q(x), "compiled")


# ------------------------------------------- what the rewrite must leave alone or keep exact
# (an adversarial review's findings, each a block the rewrite once got wrong)

C = 16


class _CalledOutside(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)

    def forward(self, x):
        return F.relu(self.conv(x))


class _ParentCallsInside(nn.Module):
    """The block's conv is also called by the parent: fusing its relu would change that call."""

    def __init__(self):
        super().__init__()
        self.blk = _CalledOutside()

    def forward(self, x):
        return self.blk(x) + self.blk.conv(x)


class _InPlaceBetween(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.conv(x)
        x = self.relu(x)  # in place on the conv's input, before the add
        return out + x


class _IaddOnIdentity(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 1)

    def forward(self, x):
        identity = x
        identity += self.conv(x)  # writes x
        return torch.relu(identity) + x


class _ReadsAttribute(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.scale = 1.0

    def forward(self, x):
        return torch.relu(self.conv(x) + x * self.scale)


class _DefaultArg(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)

    def forward(self, x, scale=None):
        r = x * scale if scale is not None else x
        return torch.relu(self.conv(x) + r)


class _NoGrad(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.gain = nn.Parameter(torch.full((1, C, 1, 1), 0.5))

    def forward(self, x):
        with torch.no_grad():
            r = x * self.gain
        return torch.relu(self.conv(x) + r)


class _ShapeConstant(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 1)

    def forward(self, x):
        return torch.relu(self.conv(x) + x.shape[1])


class _Silu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 1)

    def forward(self, x):
        return F.silu(self.conv(x) + x)


class _HookedInnerSequential(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.down = nn.Sequential(nn.Conv2d(C, C, 1))
        self.down.register_forward_hook(lambda m, i, o: o * 0)

    def forward(self, x):
        return torch.relu(self.conv(x) + self.down(x))


class _LoadPreHook(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self._register_load_state_dict_pre_hook(lambda *a: None)

    def forward(self, x):
        return torch.relu(self.conv(x) + x)


@pytest.mark.parametrize("block", [_ParentCallsInside, _InPlaceBetween, _IaddOnIdentity, _ReadsAttribute, _DefaultArg,
                                   _NoGrad, _ShapeConstant, _Silu, _HookedInnerSequential, _LoadPreHook])  # fmt: skip
def test_blocks_the_rewrite_leaves_alone(block):
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(3, C, 3, padding=1), block()).eval()
    x = torch.randn(2, 3, 8, 8)
    q, q0 = fastinfer.quantize(model), _unrewritten(model)
    assert not isinstance(q[1], torch.fx.GraphModule), "left with its own forward"
    assert all(m.activation is None for m in q[1].modules() if isinstance(m, Int8Conv2d))
    with torch.inference_mode():
        assert_same(q(x.clone()), q0(x.clone()))


def test_deepcopy_prune_save_load_keep_the_rewrite(tmp_path):
    import copy

    torch.manual_seed(7)
    model = cnn.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    q = fastinfer.quantize(model)
    for label, m in (("deepcopy", copy.deepcopy(q)), ("prune", fastinfer.prune(q, sparsity=0.5))):
        assert set(m.state_dict()) == set(q.state_dict()) and type(m.layer1[0].bn1) is fastinfer.nn.Fused, label
        assert type(m.layer2[0].downsample) is nn.Sequential and m.layer2[0].downsample[0] is not None, label
        fastinfer.save(m, tmp_path / f"{label}.safetensors")
        back = fastinfer.load(tmp_path / f"{label}.safetensors", cnn.resnet18(num_classes=10).eval())
        with torch.inference_mode():
            assert_same(back(x), m(x), label)
    hooked = cnn.resnet18(num_classes=10).eval()
    hooked.layer1[1].relu.register_forward_hook(lambda *a: None)
    with pytest.raises(fastinfer.io.FileFormatError, match="has hooks"):
        fastinfer.load(tmp_path / "deepcopy.safetensors", hooked)


def test_residual_of_another_rank_or_a_number_follows_torch():
    torch.manual_seed(8)
    conv = Int8Conv2d.from_conv(nn.Conv2d(8, 16, 3, padding=1))
    conv.activation = "relu"
    plain = Int8Conv2d.from_conv(nn.Conv2d(8, 16, 3, padding=1))
    plain.set_weight(conv.weight_int8, conv.weight_scale)
    plain.bias.copy_(conv.bias)
    x, r = torch.randn(8, 6, 6), torch.randn(1, 16, 6, 6)
    out = conv(x, r)
    assert out.shape == (1, 16, 6, 6)
    assert_same(out, torch.relu(plain(x) + r))
    assert_same(conv(x, 2), torch.relu(plain(x) + 2))


@pytest.mark.parametrize("rewrite", [False, True])
def test_backward_through_in_place_relus_after_convs(rewrite):
    """A conv's output is never a view (channels_last NHWC storage, large outputs in a LargeBuffer),
    so a block's in-place ReLU after it works under autograd: the input's gradient arrives."""
    from fastinfer.ops._common import LARGE_OUTPUT_BYTES, new_output

    torch.manual_seed(9)
    q = fastinfer.quantize(cnn.resnet18(num_classes=10).eval(), fastinfer.QuantConfig(rewrite_blocks=rewrite))
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=CL).requires_grad_()
    q(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for shape, cl in (((4, 64, 128, 128), True), ((2048, 4096), False)):
        out = new_output(shape, FP32, channels_last=cl)
        assert out.numel() * 4 >= LARGE_OUTPUT_BYTES and out._base is None and out.data_ptr() % 64 == 0
        assert out.is_contiguous(memory_format=CL if cl else torch.contiguous_format)
