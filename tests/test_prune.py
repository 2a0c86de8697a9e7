"""fastinfer.prune / sparsity_report: exact masks on hand-made layers (magnitude, wanda, N:M,
block), exact achieved sparsity, Int8Linear (scales kept, only int8 entries zeroed), skip and
shared layers, calibration plumbing (batch forms, eval mode, hooks), bad input, and a small MLP
trained on sklearn's digits."""

from __future__ import annotations

import copy
import importlib
import re

import pytest
import torch
from torch import nn

import fastinfer
from conftest import assert_same, trained_digits_mlp
from fastinfer.convert import calibrate, format_report
from fastinfer.nn import Int8Linear

P = importlib.import_module("fastinfer.convert.prune")  # the module (fastinfer.convert.prune is the function)


def _linear(weight, bias: bool = False) -> nn.Linear:
    weight = torch.as_tensor(weight, dtype=torch.float32)
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
    with torch.no_grad():
        lin.weight.copy_(weight)
    return lin


def _rand(shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _kept(lin: nn.Module) -> torch.Tensor:
    w = lin.weight_int8 if isinstance(lin, Int8Linear) else lin.weight.detach()
    return (w != 0).int()


class Block(nn.Module):
    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.attn = nn.Linear(d, d)
        self.out = nn.Linear(d, d, bias=False)

    def forward(self, x):
        return x + self.out(torch.relu(self.attn(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 32)
        self.encoder = nn.Sequential(Block(), Block())
        self.extra = nn.ModuleDict({"l1": nn.Linear(32, 32), "l10": nn.Linear(32, 32)})
        self.head = nn.Linear(32, 16)

    def forward(self, x):
        h = self.encoder(self.embed(x))
        return self.head(self.extra["l10"](self.extra["l1"](h)))


ALL_LINEAR = {
    "embed", "encoder.0.attn", "encoder.0.out", "encoder.1.attn", "encoder.1.out", "extra.l1", "extra.l10", "head",
}  # fmt: skip


def _net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def _pruned_names(model: nn.Module) -> set[str]:
    return {r.name for r in fastinfer.sparsity_report(model) if r.nonzeros < r.numel}


# ------------------------------------------------------------------------- hand-made exact masks

W_HAND = [[0.1, -0.2, 0.3, -0.4], [5.0, -6.0, 7.0, -8.0]]


def test_magnitude_prunes_smallest_of_whole_layer():
    pruned = fastinfer.prune(_linear(W_HAND), 0.5)
    # the 4 smallest |W| of the layer are all of row 0: magnitude compares across rows
    assert _kept(pruned).tolist() == [[0, 0, 0, 0], [1, 1, 1, 1]]
    assert pruned.weight[1].tolist() == [5.0, -6.0, 7.0, -8.0]  # survivors unchanged


def test_wanda_scores_by_input_norm_per_row():
    # ||X_j|| over all tokens of both batches = [100, 1, 1, 1]
    batches = [torch.tensor([[[60.0, 1.0, 0.0, 0.0]]]), torch.tensor([[80.0, 0.0, 1.0, 1.0]])]
    pruned = fastinfer.prune(_linear(W_HAND), 0.5, method="wanda", calibration_data=batches)
    # row 0 scores [10, .2, .3, .4], row 1 [500, 6, 7, 8]: 2 lowest per row go
    assert _kept(pruned).tolist() == [[1, 0, 0, 1], [1, 0, 0, 1]]


def test_wanda_counts_every_token_of_any_leading_dims():
    # feature 0: one token of 3 (norm 3); feature 1: four tokens of 2 (norm 4) -> feature 0 goes.
    # Counting only the first token (or the first row of dim 0) would prune feature 1 instead.
    x = torch.tensor([[[3.0, 2.0], [0.0, 2.0]], [[0.0, 2.0], [0.0, 2.0]]])
    pruned = fastinfer.prune(_linear([[1.0, 1.0]]), 0.5, method="wanda", calibration_data=[x])
    assert _kept(pruned).tolist() == [[0, 1]]


def test_ties_go_to_the_lower_index():
    ones = torch.ones(2, 8)
    assert _kept(fastinfer.prune(_linear(ones), 0.25)).tolist() == [[0] * 4 + [1] * 4, [1] * 8]
    nm = fastinfer.prune(_linear(ones), 0.5, pattern="2:4")
    assert _kept(nm).tolist() == [[0, 0, 1, 1] * 2] * 2
    blk = fastinfer.prune(_linear(ones), 0.5, pattern="block", block=(1, 4))
    assert _kept(blk).tolist() == [[0] * 8, [1] * 8]


def _ref_lowest(values: list[float], k: int) -> set[int]:
    """Indices of the k lowest values, ties to the lower index (plain Python sort)."""
    return {i for _, i in sorted((v, i) for i, v in enumerate(values))[:k]}


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_many_ties_are_deterministic(method):
    # weights in {1, 2, 3} (thousands of ties, where an unstable sort reorders) and equal norms
    w = torch.randint(1, 4, (16, 64), generator=torch.Generator().manual_seed(0)).float()
    w[::2] *= -1
    pruned = fastinfer.prune(_linear(w), 0.4, method=method, calibration_data=[torch.ones(3, 64)])
    gone = (pruned.weight == 0).flatten().nonzero().flatten().tolist()
    if method == "magnitude":
        assert set(gone) == _ref_lowest(w.abs().flatten().tolist(), round(0.4 * 1024))
    else:
        k = round(0.4 * 64)
        expect = {r * 64 + j for r in range(16) for j in _ref_lowest(w[r].abs().tolist(), k)}
        assert set(gone) == expect


def test_int8_magnitude_uses_row_scale():
    # int8 [[10, 20], [100, 127]] with row scales [1, 0.01]: |W| = [[10, 20], [1, 1.27]], so the
    # smaller row is the second one although its int8 values are larger.
    lin = Int8Linear(2, 2, bias=False)
    lin.set_weight(torch.tensor([[10, 20], [100, 127]], dtype=torch.int8), torch.tensor([1.0, 0.01]))
    pruned = fastinfer.prune(lin, 0.5)
    assert pruned.weight_int8.tolist() == [[10, 20], [0, 0]]
    assert torch.equal(pruned.weight_scale, torch.tensor([1.0, 0.01]))
    assert lin.weight_int8.tolist() == [[10, 20], [100, 127]]  # original untouched


def test_model_that_is_one_linear():
    lin = _linear(_rand((8, 16)))
    pruned = fastinfer.prune(lin, 0.5)
    assert type(pruned) is nn.Linear and pruned is not lin
    assert int((pruned.weight == 0).sum()) == 64


# --------------------------------------------------------------------------------- patterns


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
@pytest.mark.parametrize("nm", ["2:4", "4:8", "1:4", "3:8"])
def test_n_m_masks_are_n_m_and_keep_the_largest(nm, method):
    n, m = map(int, nm.split(":"))
    w = _rand((32, 64))
    x = _rand((20, 64), seed=1) * torch.linspace(0.1, 3.0, 64)
    lin = _linear(w)
    pruned = fastinfer.prune(lin, 1 - n / m, pattern=nm, method=method, calibration_data=[x])
    kept = _kept(pruned).reshape(32, 64 // m, m)
    assert (kept.sum(-1) == n).all()
    score = w.abs() if method == "magnitude" else w.abs() * x.double().norm(dim=0).float()
    score = score.reshape(32, 64 // m, m)
    lowest_kept = torch.where(kept.bool(), score, torch.inf).amin(-1)
    highest_gone = torch.where(kept.bool(), -torch.inf, score).amax(-1)
    assert (lowest_kept >= highest_gone).all()
    assert torch.equal(pruned.weight[kept.reshape(32, 64).bool()], w[kept.reshape(32, 64).bool()])


def test_n_m_with_existing_zeros_stays_n_m():
    w = _rand((4, 16))
    w[0, :3] = 0.0  # a group with 3 zeros: its one nonzero survives, nothing else goes
    pruned = fastinfer.prune(_linear(w), 0.5, pattern="2:4")
    kept = _kept(pruned).reshape(4, 4, 4)
    assert (kept.sum(-1) <= 2).all()
    assert kept[0, 0].tolist() == [0, 0, 0, 1]
    assert (kept.sum(-1) == 2).sum() == 15


@pytest.mark.parametrize("block", [(16, 64), (4, 8), (1, 16)])
@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.8])
def test_block_masks_are_whole_lowest_blocks(block, sparsity):
    r, c = block
    w = _rand((32, 128), seed=2)
    pruned = fastinfer.prune(_linear(w), sparsity, pattern="block", block=block)
    kept = _kept(pruned).reshape(32 // r, r, 128 // c, c)
    per_block = kept.sum(dim=(1, 3))
    assert ((per_block == 0) | (per_block == r * c)).all(), "a block was partly pruned"
    nblocks = per_block.numel()
    assert int((per_block == 0).sum()) == round(sparsity * nblocks)
    score = w.abs().reshape(32 // r, r, 128 // c, c).sum(dim=(1, 3))
    if 0 < sparsity:
        assert score[per_block == 0].max() <= score[per_block > 0].min()
    row = fastinfer.sparsity_report(pruned)[0]
    assert row.sparsity == pytest.approx(round(sparsity * nblocks) / nblocks, abs=1e-12)


def test_block_already_zero_counts_first():
    # 4 blocks of 1x4; block (0, 0) scores 0 under wanda (dead inputs 0-3), block (1, 1) is already
    # zero: pruning one block must pick the zero one, leaving exactly 1 of 4 blocks zero.
    w = torch.ones(2, 8)
    w[1, 4:] = 0.0
    x = torch.cat([torch.zeros(3, 4), torch.ones(3, 4)], dim=1)
    pruned = fastinfer.prune(
        _linear(w), 0.25, pattern="block", block=(1, 4), method="wanda", calibration_data=[x]
    )
    assert _kept(pruned).tolist() == [[1] * 8, [1] * 4 + [0] * 4]


def test_default_block_is_the_int8_tile():
    """64 x 64 where out_features allows it (the kernel's 4-block register tile), else 16 x 64."""
    pruned = fastinfer.prune(_linear(_rand((32, 128))), 0.5, pattern="block")
    kept = _kept(pruned).reshape(2, 16, 2, 64).sum(dim=(1, 3))
    assert sorted(kept.flatten().tolist()) == [0, 0, 1024, 1024]
    pruned = fastinfer.prune(_linear(_rand((128, 256))), 0.5, pattern="block")
    kept = _kept(pruned).reshape(2, 64, 4, 64).sum(dim=(1, 3))
    assert sorted(kept.flatten().tolist()) == [0] * 4 + [4096] * 4


SPARSITIES = [0.0, 0.1, 0.25, 0.5, 0.73, 0.9, 0.99]


@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_achieved_sparsity_is_the_request(sparsity):
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32))
    x = _rand((10, 64))
    x[:, 0] = 0.0  # a dead input: its (nonzero) weights score 0 under wanda, like existing zeros
    with torch.no_grad():
        model[0].weight[:, 10:17] = 0.0  # existing zeros are pruned first and count towards k
    mag = fastinfer.prune(model, sparsity)
    wanda = fastinfer.prune(model, sparsity, method="wanda", calibration_data=[x])
    for lin, (out_f, in_f) in ((0, (48, 64)), (2, (32, 48))):
        numel = out_f * in_f
        zeros_before = int((model[lin].weight == 0).sum())
        expect_mag = max(round(sparsity * numel), zeros_before)
        assert int((mag[lin].weight == 0).sum()) == expect_mag
        k_row = round(sparsity * in_f)
        expect_rows = torch.clamp((model[lin].weight == 0).sum(1), min=k_row)
        assert torch.equal((wanda[lin].weight == 0).sum(1), expect_rows)
    rows = fastinfer.sparsity_report(mag)
    assert [r.name for r in rows] == ["0", "2"]
    assert rows[1].sparsity == pytest.approx(round(sparsity * 1536) / 1536, abs=1e-12)
    assert rows[1].nonzeros == 1536 - round(sparsity * 1536)


def test_zero_sparsity_changes_nothing():
    model = _net()
    pruned = fastinfer.prune(model, 0.0)
    for (k, a), b in zip(model.state_dict().items(), pruned.state_dict().values()):
        assert torch.equal(a, b), k


# ---------------------------------------------------------------------------------- Int8Linear


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "block"])
def test_int8_keeps_scales_and_only_zeroes_entries(pattern):
    sparsity = 0.5
    q = fastinfer.quantize(_net())
    before = {
        n: (m.weight_int8.clone(), m.weight_scale.clone())
        for n, m in q.named_modules()
        if isinstance(m, Int8Linear)
    }
    pruned = fastinfer.prune(q, sparsity, pattern=pattern, block=(16, 16))
    for name, mod in pruned.named_modules():
        if not isinstance(mod, Int8Linear):
            continue
        q0, s0 = before[name]
        q1 = mod.weight_int8
        assert torch.equal(mod.weight_scale, s0), name
        assert torch.equal(q1, torch.where(q1 == 0, torch.zeros_like(q0), q0)), name
        assert int((q1 == 0).sum()) >= round(sparsity * q1.numel())
        assert torch.equal(q.get_submodule(name).weight_int8, q0)  # the quantized original survives
    x = _rand((4, 16))
    assert torch.isfinite(pruned(x)).all()


def test_int8_wanda_on_quantized_model():
    q = fastinfer.quantize(_net())
    x = _rand((8, 16))
    pruned = fastinfer.prune(q, 0.5, pattern="2:4", method="wanda", calibration_data=[x])
    for r in fastinfer.sparsity_report(pruned):
        assert r.kind == "Int8Linear" and r.sparsity == 0.5


def test_prune_then_quantize_keeps_zeros():
    pruned = fastinfer.prune(_net(), 0.5, method="wanda", calibration_data=[_rand((8, 16))])
    q = fastinfer.quantize(pruned)
    for name, mod in q.named_modules():
        if isinstance(mod, Int8Linear):
            zero_f = pruned.get_submodule(name).weight == 0
            assert torch.equal(mod.weight_int8 == 0, zero_f), name
    with torch.no_grad():
        y, yq = pruned(_rand((4, 16))), q(_rand((4, 16)))
    assert torch.isfinite(y).all() and torch.isfinite(yq).all()


def test_conv1d_pruned_in_out_in_view():
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    torch.manual_seed(0)
    layer = conv1d(4, 8)  # nf=4 outputs, nx=8 inputs: weight stored [8, 4]
    ref = _linear(layer.weight.detach().t())
    for pattern in ("2:4", "unstructured"):
        pruned = fastinfer.prune(layer, 0.5, pattern=pattern)
        assert type(pruned) is conv1d
        expect = fastinfer.prune(ref, 0.5, pattern=pattern).weight.detach()
        assert torch.equal(pruned.weight.detach().t(), expect)
    assert (_kept(ref).sum() == 32) and fastinfer.sparsity_report(pruned)[0].out_features == 4


# ------------------------------------------------------------------------- model, skip, sharing


def test_original_untouched_unless_inplace():
    model = _net()
    before = copy.deepcopy(model.state_dict())
    pruned = fastinfer.prune(model, 0.5)
    assert pruned is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [type(m) for m in pruned.modules()] == [type(m) for m in model.modules()]
    assert not hasattr(pruned, "sparsity_report") and vars(pruned).keys() == vars(model).keys()
    assert _pruned_names(pruned) == ALL_LINEAR
    same = fastinfer.prune(model, 0.5, inplace=True)
    assert same is model and _pruned_names(model) == ALL_LINEAR
    for k, v in pruned.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


@pytest.mark.parametrize(
    ("skip", "expected_skipped"),
    [
        ("head", {"head"}),
        (["encoder"], {"encoder.0.attn", "encoder.0.out", "encoder.1.attn", "encoder.1.out"}),
        (["encoder.*.out", "extra.l1"], {"encoder.0.out", "encoder.1.out", "extra.l1"}),
        ([re.compile(r"extra\.l1\d*")], {"extra.l1", "extra.l10"}),
        (["*"], ALL_LINEAR),
    ],
)
def test_skip_patterns(skip, expected_skipped):
    model = _net()
    pruned = fastinfer.prune(model, 0.5, skip=skip)
    assert _pruned_names(pruned) == ALL_LINEAR - expected_skipped
    for name in expected_skipped:
        assert torch.equal(pruned.get_submodule(name).weight, model.get_submodule(name).weight)


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = self.a  # one layer, two names
        self.c = nn.Linear(8, 8)

    def forward(self, x):
        return self.c(self.b(torch.relu(self.a(x))))


def test_shared_layer_pruned_once(monkeypatch):
    calls = []
    real = P._prune_layer
    monkeypatch.setattr(P, "_prune_layer", lambda mod, *a: (calls.append(id(mod)), real(mod, *a)))
    torch.manual_seed(0)
    x = _rand((6, 8))
    pruned = fastinfer.prune(Shared(), 0.5, method="wanda", calibration_data=[x])
    assert len(calls) == 2 and len(set(calls)) == 2
    assert pruned.a is pruned.b and int((pruned.a.weight == 0).sum()) == 32
    assert [r.name for r in fastinfer.sparsity_report(pruned)] == ["a", "c"]
    # skipping either name leaves the shared layer alone
    for name in ("a", "b"):
        kept = fastinfer.prune(Shared(), 0.5, skip=[name])
        assert _pruned_names(kept) == {"c"}


def test_shared_layer_norms_count_every_call():
    torch.manual_seed(0)
    model = Shared().eval()
    x = _rand((6, 8))
    layers = {"a": model.a, "c": model.c}
    norms = calibrate.input_norms(model, layers, [x])
    with torch.no_grad():
        second = torch.relu(model.a(x))
    expect = (x.double().square().sum(0) + second.double().square().sum(0)).sqrt()
    assert torch.allclose(norms["a"], expect, rtol=1e-12, atol=0)
    assert norms["a"].dtype == torch.float64


# ---------------------------------------------------------------------------------- calibration


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(8, 4)
        self.l2 = nn.Linear(8, 4)
        self.drop = nn.Dropout(0.5)
        self.seen = []

    def forward(self, a, b=None):
        self.seen.append((self.training, torch.is_grad_enabled()))
        h = self.drop(self.l1(a))
        return h if b is None else h + self.l2(b)


def _two_inputs() -> TwoInputs:
    torch.manual_seed(0)
    return TwoInputs()


def test_calibration_batch_forms_agree():
    a, b = _rand((5, 8), 1), _rand((5, 8), 2) * torch.arange(8)
    kw = {"pattern": "2:4", "method": "wanda"}
    as_tuple = fastinfer.prune(_two_inputs(), 0.5, calibration_data=[(a, b)], **kw)
    two = [[a[:2], b[:2]], [a[2:], b[2:]]]
    as_list = fastinfer.prune(_two_inputs(), 0.5, calibration_data=two, **kw)
    as_dict = fastinfer.prune(_two_inputs(), 0.5, calibration_data=[{"a": a, "b": b}], **kw)
    one_dict = fastinfer.prune(_two_inputs(), 0.5, calibration_data={"a": a, "b": b}, **kw)
    for other in (as_list, as_dict, one_dict):
        assert torch.equal(as_tuple.l1.weight, other.l1.weight)
        assert torch.equal(as_tuple.l2.weight, other.l2.weight)
    # plain tensor batches reach l1 only: skip l2, and a lone tensor is one batch
    t1 = fastinfer.prune(_two_inputs(), 0.5, calibration_data=[a], skip="l2", **kw)
    t2 = fastinfer.prune(_two_inputs(), 0.5, calibration_data=a, skip="l2", **kw)
    gen = (t for t in [a[:3], a[3:]])
    gen = fastinfer.prune(_two_inputs(), 0.5, calibration_data=gen, skip="l2", **kw)
    assert torch.equal(t1.l1.weight, as_tuple.l1.weight)
    assert torch.equal(t1.l1.weight, t2.l1.weight) and torch.equal(t1.l1.weight, gen.l1.weight)
    assert torch.equal(t1.l2.weight, _two_inputs().l2.weight)


def test_layer_not_reached_by_calibration():
    with pytest.raises(ValueError, match="'l2'.*not called"):
        fastinfer.prune(_two_inputs(), 0.5, method="wanda", calibration_data=[_rand((5, 8))])


def test_calibration_eval_no_grad_and_flags_restored():
    model = _two_inputs().train()
    model.l2.eval()  # mixed flags come back as they were, not as the root's
    calib = [(_rand((5, 8)), _rand((5, 8)))]
    out = fastinfer.prune(model, 0.5, method="wanda", calibration_data=calib, inplace=True)
    assert out is model and model.seen == [(False, False)]
    assert model.training and model.l1.training and model.drop.training and not model.l2.training
    assert all(not m._forward_pre_hooks for m in model.modules())
    copy_ = fastinfer.prune(_two_inputs().train(), 0.5, method="wanda", calibration_data=calib)
    assert copy_.training and all(not m._forward_pre_hooks for m in copy_.modules())


class Boom(Exception):
    pass


def test_hooks_removed_and_weights_untouched_when_the_model_raises():
    model = _two_inputs().train()
    before = copy.deepcopy(model.state_dict())

    def batches():
        yield (_rand((5, 8)), _rand((5, 8)))
        raise Boom("data loader failed")

    with pytest.raises(Boom):
        fastinfer.prune(model, 0.5, method="wanda", calibration_data=batches(), inplace=True)
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert model.training and model.drop.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    q = fastinfer.quantize(model)
    wrong_width = [(torch.ones(2, 3),)]
    with pytest.raises(ValueError, match="Int8Linear"):  # raised inside the model's forward
        fastinfer.prune(q, 0.5, method="wanda", calibration_data=wrong_width, inplace=True)
    assert all(not m._forward_pre_hooks for m in q.modules())


# ------------------------------------------------------------------------------------ bad input


def _bad_weights(value: float) -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with torch.no_grad():
        model[1].weight[2, 3] = value
    return model


@pytest.mark.parametrize(
    ("model", "kwargs", "match"),
    [
        (None, {"sparsity": 1.0}, "sparsity.*1.0"),
        (None, {"sparsity": -0.1}, "sparsity.*-0.1"),
        (None, {"sparsity": float("nan")}, "sparsity.*nan"),
        (None, {"sparsity": float("inf")}, "sparsity.*inf"),
        (None, {"sparsity": True}, "sparsity.*True"),
        (None, {"sparsity": False}, "sparsity.*False"),
        (None, {"sparsity": "0.5"}, "sparsity.*'0.5'"),
        (None, {"sparsity": None}, "sparsity.*None"),
        (None, {"sparsity": 0.5, "pattern": "structured"}, "unstructured.*block.*N:M"),
        (None, {"sparsity": 0.5, "pattern": None}, "unstructured.*block.*N:M"),
        (None, {"sparsity": 0.5, "pattern": "4:2"}, "N:M"),
        (None, {"sparsity": 0.5, "pattern": "0:4"}, "N:M"),
        (None, {"sparsity": 0.5, "pattern": "2:2"}, "N:M"),
        (None, {"sparsity": 0.5, "pattern": "2-4"}, "N:M"),
        (None, {"sparsity": 0.3, "pattern": "2:4"}, "must be 0.5"),
        (None, {"sparsity": 0.5, "pattern": "1:4"}, "must be 0.75"),
        (None, {"sparsity": 0.5, "method": "l1"}, "magnitude.*wanda"),
        (None, {"sparsity": 0.5, "method": "wanda"}, "calibration_data"),
        (None, {"sparsity": 0.5, "method": "wanda", "calibration_data": []}, "no batches"),
        (None, {"sparsity": 0.5, "method": "wanda", "calibration_data": [3]}, "int"),
        (None, {"sparsity": 0.5, "method": "wanda", "calibration_data": 3}, "iterable"),
        (None, {"sparsity": 0.5, "pattern": "block", "block": (0, 4)}, "block"),
        (None, {"sparsity": 0.5, "pattern": "block", "block": (16,)}, "block"),
        (None, {"sparsity": 0.5, "pattern": "block", "block": "16x64"}, "block"),
        (None, {"sparsity": 0.5, "pattern": "block", "block": (16, 64)}, "'embed'.*blocks"),
        (None, {"sparsity": 0.5, "pattern": "block", "block": (32, 3)}, "'embed'.*blocks"),
        (None, {"sparsity": 0.5, "pattern": "2:4", "skip": "head"}, None),
        (nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 6)), {"sparsity": 0.5, "pattern": "2:4"}, None),
        (nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4)), {"sparsity": 0.5, "pattern": "2:4"}, "'1'.*K=6"),
        (_bad_weights(float("nan")), {"sparsity": 0.5}, "'1'.*NaN or Inf"),
        (_bad_weights(float("inf")), {"sparsity": 0.5}, "'1'.*NaN or Inf"),
    ],
)
def test_bad_input(model, kwargs, match):
    model = _net() if model is None else model
    before = copy.deepcopy(model.state_dict())
    if match is None:  # valid: a contrast case for its neighbours
        fastinfer.prune(model, **kwargs)
        return
    with pytest.raises(ValueError, match=match):
        fastinfer.prune(model, **kwargs, inplace=True)
    # nothing was written before the error (NaN == NaN here: the NaN layer must stay as it was too)
    for k, v in model.state_dict().items():
        assert_same(v, before[k], k)


