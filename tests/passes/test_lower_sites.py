"""lower_sites: the rewritten graph's STL modules become ``stl::encode → product → stl::decode``
nodes by one re-capture; values, site names and dynamic sizes are kept."""

from __future__ import annotations

import torch
from pass_helpers import CONVERT_ALL, captured, count, run, targets
from torch import nn

from stl_compiler import STLConfig
from stl_compiler.nn import STLLinear, STLMatmul
from stl_compiler.passes import REWRITES
from stl_compiler.passes._graph import module_path
from stl_compiler.passes.lower_sites import lower_sites

stl = torch.ops.stl


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 32, bias=False)

    def forward(self, x):
        h = self.down(torch.relu(self.up(x)))
        return h @ h.transpose(-2, -1)


def _rewritten(config=None):
    torch.manual_seed(0)
    model, x = Block(), torch.randn(2, 16, 32)
    gm, ctx = captured(model, x, config=config or STLConfig(targets=("linear", "matmul"),
                                                            **CONVERT_ALL))
    return run(gm, ctx, *REWRITES), ctx, x


def _stl_modules(gm):
    return [type(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"
            and isinstance(gm.get_submodule(n.target), STLLinear | STLMatmul)]


def test_sites_become_encode_bmm_decode():
    gm, ctx, x = _rewritten()
    assert sorted(map(str, _stl_modules(gm))) == sorted(map(str, [STLLinear, STLLinear,
                                                                  STLMatmul]))
    reference = gm(x)

    lowered = run(gm, ctx, lower_sites)

    assert _stl_modules(lowered) == []
    # up: x encoded; down: relu(up) encoded; matmul: both operands encoded
    assert count(lowered, stl.encode.default) == 4
    decodes = [n for n in lowered.graph.nodes
               if n.target in (stl.decode.default, stl.decode_epilogue.default)]
    assert len(decodes) == 3
    # linear sites: the encoded input times the encoded weight (bmm); the matmul site: the
    # two encoded operands (matmul)
    assert count(lowered, torch.ops.aten.bmm.default) == 2
    assert count(lowered, torch.ops.aten.matmul.default) == 1
    assert {module_path(n) for n in decodes} >= {"up", "down"}
    assert all("val" in n.meta for n in lowered.graph.nodes if n.op == "call_function")
    torch.testing.assert_close(lowered(x), reference, rtol=0, atol=0)


def test_dynamic_sizes_survive():
    gm, ctx, x = _rewritten()
    lowered = run(gm, ctx, lower_sites)
    other = torch.randn(3, 5, 32)
    torch.testing.assert_close(lowered(other), gm(other), rtol=0, atol=0)
    sizes = [n for n in lowered.graph.nodes if n.target is torch.ops.aten.sym_size.int]
    assert len({str(n.meta["val"]) for n in sizes}) == len(sizes)  # each size read once


def test_nothing_converted_is_left_alone():
    gm, ctx, _ = _rewritten(STLConfig(targets=()))
    before = targets(gm)
    assert run(gm, ctx, lower_sites) is gm
    assert targets(gm) == before
