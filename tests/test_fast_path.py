"""The layers' eager fast path (fastinfer/nn/_base.py, _FastCall): used after one fully checked call, equal to
the op it bypasses, and dropped as soon as a weight buffer is written, replaced or copied."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastinfer
from conftest import ISAS
from fastinfer import ops
from fastinfer.nn import Int8Linear, SparseInt8Linear, SparseLinear
from fastinfer.nn._base import _FAST

LAYERS = pytest.mark.parametrize("which", [0, 1, 2], ids=["Int8Linear", "SparseInt8Linear", "SparseLinear-ell"])


def _layers(k=96, n=40):
    torch.manual_seed(0)
    lin = nn.Linear(k, n)
    dense = Int8Linear.from_linear(lin)
    pruned = fastinfer.prune(nn.Sequential(nn.Linear(k, n)), 0.8, progress=False)
    sparse = SparseInt8Linear.from_int8linear(fastinfer.quantize(pruned)[0], "csr")
    return dense, sparse, SparseLinear.from_linear(pruned[0], "ell")


def _slow(layer, x):
    if isinstance(layer, SparseLinear):
        return torch.ops.fastinfer.sparse_linear(x, layer.sparse_weight, layer.bias, layer.out_features)
    if isinstance(layer, SparseInt8Linear):
        return torch.ops.fastinfer.sparse_int8_linear(x, layer.sparse_weight, layer.weight_scale, layer.bias)
    return torch.ops.fastinfer.int8_linear(x, layer.packed_weight, layer.weight_scale, layer.bias)


@LAYERS
def test_fast_path_is_used_and_equals_the_op(which):
    layer = _layers()[which]
    assert _FAST.get(layer) is None
    layer(torch.randn(2, 96))
    assert _FAST.get(layer) is not None
    base = torch.randn(6, 2 * 96)
    for x in (torch.randn(96), torch.randn(3, 96), torch.randn(2, 3, 96), torch.randn(5, 96).bfloat16(),
              base[:, ::2], base[1:2, :96], torch.randn(96, 4).T):  # fmt: skip
        y = layer(x)
        assert _FAST.get(layer) is not None
        assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], 40)
        assert torch.equal(y, _slow(layer, x)), tuple(x.shape)


def test_declined_inputs_keep_the_fast_path():
    """An input the fast call hands to the checked op (one autograd would see) runs the op and leaves
    the existing fast call in place instead of rebuilding it every call. bf16 into an fp32 layer and
    an empty batch run the fast call itself: it is the op's own prepared call."""
    layer = _layers()[2]
    layer(torch.randn(2, 96))
    fast = _FAST.get(layer)
    for x in (torch.randn(3, 96).bfloat16(), torch.randn(0, 96), torch.randn(3, 96, requires_grad=True)):
        y = layer(x)
        assert _FAST.get(layer) is fast
        assert y.dtype == x.dtype and torch.equal(y.detach(), _slow(layer, x.detach()))


@LAYERS
def test_fast_path_sees_every_weight_change(which):
    layer = _layers()[which]
    x = torch.randn(4, 96)
    y0 = layer(x)
    layer.bias.add_(1)  # in place: version bump
    y1 = layer(x)
    assert torch.equal(y1, _slow(layer, x)) and not torch.equal(y1, y0)
    layer.bias = torch.zeros(40)  # replaced buffer
    assert torch.equal(layer(x), _slow(layer, x))
    other = _layers(96, 40)[which]
    other.bias.mul_(3)
    if which < 2:
        layer.weight_scale.mul_(2)
        assert torch.equal(layer(x), _slow(layer, x))
        layer.weight_scale = torch.ones(40)
        assert torch.equal(layer(x), _slow(layer, x))
        other.weight_scale.mul_(3)
    layer.load_state_dict(other.state_dict())  # copies in place, or replaces the sparse buffer
    y = layer(x)
    assert torch.equal(y, other(x)) and torch.equal(y, _slow(layer, x))
    if which == 0:
        q = torch.randint(-127, 128, (40, 96), dtype=torch.int8)
        layer.set_weight(q, torch.full((40,), 0.01))
        assert torch.equal(layer(x), _slow(layer, x))
    w = layer._buffers["packed_weight" if which == 0 else "sparse_weight"]
    w2 = w.clone()
    with torch.no_grad():
        w.copy_(w2)  # same bytes, new version: re-checked, same answer
    assert torch.equal(layer(x), _slow(layer, x))


def test_in_place_corruption_of_a_sparse_weight_is_caught_not_run():
    layer = _layers()[1]
    x = torch.randn(2, 96)
    layer(x)
    idx_off = 64 + (8 * 41 + 63) // 64 * 64  # csr: header, rowptr int64 [n + 1], then uint16 indices
    with torch.no_grad():
        layer.sparse_weight[idx_off : idx_off + 2] = 255  # first column index -> 65535 >= K
    with pytest.raises(ValueError, match="out of range"):
        layer(x)


