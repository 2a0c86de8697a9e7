"""quantize, prune and sparsify pick their layers with one scan (fastinfer/convert/_select.py). A
layer registered under two names is one target for all three: converted under both names (it stays
one layer) or, when either name is skipped or filtered out, left alone under both. Before the one
scan, quantize and sparsify decided per name: skipping "a" left a float layer under "a" and a
converted copy under "b"."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastinfer
from fastinfer import QuantConfig
from fastinfer.convert._select import select
from fastinfer.nn import Int8Linear, SparseLinear


class Shared(nn.Module):
    def __init__(self, density: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(64, 64)
        self.b = self.a  # one layer, two names
        self.c = nn.Linear(64, 64)
        with torch.no_grad():
            for lin in (self.a, self.c):
                lin.weight.mul_(torch.rand(lin.weight.shape) < density)

    def forward(self, x):
        return self.c(self.b(torch.relu(self.a(x))))


def _converted(which: str, model: nn.Module, before: nn.Module, name: str) -> bool:
    layer = model.get_submodule(name)
    if which == "quantize":
        return isinstance(layer, Int8Linear)
    if which == "sparsify":
        return isinstance(layer, SparseLinear)
    return not torch.equal(layer.weight, before.get_submodule(name).weight)  # prune wrote zeros


def _run(which: str, skip=(), filter_fn=None):
    model = Shared(density=1.0 if which == "prune" else 0.05).eval()
    before = Shared(density=1.0 if which == "prune" else 0.05).eval()
    if which == "quantize":
        out = fastinfer.quantize(model, QuantConfig(skip=skip, filter_fn=filter_fn))
    elif which == "sparsify":
        out = fastinfer.sparsify(model, skip=skip)
    else:
        out = fastinfer.prune(model, 0.5, skip=skip)
    return out, before


@pytest.mark.parametrize("which", ["quantize", "prune", "sparsify"])
@pytest.mark.parametrize("skip", [(), ("a",), ("b",)], ids=["no-skip", "skip-a", "skip-b"])
def test_entry_points_agree_on_a_shared_layer(which, skip):
    out, before = _run(which, skip=skip)
    assert out.a is out.b
    assert _converted(which, out, before, "a") == (not skip)
    assert _converted(which, out, before, "c")
    x = torch.randn(3, 64)
    with torch.no_grad():
        out(x)  # still one model that runs


def test_filter_fn_rejecting_one_name_keeps_the_shared_layer_whole():
    out, _ = _run("quantize", filter_fn=lambda mod, name: name != "b")
    assert out.a is out.b and type(out.a) is nn.Linear and isinstance(out.c, Int8Linear)


def test_select_gives_every_name_of_a_layer():
    model = Shared(density=1.0)
    targets = select(model)
    assert [t.names for t in targets] == [("a", "b"), ("c",)]
    assert targets[0].module is model.a
    assert [t.names for t in select(model, skip=("b",))] == [("c",)]
    assert [t.names for t in select(model, min_features=65)] == []
