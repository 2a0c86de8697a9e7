"""Int8Conv2d / DepthwiseConv2d and the int8_conv2d / depthwise_conv2d ops: the integer part bit
for bit against an int64 reference on every ISA path, the epilogue's fusions against the unfused
path, conversion (BatchNorm folding, activation fusion, the report), bad inputs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastinfer
from fastinfer import ops
from fastinfer.nn import DepthwiseConv2d, Int8Conv2d
from fastinfer.ops.conv import pack_depthwise_weight

from conftest import kernel_variants, use_variant


# --------------------------------------------------------------------------------- references


def quantize_rows_ref(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8_conv2d's rule on fp32 rows [..., K]: (q as float64, scale fp32 [...]); a row with a
    negative value int8 max/127 (quantize_per_token's), a row of values >= 0 uint8 max/255."""
    amax = rows.abs().amax(-1)
    finite = torch.isfinite(rows).all(-1)
    nonneg = (rows >= 0).all(-1)
    qmax = torch.where(nonneg, 255.0, 127.0)
    inv = qmax / amax
    ok = finite & (amax > 0) & torch.isfinite(inv)
    safe = torch.where(ok, inv, torch.zeros_like(inv))
    q = torch.round(rows * safe[..., None])
    q = torch.minimum(torch.maximum(q, torch.where(nonneg, 0.0, -127.0)[..., None]), qmax[..., None])
    q = torch.where(ok[..., None], q, torch.zeros_like(q))
    scale = torch.where(ok, amax / qmax, torch.where(finite, torch.zeros_like(amax), torch.full_like(amax, float("nan"))))
    return q.double(), scale