def test_bad_model_type():
    with pytest.raises(TypeError, match="nn.Module"):
        fastinfer.prune([nn.Linear(2, 2)], 0.5)
    with pytest.raises(TypeError, match="nn.Module"):
        fastinfer.sparsity_report("model")


# ------------------------------------------------------------------------------- report, progress


class FakeSparse(nn.Module):
    """Stands for the sparse layers to come: anything with sparsity_stats() is reported."""

    in_features, out_features = 64, 16

    def sparsity_stats(self):
        return 256, 1024


def test_sparsity_report_rows_and_table():
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), FakeSparse(), Int8Linear(8, 2))
    model[3].set_weight(torch.tensor([[1] * 8, [0] * 8], dtype=torch.int8), torch.ones(2))
    rows = fastinfer.sparsity_report(model)
    assert [(r.name, r.kind) for r in rows] == [("0", "Linear"), ("2", "FakeSparse"), ("3", "Int8Linear")]
    r = rows[1]
    assert (r.out_features, r.in_features, r.nonzeros, r.numel, r.sparsity) == (16, 64, 256, 1024, 0.75)
    assert rows[2].sparsity == 0.5 and rows[0].sparsity == 0.0
    with pytest.raises(AttributeError):
        rows[0].sparsity = 1.0  # frozen
    assert "FakeSparse" in str(rows[1]) and "75.00%" in str(rows[1])
    table = format_report(rows)
    lines = table.splitlines()
    assert lines[-1].startswith("total (3 layers)")
    assert lines[-1].endswith(f"{1 - (32 + 256 + 8) / 1072:.2%}")
    assert len({len(l) for l in lines if "-" * 5 in l}) == 1  # rules of one width
    assert fastinfer.sparsity_report(nn.Sequential(nn.ReLU())) == []
    empty = fastinfer.sparsity_report(nn.Linear(0, 3))
    assert empty[0].sparsity == 0.0
    assert "total (0 layers)" in format_report([])


