"""QuantConfig(conv_handoff=True): converted convs of an fp32 model that feed only each other hand
their output over in bf16 (Int8Conv2d / DepthwiseConv2d.output_dtype); the chain's last conv returns
float32 and follows casts of the model. Checked: the layer's bf16 output is its fp32 output rounded
(eager and op paths), which convs form chains (torch.fx, or nn.Sequential order without a trace;
never a conv whose output is read twice), the model's outputs and dtype, casts, files, optimize."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastinfer
from conftest import assert_same, pin_planner_times, sqnr
from fastinfer.bench import cnn
from fastinfer.nn import DepthwiseConv2d, Int8Conv2d

BF16, FP32 = torch.bfloat16, torch.float32


def _layers():
    torch.manual_seed(0)
    conv = Int8Conv2d.from_conv(nn.Conv2d(12, 20, 3, stride=2, padding=1), activation="relu6")
    dw = DepthwiseConv2d.from_conv(nn.Conv2d(12, 12, 3, padding=1, groups=12), activation="relu")
    return conv, dw


@pytest.mark.parametrize("which", ["int8", "depthwise"])
def test_layer_output_dtype_is_its_fp32_output_rounded(which):
    layer = _layers()[which == "depthwise"]
    x = torch.randn(3, 12, 11, 9).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        want = layer(x)
        layer.output_dtype = BF16
        got = layer(x)
        assert_same(got, want.bfloat16(), "eager bf16 output")
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert_same(layer(x[0]), want[0].bfloat16(), "unbatched")
        layer.output_dtype = None
        want16 = layer(x.bfloat16())  # bf16 in, bf16 out (the default: the input's dtype)
        layer.output_dtype = BF16
        assert_same(layer(x.bfloat16()), want16, "bf16 in, bf16 asked for")
        layer.output_dtype = FP32
        got32 = layer(x.bfloat16())
        assert got32.dtype == FP32 and torch.equal(got32.bfloat16(), want16)
    layer.output_dtype = BF16
    xg = x.clone().requires_grad_()
    y = layer(xg)  # the op path (autograd sees it): the op's output rounded the same way
    assert y.dtype == BF16 and torch.equal(y.detach(), want.bfloat16())
    y.float().sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
    assert "output_dtype=bfloat16" in repr(layer)
    with pytest.raises(ValueError, match="output_dtype"):
        layer.output_dtype = torch.float16


def test_chain_end_follows_casts_of_the_model():
    conv, _ = _layers()
    conv.output_dtype, conv._follows_model_dtype = FP32, True
    model = nn.Sequential(conv)
    model.bfloat16()
    assert conv.output_dtype == BF16
    model.to("cpu")
    assert conv.output_dtype == BF16  # a device move is not a cast
    model.float()
    assert conv.output_dtype == FP32
    inner, _ = _layers()
    inner.output_dtype = BF16
    nn.Sequential(inner).float()
    assert inner.output_dtype == BF16  # only the last of a chain follows


class _Block(nn.Module):
    """expand -> depthwise -> project, a residual, and a conv whose output is read twice."""

    def __init__(self, c: int = 16, hidden: int = 48) -> None:
        super().__init__()
        self.conv = nn.Sequential(cnn.conv_bn_act(c, hidden, 1), cnn.conv_bn_act(hidden, hidden, 3, groups=hidden),
                                  nn.Conv2d(hidden, c, 1, bias=False), nn.BatchNorm2d(c))  # fmt: skip
        self.side = nn.Conv2d(c, c, 1)  # its output goes to two places

    def forward(self, x):
        y = x + self.conv(x)
        s = self.side(y)
        return s + self.conv[0](s).mean(1, keepdim=True)  # conv[0] called twice: never in a chain


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(cnn.conv_bn_act(3, 16, 3, 2), _Block(), nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),
                        nn.Conv2d(16, 8, 1), nn.Conv2d(8, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 5)).eval()  # fmt: skip
    return cnn.settle_batchnorm(net) or net


def test_quantize_chains_the_convs_that_feed_only_each_other():
    net = _net()
    x = torch.randn(4, 3, 32, 32)
    q = fastinfer.quantize(net)
    plain = fastinfer.quantize(net, fastinfer.QuantConfig(conv_handoff=False))
    dt = {n: m.output_dtype for n, m in q.named_modules() if isinstance(m, (Int8Conv2d, DepthwiseConv2d))}
    # the stem feeds the block's residual and its expand: no chain; the expand is called twice;
    # dw -> project is one (project's output goes to the residual add: float32); side's output is
    # read twice; the depthwise after the block feeds the 1x1 through a ReLU; 1x1 -> 1x1 (no
    # depthwise at either end) is not linked
    assert dt == {"0.0": None, "1.conv.0.0": None, "1.conv.1.0": BF16, "1.conv.2": FP32, "1.side": None,
                  "2": BF16, "4": FP32, "5": None}  # fmt: skip
    rep = {r.name: r.detail for r in fastinfer.conversion_report(q)}
    assert "output bf16 to 4" in rep["2"] and "last of a conv chain from 2: output float32" in rep["4"]
    assert "no fx trace" not in rep["2"]
    assert all(m.output_dtype is None for m in plain.modules() if isinstance(m, (Int8Conv2d, DepthwiseConv2d)))
    with torch.inference_mode():
        got, want, ref = q(x), plain(x), net(x)
    assert got.dtype == FP32 and sqnr(want, got) > 40 and sqnr(ref, got) > 25
    # the model cast to bf16 runs bf16 end to end, and cast back fp32 again (torch's own layers
    # keep the bits bf16 cost them)
    qb = copy.deepcopy(q).bfloat16()
    assert qb[4].output_dtype == BF16 and qb[2].output_dtype == BF16 and qb[5].output_dtype is None
    back = copy.deepcopy(qb).float()
    assert back[4].output_dtype == FP32
    with torch.inference_mode():
        assert qb(x.bfloat16()).dtype == BF16
        assert back(x).dtype == FP32 and sqnr(got, back(x)) > 30


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                                  nn.Conv2d(8, 4, 1))  # fmt: skip

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: torch.fx cannot trace it
            feats = []
            for layer in self.body:  # a parent iterating over the Sequential: each output is kept
                x = layer(x)
                feats.append(x)
            return feats
        return [self.body(-x)]


def test_without_a_trace_nothing_is_linked():
    """The fusions trust nn.Sequential order without a trace; the handoff does not: a parent that
    iterates over the Sequential would be handed bf16."""
    torch.manual_seed(0)
    net = _Untraceable().eval()
    q = fastinfer.quantize(net)
    assert all(m.output_dtype is None for m in q.modules() if isinstance(m, (Int8Conv2d, DepthwiseConv2d)))
    with torch.inference_mode():
        assert [f.dtype for f in q(torch.rand(2, 3, 10, 10))] == [FP32] * 4


def test_hooks_links_and_gradients():
    torch.manual_seed(0)
    # a hooked activation between two convs breaks the link (the hook would see bf16); two fp32
    # depthwise convs in a row are not linked either (bf16 would cost them their exactness)
    net = nn.Sequential(nn.Conv2d(8, 32, 1), nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU(), nn.Conv2d(32, 8, 1),
                        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 8, 3, padding=1, groups=8)).eval()  # fmt: skip
    seen = []
    net[2].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    q = fastinfer.quantize(net)
    assert [q[i].output_dtype for i in (0, 1, 3, 4, 5)] == [BF16, FP32, BF16, FP32, None]
    with torch.inference_mode():
        q(torch.randn(1, 8, 6, 6))
    assert seen == [FP32]
    # relu6's gradient where the output rounds to 6.0 in bf16: from the fp32 value, as without
    c = nn.Conv2d(4, 4, 3, padding=1, groups=4)
    with torch.no_grad():
        c.weight.fill_(0.01)
        c.bias.fill_(5.99)
    dw = DepthwiseConv2d.from_conv(c, activation="relu6")
    grads = []
    for od in (None, BF16):
        dw.output_dtype = od
        x = torch.zeros(1, 4, 5, 5, requires_grad=True)
        y = dw(x)
        y.float().sum().backward()
        grads.append(x.grad)
    assert y.dtype == BF16 and torch.equal(y.detach(), torch.full_like(y, 6.0))
    assert torch.equal(grads[0], grads[1]) and grads[1].abs().sum() > 0


def test_bf16_models_and_the_switch_leave_dtypes_alone():
    net = _net()
    qb = fastinfer.quantize(copy.deepcopy(net).bfloat16())
    assert all(m.output_dtype is None for m in qb.modules() if isinstance(m, (Int8Conv2d, DepthwiseConv2d)))
    with pytest.raises(TypeError, match="conv_handoff"):
        fastinfer.QuantConfig(conv_handoff="yes")


def test_files_keep_the_output_dtypes(tmp_path):
    net = _net()
    q = fastinfer.quantize(net)
    fastinfer.save(q, tmp_path / "net.safetensors")
    back = fastinfer.load(tmp_path / "net.safetensors", _net())
    got = {n: (m.output_dtype, m._follows_model_dtype) for n, m in back.named_modules() if isinstance(m, (Int8Conv2d, DepthwiseConv2d))}
    want = {n: (m.output_dtype, m._follows_model_dtype) for n, m in q.named_modules() if isinstance(m, (Int8Conv2d, DepthwiseConv2d))}
    assert got == want and got["4"] == (FP32, True) and got["2"] == (BF16, False)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert_same(back(x), q(x), "save -> load")


def test_optimize_chains_after_choosing_the_layers(monkeypatch):
    net = _net()
    x = torch.randn(2, 3, 32, 32)
    # the 3x3 after the block stays float: the chain 2 -> 4 is broken, the block's chain stays
    pin_planner_times(monkeypatch, lambda lay, name: {"float": 1.0}.get(name, 5.0) if lay.name == "2" else
                      {"float": 5.0}.get(name, 1.0))  # fmt: skip
    fast, plan = fastinfer.optimize(net, x)
    assert type(fast[2]) is nn.Conv2d and fast[4].output_dtype is None
    assert fast[1].conv[1][0].output_dtype == BF16 and fast[1].conv[2].output_dtype == FP32
    notes = {r.name: r.note for r in plan}
    assert "output bf16 to 1.conv.2" in notes["1.conv.1.0"] and "last of a conv chain" in notes["1.conv.2"]
    rep = {r.name: r.detail for r in fastinfer.conversion_report(fast)}
    assert "output bf16 to 1.conv.2" in rep["1.conv.1.0"]
    floats, _ = fastinfer.optimize(net, x, quantize=False)  # float arithmetic kept: no bf16 either
    assert all(m.output_dtype is None for m in floats.modules() if isinstance(m, (Int8Conv2d, DepthwiseConv2d)))
    with torch.inference_mode():
        assert fast(x).dtype == FP32 and sqnr(net(x), fast(x)) > 25


def test_ops_take_an_output_dtype():
    conv, dw = _layers()
    x = torch.randn(2, 12, 9, 9)
    wc, wd = conv._kernel_weight(), dw._kernel_weight()
    args_c = (x, wc, conv.weight_scale, conv.bias, list(conv.kernel_size), list(conv.stride), list(conv.padding),
              list(conv.dilation), conv.groups, 3)  # fmt: skip
    args_d = (x, wd, dw.bias, list(dw.kernel_size), list(dw.stride), list(dw.padding), list(dw.dilation), 2)
    for op, args in ((torch.ops.fastinfer.int8_conv2d, args_c), (torch.ops.fastinfer.depthwise_conv2d, args_d)):
        y = op(*args)
        assert_same(op(*args, torch.bfloat16), y.bfloat16(), str(op))
        assert_same(op(args[0].bfloat16(), *args[1:], torch.float32).bfloat16(), op(args[0].bfloat16(), *args[1:]), str(op))
        torch.library.opcheck(op, (*args, torch.bfloat16))
        with pytest.raises(TypeError, match="out_dtype"):
            op(*args, torch.float16)