def conv_int8_ref(x: torch.Tensor, q: torch.Tensor, stride, padding4, dilation, groups):
    """(exact int64 sums [n, cout, oh, ow], row scale fp32 [n, groups, oh, ow]) of int8_conv2d's
    general path: each output pixel's im2col row of each group quantized on its own."""
    n, c, h, w = x.shape
    cout, cg, kh, kw = q.shape
    pt, pl, pb, pr = padding4
    xp = F.pad(x.float(), (pl, pr, pt, pb))
    cols = F.unfold(xp, (kh, kw), dilation=dilation, stride=stride)  # [n, c*kh*kw, L], k ordered (c, ky, kx)
    oh = (h + pt + pb - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + pl + pr - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    coutg, kg = cout // groups, cg * kh * kw
    accs, scales = [], []
    for g in range(groups):
        rows = cols[:, g * kg:(g + 1) * kg].transpose(1, 2)  # [n, L, kg]
        qa, sa = quantize_rows_ref(rows)
        wg = q[g * coutg:(g + 1) * coutg].reshape(coutg, kg).double()
        accs.append((qa @ wg.t()).round().long())  # exact: |sums| < 2^53
        scales.append(sa)
    acc = torch.cat(accs, dim=2).transpose(1, 2).reshape(n, cout, oh, ow)
    return acc, torch.stack(scales, 1).reshape(n, groups, oh, ow)


def expected_output(acc, sa, w_scale, groups):
    """fp32 fma(float(acc), sa * sw, 0) = float(acc) * (sa * sw), rounded once, as the kernel does."""
    cout = w_scale.shape[0]
    sa_c = sa.repeat_interleave(cout // groups, dim=1)  # [n, cout, oh, ow]
    return acc.float() * (sa_c * w_scale[None, :, None, None])


def random_int8(shape, seed, extremes=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, shape, generator=g, dtype=torch.int8)
    if extremes:  # adversarial: every weight at +-127
        q = torch.where(q >= 0, 127, -127).to(torch.int8)
    return q


# (cin, cout, k, stride, padding4, dilation, groups, h, w, n)
CASES = [
    (16, 32, 3, 1, (1, 1, 1, 1), 1, 1, 8, 9, 2),
    (3, 20, 7, 2, (3, 3, 3, 3), 1, 1, 17, 15, 3),
    (5, 7, 5, 1, (2, 2, 2, 2), 1, 1, 9, 11, 1),
    (17, 33, 1, 1, (0, 0, 0, 0), 1, 1, 5, 6, 3),     # pointwise, channels not multiples of 16/64
    (70, 90, 1, 2, (0, 0, 0, 0), 1, 1, 9, 9, 2),     # 1x1 stride 2 (ResNet downsample)
    (8, 12, 3, 1, (1, 1, 1, 1), 1, 2, 6, 6, 2),      # groups 2
    (12, 12, 3, 2, (0, 0, 1, 1), 2, 3, 11, 11, 1),   # groups 3, dilation 2, asymmetric padding
    (9, 13, 4, 1, (1, 1, 2, 2), 1, 1, 7, 8, 2),      # even kernel, asymmetric "same" padding
    (6, 10, 3, 1, (1, 1, 1, 1), 1, 1, 1, 1, 3),      # 1x1 image, all but the centre tap padding
    (64, 80, 3, 2, (1, 1, 1, 1), 1, 1, 9, 9, 1),
    (130, 20, 3, 1, (1, 1, 1, 1), 1, 1, 4, 5, 1),    # K = 1170: a tile of fewer rows
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:4])) + f"-g{c[6]}-d{c[5]}-{c[7]}x{c[8]}")
@pytest.mark.parametrize("sign", ["mixed", "relu", "some"], ids=["s8", "u8", "s8+u8"])
def test_integer_part_exact_on_every_isa(case, sign):
    cin, cout, k, s, p, d, g, h, w, n = case
    gen = torch.Generator().manual_seed(sum(case[:4]) * 13 + n)
    x = torch.randn(n, cin, h, w, generator=gen) * torch.rand(n, 1, 1, 1, generator=gen) * 4
    if sign == "relu":  # every row >= 0: uint8 rows
        x = x.relu()
    elif sign == "some":  # non-negative on the left half only: int8 and uint8 rows in one GEMM
        x[..., : w // 2 + 1] = x[..., : w // 2 + 1].relu()
    q = random_int8((cout, cin // g, k, k), seed=cin * 7 + cout)
    sw = torch.rand(cout, generator=gen) * 0.01 + 1e-3
    packed = ops.pack_conv_weight(q, g)
    acc, sa = conv_int8_ref(x, q, (s, s), p, (d, d), g)
    want = expected_output(acc, sa, sw, g)
    for isa, vbmi in kernel_variants():
        use_variant(isa, vbmi)
        y = ops.int8_conv2d(x, packed, sw, None, k, s, p, d, g)
        assert y.shape == want.shape
        assert torch.equal(y, want), f"{isa}: {(y - want).abs().max()}"


def test_adversarial_values_and_sentinels():
    """All weights +-127 and inputs at the row maximum (every q = +-127): the largest sums the
    kernels see; NaN sentinels around the input must not leak in."""
    n, c, h, w = 2, 64, 6, 6
    big = torch.full((n, c, h + 2, w + 2), float("nan"))
    big[0, :, 1:-1, 1:-1] = 3.0
    big[1, :, 1:-1, 1:-1] = -3.0
    x = big[:, :, 1:-1, 1:-1]  # a strided view inside NaN sentinels
    q = random_int8((48, c, 3, 3), 1, extremes=True)
    q[0] = 127
    sw = torch.full((48,), 1e-4)
    packed = ops.pack_conv_weight(q)
    acc, sa = conv_int8_ref(x.contiguous(), q, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    assert acc.max() == 255 * 127 * 9 * 64 and acc.min() == -127 * 127 * 9 * 64  # the largest sums of a 3x3x64 conv (uint8 rows, int8 rows)
    for isa, vbmi in kernel_variants():
        use_variant(isa, vbmi)
        y = ops.int8_conv2d(x, packed, sw, None, 3, 1, 1)
        assert torch.equal(y, expected_output(acc, sa, sw, 1))


DW_CASES = [(32, 3, 1, (1, 1, 1, 1), 1, 9, 8, 2), (19, 5, 2, (2, 2, 2, 2), 1, 11, 9, 1), (70, 3, 1, (2, 2, 2, 2), 2, 7, 7, 3),
            (16, 3, 2, (0, 0, 1, 1), 1, 8, 8, 1), (8, 7, 1, (3, 3, 3, 3), 1, 1, 1, 2)]  # fmt: skip


@pytest.mark.parametrize("case", DW_CASES, ids=lambda c: f"c{c[0]}k{c[1]}s{c[2]}d{c[4]}-{c[5]}x{c[6]}")
@pytest.mark.parametrize("nonneg", [False, True], ids=["s8", "u8"])
def test_depthwise_int8_exact_on_every_isa(case, nonneg):
    c, k, s, p, d, h, w, n = case
    gen = torch.Generator().manual_seed(c * 31 + k)
    x = torch.randn(n, c, h, w, generator=gen) * 2
    if nonneg:
        x = x.relu()
    q = random_int8((c, 1, k, k), seed=c + k)
    sw = torch.rand(c, generator=gen) * 0.01 + 1e-3
    # per-sample scale: max/255 (uint8) when the whole input is >= 0, else max/127
    qmax = 255 if nonneg else 127
    amax = x.reshape(n, -1).abs().amax(1)
    inv = torch.tensor(float(qmax)) / amax
    xq = torch.round(x * inv[:, None, None, None]).clamp(0 if nonneg else -127, qmax)
    pt, pl, pb, pr = p
    acc = F.conv2d(F.pad(xq.double(), (pl, pr, pt, pb)), q.double(), None, s, 0, d, c).round().long()
    sa = (amax / qmax)[:, None, None, None]
    want = acc.float() * (sa * sw[None, :, None, None])
    packed = ops.pack_conv_weight(q, c)
    for isa, vbmi in kernel_variants():
        use_variant(isa, vbmi)
        y = ops.int8_conv2d(x, packed, sw, None, k, s, p, d, c)
        assert torch.equal(y, want), isa


@pytest.mark.parametrize("case", DW_CASES, ids=lambda c: f"c{c[0]}k{c[1]}s{c[2]}d{c[4]}-{c[5]}x{c[6]}")
def test_depthwise_f32_same_on_every_isa_and_close_to_torch(case):
    c, k, s, p, d, h, w, n = case
    torch.manual_seed(c)
    conv = nn.Conv2d(c, c, k, s, 0, dilation=d, groups=c).eval()
    x = torch.randn(n, c, h, w)
    pt, pl, pb, pr = p
    want = conv(F.pad(x, (pl, pr, pt, pb))).detach()
    layer = DepthwiseConv2d.from_conv(conv)
    layer.padding = p
    outs = []
    for isa, vbmi in kernel_variants():
        use_variant(isa, vbmi)
        outs.append(layer(x))
    for y in outs:
        assert torch.equal(y, outs[0])
    torch.testing.assert_close(outs[0], want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------- epilogue


@pytest.mark.parametrize("act", ["relu", "relu6", "silu", "hardswish", "gelu"])
@pytest.mark.parametrize("depthwise", [False, True])
def test_fused_activation_equals_unfused(act, depthwise):
    torch.manual_seed(3)
    c = 24
    conv = nn.Conv2d(c, c if depthwise else 40, 3, 1, 1, groups=c if depthwise else 1).eval()
    x = torch.randn(2, c, 7, 7) * 3
    cls = DepthwiseConv2d if depthwise else Int8Conv2d
    plain, fused = cls.from_conv(conv), cls.from_conv(conv, activation=act)
    ref = {"relu": F.relu, "relu6": F.relu6, "silu": F.silu, "hardswish": F.hardswish, "gelu": F.gelu}[act]
    outs = []
    for isa, vbmi in kernel_variants():
        use_variant(isa, vbmi)
        y, z = plain(x), fused(x)
        outs.append(z)
        if act in ("relu", "relu6"):
            assert torch.equal(z, ref(y))  # exact: a max / min of the same fp32 value
        else:
            torch.testing.assert_close(z, ref(y), rtol=2e-6, atol=2e-6)
    for z in outs:
        assert torch.equal(z, outs[0])  # the fused epilogue is bit-identical on every path


def test_activations_keep_nan():
    y = torch.tensor([float("nan"), -1.0, 0.5, 7.0, -100.0, 100.0])
    for code in range(1, 6):
        out = y.clone()
        fastinfer._runtime._C.apply_activation(out.data_ptr(), out.numel(), code)
        assert torch.isnan(out[0]), code
        assert torch.isfinite(out[1:]).all(), code


def test_bias_and_bf16_and_memory_formats():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, 1, 1).eval()
    layer = Int8Conv2d.from_conv(conv)
    x = torch.randn(2, 16, 9, 9)
    y = layer(x)
    assert y.is_contiguous() and y.dtype == torch.float32
    ycl = layer(x.contiguous(memory_format=torch.channels_last))
    assert ycl.is_contiguous(memory_format=torch.channels_last) and not ycl.is_contiguous()
    assert torch.equal(y, ycl)
    yb = layer(x.bfloat16())
    assert yb.dtype == torch.bfloat16
    assert (yb.float() - y).abs().max() < 0.05 * y.abs().max()
    torch.testing.assert_close(y, conv(x).detach(), rtol=0.05, atol=0.05 * conv(x).abs().max().item())
    assert layer(x[0]).shape == (24, 9, 9)  # unbatched [C, H, W]
    assert torch.equal(layer(x[0]), y[0])


# ------------------------------------------------------------------------------------ bad input


def test_bad_inputs_raise_clear_errors():
    layer = Int8Conv2d.from_conv(nn.Conv2d(8, 4, 3, padding=1))
    with pytest.raises(ValueError, match="5 channels, expected 8"):
        layer(torch.randn(1, 5, 6, 6))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        layer(torch.randn(8, 6))
    with pytest.raises(TypeError, match="float32 and bfloat16"):
        layer(torch.randn(1, 8, 6, 6).half())
    with pytest.raises(TypeError, match="expects a tensor"):
        layer([1.0])
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        Int8Conv2d.from_conv(nn.Conv2d(8, 4, 5))(torch.randn(1, 8, 3, 3))
    with pytest.raises(ValueError, match="zero padding"):
        Int8Conv2d.from_conv(nn.Conv2d(8, 4, 3, padding=1, padding_mode="reflect"))
    assert layer(torch.randn(0, 8, 6, 6)).shape == (0, 4, 6, 6)  # empty batch


def test_nan_pixel_gives_nan_rows_not_a_crash():
    torch.manual_seed(0)
    layer = Int8Conv2d.from_conv(nn.Conv2d(8, 4, 3, padding=1).eval())
    x = torch.randn(2, 8, 6, 6)
    x[1, 3, 2, 2] = float("nan")
    for isa, vbmi in kernel_variants():
        use_variant(isa, vbmi)
        y = layer(x)
        assert torch.isfinite(y[0]).all()  # the other sample is untouched
        nan = torch.isnan(y[1]).any(0)  # pixels whose 3x3 window reads the NaN
        assert nan[1:4, 1:4].all() and nan.sum() == 9
    dw = Int8Conv2d.from_conv(nn.Conv2d(8, 8, 3, padding=1, groups=8).eval())
    y = dw(x)
    assert torch.isfinite(y[0]).all() and torch.isnan(y[1]).all()  # depthwise: one scale per sample


def test_tampered_packed_weight_is_refused():
    q = random_int8((20, 8, 3, 3), 0)
    packed = ops.pack_conv_weight(q)
    x = torch.randn(1, 8, 5, 5)
    sw = torch.ones(20)
    ops.int8_conv2d(x, packed, sw, None, 3, 1, 1)
    bad = packed.clone()
    bad[64] ^= 1  # a column sum
    with pytest.raises(ValueError, match="column sum"):
        ops.int8_conv2d(x, bad, sw, None, 3, 1, 1)
    with pytest.raises(TypeError, match="pack_conv_weight"):
        ops.int8_conv2d(x, q.reshape(-1), sw, None, 3, 1, 1)
    with pytest.raises(ValueError):
        ops.int8_conv2d(x, packed[:-64].clone(), sw, None, 3, 1, 1)
    with pytest.raises(ValueError, match="groups"):
        ops.int8_conv2d(x, packed, sw, None, 3, 1, 1, groups=3)


def test_pack_round_trip():
    for g, shape in ((1, (20, 8, 3, 3)), (2, (12, 3, 5, 5)), (8, (8, 1, 3, 3))):
        q = random_int8(shape, g)
        packed = ops.pack_conv_weight(q, g)
        assert torch.equal(ops.unpack_conv_weight(packed, shape[0], shape[1], shape[2:], g), q)


def test_opcheck_and_compile():
    q = random_int8((12, 8, 3, 3), 0)
    args = (torch.randn(2, 8, 6, 6), ops.pack_conv_weight(q), torch.rand(12), torch.randn(12), [3, 3], [1, 1], [1, 1, 1, 1], [1, 1], 1, 2)
    torch.library.opcheck(torch.ops.fastinfer.int8_conv2d, args, test_utils=("test_schema", "test_faketensor"))
    wd = pack_depthwise_weight(torch.randn(8, 1, 3, 3))
    dargs = (torch.randn(2, 8, 6, 6), wd, torch.randn(8), [3, 3], [2, 2], [1, 1, 1, 1], [1, 1], 3)
    torch.library.opcheck(torch.ops.fastinfer.depthwise_conv2d, dargs, test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------------------------- autograd


@pytest.mark.parametrize("depthwise", [False, True])
def test_gradient_reaches_the_input(depthwise):
    torch.manual_seed(0)
    c = 8
    conv = nn.Conv2d(c, c if depthwise else 6, 3, 2, 1, groups=c if depthwise else 1).eval()
    layer = (DepthwiseConv2d if depthwise else Int8Conv2d).from_conv(conv, activation="relu")
    x = torch.randn(2, c, 7, 7, requires_grad=True)
    layer(x).sum().backward()
    wf = layer.weight if depthwise else layer.dequantized_weight()
    x2 = x.detach().clone().requires_grad_()
    y2 = F.conv2d(x2, wf, layer.bias, 2, 1, 1, conv.groups)
    (y2.relu() * (layer(x.detach()) > 0)).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    silu = Int8Conv2d.from_conv(nn.Conv2d(c, 4, 3), activation="silu")
    with pytest.raises(RuntimeError, match="fuse_activations=False"):
        silu(torch.randn(1, c, 5, 5, requires_grad=True)).sum().backward()


def test_layers_built_and_run_under_inference_mode():
    conv = nn.Conv2d(8, 8, 3, padding=1).eval()
    dwc = nn.Conv2d(8, 8, 3, padding=1, groups=8).eval()
    x = torch.randn(1, 8, 6, 6)
    with torch.inference_mode():
        a, b = Int8Conv2d.from_conv(conv), DepthwiseConv2d.from_conv(dwc)
        ya, yb = a(x), b(x)
        q = fastinfer.quantize(nn.Sequential(conv, nn.ReLU(), dwc))
        yq = q(x)
    assert torch.equal(ya, Int8Conv2d.from_conv(conv)(x)) and torch.equal(yb, DepthwiseConv2d.from_conv(dwc)(x))
    assert torch.equal(yq, q(x))


def test_state_dict_round_trip_and_compile():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16)).eval()
    q = fastinfer.quantize(model)
    x = torch.randn(2, 8, 7, 7)
    want = q(x)
    sd = q.state_dict()
    assert sd["0.weight_int8"].dtype == torch.int8 and sd["3.weight"].dtype == torch.float32  # portable forms
    fresh = fastinfer.quantize(copy.deepcopy(model))
    with torch.no_grad():
        fresh[0].weight_int8.zero_()
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x), want)
    bad = dict(sd)
    bad["0.weight_int8"] = sd["0.weight_int8"][:, :4].contiguous()
    with pytest.raises(RuntimeError, match="weight_int8"):
        fresh.load_state_dict(bad)
    bad = dict(sd)
    bad["0.weight_scale"] = torch.full_like(sd["0.weight_scale"], float("nan"))
    with pytest.raises(RuntimeError, match="finite"):
        fresh.load_state_dict(bad)
    compiled = torch.compile(q, fullgraph=True)
    assert torch.equal(compiled(x), want)


def test_geometry_reassigned_by_hand_is_parsed_and_checked():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 4, 3, padding=1).eval()
    layer = Int8Conv2d.from_conv(conv)
    x = torch.randn(1, 8, 6, 6)
    want = layer(x)
    layer.padding = 1  # an int, as nn.Conv2d takes it
    assert torch.equal(layer(x), want)
    layer.stride = 0
    with pytest.raises(ValueError, match="stride"):
        layer(x)
    layer.stride = (1, 1)
    layer.bias = torch.zeros(3)  # wrong size: refused, never read past its end
    with pytest.raises(TypeError, match="bias"):
        layer(x)