def test_progress_bar(capsys):
    fastinfer.prune(_net(), 0.5, progress=True)
    assert "fastinfer.prune" in capsys.readouterr().err
    fastinfer.prune(_net(), 0.5)  # 8 layers: no bar by default
    assert "fastinfer.prune" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------- digits


def test_trained_mlp_on_digits_keeps_accuracy(record_property):
    """The model of test_convert's digits test. Measured with seeds 0-9: 50% wanda loses at most
    1.7 points (seed 0, the one used), 2:4 wanda keeps >= 0.94, 50% magnitude >= 0.96. A 64-wide
    second layer loses up to 2.4 points under wanda (its 10x64 head suffers), so it is not used."""
    model, x_tr, x_te, y_te = trained_digits_mlp()

    def acc(m: nn.Module) -> float:
        with torch.no_grad():
            return (m(x_te).argmax(1) == y_te).float().mean().item()

    calib = [x_tr[i : i + 64] for i in range(0, len(x_tr), 64)]
    wanda = fastinfer.prune(model, 0.5, method="wanda", calibration_data=calib)
    magnitude = fastinfer.prune(model, 0.5)
    nm = fastinfer.prune(model, 0.5, pattern="2:4", method="wanda", calibration_data=calib)
    accs = {
        "float": acc(model), "wanda_50": acc(wanda), "magnitude_50": acc(magnitude), "wanda_2_4": acc(nm)
    }  # fmt: skip
    for k, v in accs.items():
        record_property(f"digits_acc_{k}", round(v, 4))
    print("digits accuracy:", {k: round(v, 4) for k, v in accs.items()})
    for m in (wanda, magnitude, nm):
        assert all(r.sparsity == 0.5 for r in fastinfer.sparsity_report(m))
    assert accs["float"] >= 0.95, accs
    assert accs["wanda_50"] >= accs["float"] - 0.02, accs
    assert accs["wanda_2_4"] >= 0.80, accs
    assert accs["magnitude_50"] >= 0.5, accs  # reported; far above chance (0.1) is all we claim