@pytest.mark.parametrize("move", ["share_memory", "data", "bias_data"])
def test_moved_storage_drops_the_fast_path(move):
    """share_memory_() and `.data =` swap a buffer's storage without a version bump (and, here, with
    the same size): the fast path must notice (the address is part of its key), drop its fast call,
    rebuild one for the new storage, and never read the old storage."""
    layer = _layers()[1]
    x = torch.randn(2, 96)
    ref = layer(x)
    layer(x)
    old = _FAST.get(layer)
    assert old is not None and old.valid_for(layer)
    if move == "share_memory":
        before = layer.sparse_weight.data_ptr()
        layer.share_memory()
        assert layer.sparse_weight.data_ptr() != before
    elif move == "data":
        layer.sparse_weight.data = layer.sparse_weight.clone()  # same bytes, another storage
    else:
        layer.bias.data = torch.full((40,), 7.0)  # same size, other values, another storage
    assert not old.valid_for(layer)  # versions and sizes are unchanged: only the address tells
    y = layer(x)
    rebuilt = _FAST.get(layer)
    assert rebuilt is not None and rebuilt is not old and rebuilt.valid_for(layer)
    assert rebuilt.run.weight.data_ptr() == layer.sparse_weight.data_ptr()
    assert rebuilt.run.bias.data_ptr() == layer.bias.data_ptr()
    assert torch.equal(y, _slow(layer, x))
    assert torch.equal(y, ref) == (move != "bias_data")


def test_corrupt_storage_swapped_in_is_caught():
    """A storage swapped in by `.data =` is checked in full before the kernel reads it."""
    layer = _layers()[1]
    x = torch.randn(2, 96)
    layer(x)
    bad = layer.sparse_weight.clone()
    bad[0:4] = 0  # the header magic: the full path refuses it
    layer.sparse_weight.data = bad
    with pytest.raises(ValueError, match="magic"):
        layer(x)


def test_copies_do_not_share_the_fast_path():
    layer = _layers()[0]
    x = torch.randn(3, 96)
    y = layer(x)
    twin = copy.deepcopy(layer)
    assert _FAST.get(twin) is None
    twin.weight_scale.mul_(2)
    assert torch.equal(layer(x), y)
    assert torch.equal(twin(x), _slow(twin, x)) and not torch.equal(twin(x), y)


def test_inference_tensor_weights_take_the_checked_path():
    with torch.inference_mode():
        layer = Int8Linear.from_linear(nn.Linear(32, 8))
        x = torch.randn(2, 32)
        y = layer(x)
    assert _FAST.get(layer) is None  # no version counter: nothing to key a cache on
    assert torch.equal(y, _slow(layer, x))


@LAYERS
def test_bad_inputs_still_raise_after_the_fast_path_exists(which):
    layer = _layers()[which]
    layer(torch.randn(2, 96))
    with pytest.raises(ValueError, match="last dim must be 96"):
        layer(torch.randn(2, 95))
    with pytest.raises(TypeError, match="float32 and bfloat16"):
        layer(torch.randn(2, 96).double())
    with pytest.raises(TypeError, match="expects a tensor"):
        layer([1.0] * 96)
    assert layer(torch.randn(0, 96)).shape == (0, 40)


@pytest.mark.parametrize("isa", ISAS)
def test_fast_path_stays_correct_across_an_isa_switch(isa):
    layer = _layers()[0]
    x = torch.randn(5, 96)
    before = fastinfer.set_isa(None)
    try:
        layer(x)  # built under the detected ISA
        assert _FAST.get(layer) is not None
        fastinfer.set_isa(isa)
        assert torch.equal(layer(x), _slow(layer, x))
    finally:
        fastinfer.set_isa(before)


def test_eager_call_overhead_is_recorded_only_for_eager_calls():
    layer = _layers()[0]
    x = torch.randn(2, 96, requires_grad=True)
    y = layer(x)  # autograd would see the call: the checked op path
    assert _FAST.get(layer) is None
    assert torch.equal(y.detach(), ops.int8_linear(x.detach(), layer.packed_weight, layer.weight_scale, layer.bias))


def test_jit_trace_records_the_ops_not_the_fast_path():
    """torch.jit.trace sees only dispatcher calls: under tracing the layers must go through the
    registered ops, or the trace would hold an empty output allocation instead of the layer."""
    import warnings

    layers = _layers()
    model = nn.Sequential(layers[0], nn.ReLU(), nn.Linear(40, 96), layers[1], nn.ReLU(), nn.Linear(40, 96), layers[2])
    x = torch.randn(4, 96)
    model(x)  # the eager fast paths exist before tracing
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, x, check_trace=False)
    x2 = torch.randn(4, 96)
    with torch.no_grad():
        assert torch.equal(traced(x2), model(x2))
