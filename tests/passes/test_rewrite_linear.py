"""rewrite_linear: transposed-weight spellings, filter_fn order, the cost guard, and the
FLOPs of STL layers the model already held."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from stl_helpers import rel_err
from torch import nn

from stl_compiler import STLConfig, dense_flops, stl_compile, stl_flops, swap_linears_

SPELLINGS = {
    "x @ w.T + b": lambda x, w, b: x @ w.T + b,          # Falcon's FalconLinear
    "matmul(x, w.t()) + b": lambda x, w, b: torch.matmul(x, w.t()) + b,
    "x @ w.transpose(0, 1) + b": lambda x, w, b: x @ w.transpose(0, 1) + b,
    "x @ w.permute(1, 0) + b": lambda x, w, b: x @ w.permute(1, 0) + b,
    "addmm(b, x2d, w.t())": lambda x, w, b: torch.addmm(b, x.reshape(-1, x.shape[-1]),
                                                         w.t()).reshape(*x.shape[:-1], -1),
    "F.linear(x, w, b)": lambda x, w, b: F.linear(x, w, b),
}


class TransposedWeight(nn.Module):
    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(48, 40) / 40 ** 0.5)  # (out, in) as nn.Linear
        self.bias = nn.Parameter(torch.randn(48))
        self.spelling = SPELLINGS[spelling]

    def forward(self, x):
        return self.spelling(x, self.weight, self.bias)


class Holder(nn.Module):
    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.proj = TransposedWeight(spelling)

    def forward(self, x):
        return torch.relu(self.proj(x))


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_transposed_parameter_weight_is_a_linear_site(spelling):
    model = Holder(spelling)
    x = torch.randn(2, 6, 40)
    config = STLConfig(basis="strassen", max_cost_ratio=None)
    compiled = stl_compile(model, (x,), config, backend="eager")
    sites = compiled.stl_report.sites
    assert [(s.name, s.kind, s.converted, s.w_shape) for s in sites] == \
        [("proj", "linear", True, (40, 48))]
    assert rel_err(compiled(x), model(x)) < 1e-5  # exact basis: dense result
    # the weight is encoded once, as an STLLinear parameter; the dense one left the graph
    names = [n for n, _ in compiled.named_parameters()]
    assert "proj.weight" not in names
    assert len([n for n in names if n.endswith("weight_encoded")]) == 1


def test_one_weight_shared_by_two_transposed_calls_is_one_site():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(32, 32))

        def forward(self, x):
            return x @ self.weight.T + torch.matmul(x * 2, self.weight.t())

    model, x = Shared(), torch.randn(3, 8, 32)
    compiled = stl_compile(model, (x,), STLConfig(basis="strassen", max_cost_ratio=None),
                           backend="eager")
    (site,) = compiled.stl_report.sites
    assert site.converted and site.calls == 2
    assert rel_err(compiled(x), model(x)) < 1e-5


def test_filter_fn_gets_the_weight_owner_and_the_fqn():
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128))
    seen = {}

    def only_first(module, fqn):
        seen[fqn] = module
        return fqn == "0"

    compiled = stl_compile(model, (torch.randn(2, 8, 128),),
                           STLConfig(basis="random", filter_fn=only_first), backend="eager")
    assert set(seen) == {"0", "2"}
    assert seen["2"].weight.shape == (128, 128)  # the module that owns the weight
    rows = {s.name: s for s in compiled.stl_report.sites}
    assert rows["0"].converted and rows["2"].reason == "filtered by filter_fn"


@pytest.mark.parametrize("dims, ratio", [((8, 8), "6.38x"), ((3, 5), "20.00x"),
                                         ((64, 64), "1.12x")])
def test_cost_guard_keeps_costly_linears_dense_with_the_reason(dims, ratio):
    model = nn.Sequential(nn.Linear(*dims))
    x = torch.randn(2, 8, dims[0])
    with pytest.warns(UserWarning, match="converted NOTHING"):
        compiled = stl_compile(model, (x,), STLConfig(basis="random", min_dim=1),
                               backend="eager")
    (row,) = compiled.stl_report.sites
    k, m = dims
    assert not row.converted
    assert row.reason == (f"cost: STL costs {ratio} dense FLOPs > max_cost_ratio=0.8 "
                          f"(max_cost_ratio=None converts anyway)")
    assert row.stl_flops == stl_flops(16, k, m, 4, 24) and row.dense_flops == 16 * 2 * k * m
    assert f"{ratio} dense FLOPs" in str(compiled.stl_report)
    forced = stl_compile(model, (x,), STLConfig(basis="random", min_dim=1, max_cost_ratio=None),
                         backend="eager")
    assert forced.stl_report.sites[0].converted


def test_preconverted_layers_count_in_the_headline():
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128),
                          nn.ReLU(), nn.Linear(128, 512))
    swap_linears_(model, STLConfig(basis="random", rank=16, overrides={"4": "skip"}))
    x = torch.randn(3, 10, 128)  # 30 rows, padded to 4 x 3 x 3 = 36 per sequence tile
    compiled = stl_compile(model, (x,), STLConfig(basis="random", rank=24), backend="eager")
    report = compiled.stl_report
    rows = {s.name: s for s in report.sites}
    for name, (k, m) in {"0": (128, 256), "2": (256, 128)}.items():
        row = rows[name]
        assert row.preconverted and row.converted and (row.tile, row.rank) == (4, 16)
        assert row.dense_flops == dense_flops(30, k, m)
        assert row.stl_flops == stl_flops(36, k, m, 4, 16)
        assert row.dense_bytes > 0 and row.stl_bytes > 0
    assert rows["4"].converted and not rows["4"].preconverted and rows["4"].rank == 24
    dense, after = report.flops()
    assert dense == sum(dense_flops(30, k, m) for k, m in ((128, 256), (256, 128), (128, 512)))
    assert after == (stl_flops(36, 128, 256, 4, 16) + stl_flops(36, 256, 128, 4, 16)
                     + stl_flops(36, 128, 512, 4, 24))
    text = " ".join(str(report).split())
    assert "3 of 3 matmul sites converted (1 now, 2 already STL in the model)" in text
    assert f"({after / dense:.3f}x)" in text
