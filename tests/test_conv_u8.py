"""uint8 between chained convs (QuantConfig(conv_handoff="u8")): a relu6 output handed on as bytes
q in [0, 254] standing for q * 6/254 (255: NaN). The kernels' u8 stores, the int8 conv summing the
handed-on bytes exactly, the depthwise conv reading them, NaN kept, every ISA alike; the layers,
the ops under compile, the links quantize() makes, files and optimize's choice."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastinfer
from conftest import assert_same, kernel_variants, pin_planner_times, sqnr, use_variant
from fastinfer.bench import cnn
from fastinfer.nn import DepthwiseConv2d, Int8Conv2d
from fastinfer.ops.conv import U8_NAN, U8_SCALE, dequantize_u8, quantize_u8

U8, BF16, FP32 = torch.uint8, torch.bfloat16, torch.float32
CL = torch.channels_last


def _u8_input(n, c, h, w, seed, nan_at=None):
    """ReLU6-like bytes: a third zeros, some at 254, the rest spread; nan_at (img, ch, y, x) = 255."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 255, (n, c, h, w), generator=g).clamp(max=254)
    q = torch.where(torch.rand(q.shape, generator=g) < 0.3, 0, q)
    q = torch.where(torch.rand(q.shape, generator=g) < 0.05, 254, q).to(U8)
    if nan_at is not None:
        q[nan_at] = U8_NAN
    return q.contiguous(memory_format=CL)


def _int_ref(q: torch.Tensor, layer: Int8Conv2d) -> torch.Tensor:
    """The int8 conv on uint8 bytes: exact int64 sums of q * W, then fma(float(acc), U8_SCALE * sw,
    bias) in float32 (the product of a 24-bit float and a float is exact in float64: one rounding)."""
    kh, kw = layer.kernel_size
    pt, pl, pb, pr = layer.padding
    xp = F.pad(q.double(), (pl, pr, pt, pb))
    acc = F.conv2d(xp, layer.weight_int8.double(), None, layer.stride, 0, layer.dilation, layer.groups)
    s = (torch.tensor(U8_SCALE, dtype=FP32) * layer.weight_scale).double()
    b = layer.bias.double() if layer.bias is not None else torch.zeros(layer.out_channels, dtype=torch.float64)
    return (acc.float().double() * s[None, :, None, None] + b[None, :, None, None]).float()


def test_u8_codes_round_trip_and_nan():
    y = torch.tensor([float("nan"), -1.0, 0.0, 6.0 / 254 * 0.5, 6.0 / 254 * 1.5, 3.0, 6.0, 7.0, float("inf")])
    q = quantize_u8(y)
    assert q.tolist() == [255, 0, 0, 0, 2, 127, 254, 254, 254]  # half-way cases to even
    back = dequantize_u8(q)
    assert torch.isnan(back[0]) and back[6] == 6.0 * torch.tensor(1.0) and back[5] == torch.tensor(127.0) * torch.tensor(U8_SCALE)
    with pytest.raises(TypeError, match="uint8"):
        dequantize_u8(y)


@pytest.mark.parametrize("kind", ["pointwise", "general", "depthwise-int8", "depthwise-fp32"])
def test_u8_output_is_the_fp32_output_quantized_on_every_isa(kind):
    torch.manual_seed(1)
    if kind == "depthwise-fp32":
        layer = DepthwiseConv2d.from_conv(nn.Conv2d(40, 40, 3, padding=1, groups=40), activation="relu6")
    else:
        conv = {"pointwise": nn.Conv2d(24, 40, 1), "general": nn.Conv2d(24, 40, 3, stride=2, padding=1),
                "depthwise-int8": nn.Conv2d(24, 24, 3, padding=1, groups=24)}[kind]  # fmt: skip
        layer = Int8Conv2d.from_conv(conv, activation="relu6")
    x = (torch.randn(3, layer.in_channels, 13, 11) * 2).contiguous(memory_format=CL)
    x[1, 2, 5, 5] = float("nan")
    outs = []
    with torch.inference_mode():
        for isa, vbmi in kernel_variants():
            use_variant(isa, vbmi)
            layer.output_dtype = None
            want = quantize_u8(layer(x))
            layer.output_dtype = U8
            got = layer(x)
            assert got.dtype == U8 and got.is_contiguous(memory_format=CL)
            assert_same(got, want, f"{kind} {isa}")
            assert (got == U8_NAN).any() and (got[0] != U8_NAN).all()
            outs.append(got)
    for o in outs[1:]:
        assert_same(o, outs[0], kind)


