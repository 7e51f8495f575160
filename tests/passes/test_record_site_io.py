"""record_site_io: each matmul-like node's example inputs and output, recorded on the
context; the graph is left as it was, and nothing outlives the pass."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pass_helpers import CONVERT_ALL, captured, run, targets
from torch import nn

from stl_compiler import STLConfig
from stl_compiler.passes import record_site_io as module
from stl_compiler.passes.record_site_io import MATMUL_OPS, record_site_io


class TwoLinearsAndScores(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(16, 8), nn.Linear(16, 8, bias=False)

    def forward(self, x):
        return torch.relu(self.q(x)) @ self.k(x).transpose(-2, -1)


def _example():
    torch.manual_seed(0)
    return TwoLinearsAndScores(), torch.randn(2, 6, 16)


def test_records_every_matmul_and_keeps_the_graph():
    model, x = _example()
    gm, ctx = captured(model, x)
    before = targets(gm)
    sites = [n.name for n in gm.graph.nodes if n.target in MATMUL_OPS]
    assert len(sites) == 3  # two linears, one matmul

    gm = run(gm, ctx, record_site_io)

    assert targets(gm) == before
    assert sorted(ctx.site_io) == sorted(sites)
    linears = [n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default]
    (x_in, weight, bias), out = ctx.site_io[linears[0].name]
    assert torch.equal(x_in, x)
    assert torch.equal(weight, model.q.weight) and torch.equal(bias, model.q.bias)
    assert torch.equal(out, F.linear(x, model.q.weight, model.q.bias))
    (product_node,) = [n for n in gm.graph.nodes if n.target in MATMUL_OPS
                       and n.target is not torch.ops.aten.linear.default]
    (left, right), product = ctx.site_io[product_node.name]
    assert torch.equal(product, left @ right)
    assert torch.equal(product, model(x))


def test_copies_are_detached_and_owned():
    model, x = _example()
    gm, ctx = captured(model, x)
    run(gm, ctx, record_site_io)
    for inputs, output in ctx.site_io.values():
        assert not output.requires_grad
        assert all(not t.requires_grad for t in inputs if isinstance(t, torch.Tensor))
    (x_in, *_), _ = next(iter(ctx.site_io.values()))
    assert x_in.data_ptr() != x.data_ptr()


def test_off_without_measure_error():
    model, x = _example()
    gm, ctx = captured(model, x, config=STLConfig(measure_error=False, **CONVERT_ALL))
    run(gm, ctx, record_site_io)
    assert ctx.site_io == {}


def test_no_module_level_state():
    """Two contexts get their own records; the module keeps no store between calls."""
    model, x = _example()
    gm1, ctx1 = captured(model, x)
    gm2, ctx2 = captured(model, 2 * x)
    run(gm1, ctx1, record_site_io)
    run(gm2, ctx2, record_site_io)
    name = next(iter(ctx1.site_io))  # the first linear: its input is the model's input
    assert torch.equal(ctx2.site_io[name][0][0], 2 * ctx1.site_io[name][0][0])
    assert not any(isinstance(v, dict) and not k.startswith("__") and k != "MATMUL_OPS"
                   for k, v in vars(module).items())