@pytest.mark.parametrize("case", [(1, 1, 0), (3, 1, 1), (3, 2, 1), (5, 1, 2)], ids=["1x1", "3x3", "3x3s2", "5x5"])
def test_int8_conv_sums_handed_on_bytes_exactly_on_every_isa(case):
    k, s, p = case
    torch.manual_seed(2)
    layer = Int8Conv2d.from_conv(nn.Conv2d(37, 20, k, stride=s, padding=p))  # K = 37 * k * k: not a multiple of 8
    layer._takes_u8 = True  # as quantize() marks a uint8 link's receiving end
    q = _u8_input(2, 37, 9, 10, seed=k * 10 + s, nan_at=(1, 5, 4, 4))
    want = _int_ref(q, layer)
    # a pixel whose window holds the NaN byte is a NaN row
    hit = F.conv2d(F.pad((q == U8_NAN).double(), (p, p, p, p)), torch.ones(1, 37, k, k, dtype=torch.float64), stride=s) > 0
    want = torch.where(hit, float("nan"), want)
    with torch.inference_mode():
        for isa, vbmi in kernel_variants():
            use_variant(isa, vbmi)
            assert_same(layer(q), want, f"{isa}")


def test_depthwise_reads_bytes_the_same_on_every_isa_and_close_to_torch():
    torch.manual_seed(3)
    outs = {}
    for k, s in ((3, 1), (3, 2), (5, 1), (5, 2), (7, 1), (3, 3)):  # (3, 3): the generic kernel
        conv = nn.Conv2d(40, 40, k, stride=s, padding=k // 2, groups=40)
        layer = DepthwiseConv2d.from_conv(conv, activation="relu6")
        layer._takes_u8 = True
        q = _u8_input(2, 40, 23, 21, seed=k + s, nan_at=(0, 17, 10, 12))
        ref = F.relu6(conv(dequantize_u8(q)))
        with torch.inference_mode():
            for isa, vbmi in kernel_variants():
                use_variant(isa, vbmi)
                y = layer(q)
                assert y.dtype == FP32
                outs.setdefault((k, s), []).append(y)
                layer.output_dtype = U8
                assert_same(layer(q), quantize_u8(y), f"{k}x{k}/{s} {isa} u8 -> u8")
                layer.output_dtype = None
        for y in outs[(k, s)][1:]:
            assert_same(y, outs[(k, s)][0], f"{k}x{k}/{s}")
        y = outs[(k, s)][0]
        assert torch.equal(torch.isnan(y), torch.isnan(ref))  # NaN exactly where torch has it
        ok = ~torch.isnan(ref)
        assert (y[ok] - ref[ok]).abs().max() <= 1e-5 * ref[ok].abs().max()


def test_layer_rules_and_gradients():
    conv = Int8Conv2d.from_conv(nn.Conv2d(8, 16, 1), activation="relu")
    with pytest.raises(ValueError, match="relu6"):
        conv.output_dtype = U8
    conv.activation = "relu6"
    conv.output_dtype = U8
    assert "output_dtype=uint8" in repr(conv)
    x = torch.randn(2, 8, 5, 5)
    with torch.inference_mode():
        assert conv(x).dtype == U8
    xg = x.clone().requires_grad_()
    y = conv(xg)  # integers carry no gradient: bf16 handed on instead, the gradient reaches x
    assert y.dtype == BF16
    y.float().sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0
    conv.activation = None
    with pytest.raises(ValueError, match="relu6"):
        conv(x)
    # a uint8 input gives float32 by default (its values), any float dtype when asked
    dw = DepthwiseConv2d.from_conv(nn.Conv2d(8, 8, 3, padding=1, groups=8))
    q = _u8_input(2, 8, 5, 5, seed=4)
    with pytest.raises(TypeError, match="uint8"):
        dw(q)
    dw._takes_u8 = True  # as quantize() marks a link's receiving end
    with torch.inference_mode():
        assert dw(q).dtype == FP32 and dw(q[0]).shape == (8, 5, 5)
        dw.output_dtype = BF16
        assert dw(q).dtype == BF16
    with pytest.raises(TypeError, match="float32 and bfloat16"):
        dw(q.to(torch.int8))


def test_only_a_linked_layer_takes_uint8_and_hooks_get_values():
    # a raw uint8 image is refused, never read as the handoff's code (255 would be NaN)
    net = _mbnet()
    image = torch.randint(0, 256, (2, 3, 32, 32), dtype=U8)
    for handoff in (False, "u8"):
        q = fastinfer.quantize(net, config=fastinfer.QuantConfig(conv_handoff=handoff))
        with pytest.raises(TypeError, match="uint8"), torch.inference_mode():
            q(image)
    takes = {n for n, m in q.named_modules() if getattr(m, "_takes_u8", False)}
    assert takes == {"1.conv.1.0", "1.conv.2", "2.conv.1.0", "2.conv.2", "8"}
    # a hook registered after quantize() on a linked layer sees values (bf16), and the model's output
    # is unchanged by it
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=CL)
    with torch.inference_mode():
        want = q(x)
    seen = []
    h = q[1].conv[0][0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.inference_mode():
        got = q(x)
    h.remove()
    assert seen == [BF16] and sqnr(want, got) > 40
    with torch.inference_mode():
        assert_same(q(x), want, "hook removed: uint8 again")


def test_ops_take_uint8_under_opcheck_and_compile():
    torch.manual_seed(5)
    conv = Int8Conv2d.from_conv(nn.Conv2d(16, 16, 3, padding=1), activation="relu6")
    dw = DepthwiseConv2d.from_conv(nn.Conv2d(16, 16, 3, padding=1, groups=16), activation="relu6")
    dw._takes_u8 = True
    q = _u8_input(2, 16, 7, 7, seed=6)
    args_c = (q, conv._kernel_weight(), conv.weight_scale, conv.bias, [3, 3], [1, 1], list(conv.padding), [1, 1], 1, 3)
    args_d = (q, dw._kernel_weight(), dw.bias, [3, 3], [1, 1], list(dw.padding), [1, 1], 3)
    for op, args in ((torch.ops.fastinfer.int8_conv2d, args_c), (torch.ops.fastinfer.depthwise_conv2d, args_d)):
        torch.library.opcheck(op, args)
        torch.library.opcheck(op, (*args, U8))
        with pytest.raises(ValueError, match="relu6"):
            op(*args[:-1], 2, U8)
    net = nn.Sequential(conv, dw)
    conv.output_dtype, dw.output_dtype = U8, U8
    x = torch.randn(2, 16, 7, 7).contiguous(memory_format=CL)
    with torch.inference_mode():
        want = net(x)
        got = torch.compile(net, fullgraph=True)(x)
    assert_same(got, want, "compiled uint8 chain")


def test_depthwise_refuses_a_weight_that_is_not_finite():
    dw = DepthwiseConv2d.from_conv(nn.Conv2d(16, 16, 3, padding=1, groups=16))
    w = dw._kernel_weight().clone()
    w[4, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        torch.ops.fastinfer.depthwise_conv2d(torch.randn(1, 16, 5, 5), w, dw.bias, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1], 0)


def _mbnet():
    torch.manual_seed(0)
    net = nn.Sequential(cnn.conv_bn_act(3, 16, 3, 2), cnn.InvertedResidual(16, 24, 2, 6), cnn.InvertedResidual(24, 24, 1, 6),
                        # relu6 fused, then a dropout between the convs: a link, but in bf16 (not identities only)
                        nn.Conv2d(24, 48, 1), nn.ReLU6(), nn.Dropout(0.1), nn.Conv2d(48, 48, 3, padding=1, groups=48),
                        nn.ReLU6(), nn.Conv2d(48, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).eval()  # fmt: skip
    return cnn.settle_batchnorm(net, size=32) or net


def test_quantize_hands_uint8_on_after_relu6_through_identities_only(tmp_path):
    net = _mbnet()
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=CL)
    bf = fastinfer.quantize(net)
    q = fastinfer.quantize(net, config=fastinfer.QuantConfig(conv_handoff="u8"))
    dts = {n: m.output_dtype for n, m in q.named_modules() if isinstance(m, (Int8Conv2d, DepthwiseConv2d))}
    assert dts["1.conv.0.0"] == U8 and dts["1.conv.1.0"] == U8 and dts["1.conv.2"] == FP32  # expand, depthwise, project
    assert dts["2.conv.0.0"] == U8 and dts["2.conv.1.0"] == U8
    assert dts["3"] == BF16 and dts["6"] == U8 and dts["8"] == FP32
    rep = {r.name: r.detail for r in fastinfer.conversion_report(q)}
    assert "output uint8 to 1.conv.1.0" in rep["1.conv.0.0"] and "output bf16 to 6" in rep["3"]
    with torch.inference_mode():
        ref, y_bf, y = net(x), bf(x), q(x)
    assert y.dtype == FP32 and sqnr(ref, y) > 25 and sqnr(ref, y) < sqnr(ref, y_bf) + 1
    fastinfer.save(q, tmp_path / "net.safetensors")
    back = fastinfer.load(tmp_path / "net.safetensors", _mbnet())
    with torch.inference_mode():
        assert_same(back(x), y, "save -> load")
    with pytest.raises(TypeError, match="conv_handoff"):
        fastinfer.QuantConfig(conv_handoff="fp8")


def test_bf16_models_hand_uint8_on_with_u8_only():
    net = _mbnet().bfloat16()
    x = torch.randn(4, 3, 32, 32).bfloat16().contiguous(memory_format=CL)
    plain = fastinfer.quantize(net)
    assert all(m.output_dtype is None for m in plain.modules() if isinstance(m, (Int8Conv2d, DepthwiseConv2d)))
    q = fastinfer.quantize(net, config=fastinfer.QuantConfig(conv_handoff="u8"))
    dts = {n: m.output_dtype for n, m in q.named_modules() if isinstance(m, (Int8Conv2d, DepthwiseConv2d))}
    assert dts["1.conv.0.0"] == U8 and dts["1.conv.1.0"] == U8 and dts["1.conv.2"] == BF16 and dts["3"] == BF16
    with torch.inference_mode():
        ref, y = net.float()(x.float()), q(x)
    assert y.dtype == BF16 and sqnr(ref, y) > 20
    assert q.float()(x.float()).dtype == FP32  # the chain's end follows the model's casts


def test_optimize_takes_uint8_when_faster_and_within_the_sqnr_allowance(monkeypatch):
    net = _mbnet()
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=CL)
    n_u8 = lambda m: sum(l.output_dtype == U8 for l in m.modules() if isinstance(l, (Int8Conv2d, DepthwiseConv2d)))  # noqa: E731
    pin_planner_times(monkeypatch, {"float": 5.0}, default=1.0, settings_ms={"bf16": 10.0, "u8": 8.0})
    fast, rep = fastinfer.optimize(net, x, max_model_sqnr_drop_db=20.0)
    plan = fastinfer.report(fast)
    assert plan.handoff.chosen == "u8" and n_u8(fast) == 5 and "conv handoff: u8" in plan.summary()
    assert plan.handoff.sqnr_db["u8"] < plan.handoff.sqnr_db["bf16"]
    strict, _ = fastinfer.optimize(net, x, max_model_sqnr_drop_db=0.0)
    plan = fastinfer.report(strict)
    assert plan.handoff.chosen == "bf16" and n_u8(strict) == 0 and "uint8 left out" in plan.handoff.note
    pin_planner_times(monkeypatch, {"float": 5.0}, default=1.0, settings_ms={"bf16": 10.0, "u8": 9.9})
    tie, _ = fastinfer.optimize(net, x, max_model_sqnr_drop_db=20.0)  # within 2%: bf16 kept
    assert fastinfer.report(tie).handoff.chosen == "bf16" and n_u8(tie) == 0
    asked, _ = fastinfer.optimize(net, x, config=fastinfer.QuantConfig(conv_handoff="u8"))
    assert n_u8(asked) == 5 and fastinfer.report(asked).handoff is None
