"""The GEMM-decode fusion pass: where the dispatch table says so, ``bmm → decode`` becomes one
``stl::gemm_decode`` and the graph computes what the unfused graph computes."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from stl_helpers import rel_err
from torch import nn

from stl_compiler import STLConfig, stl_compile
from stl_compiler.passes.fuse_gemm_decode import FusedRegion, fused_is_faster

# the package exports the pass function under the module's name
pass_module = importlib.import_module("stl_compiler.passes.fuse_gemm_decode")

stl = torch.ops.stl
#: Small test layers cost more than dense: convert them anyway (the cost guard's fields exist
#: only in configs that have the guard).
CONVERT_ALL = {name: None for name in ("max_cost_ratio", "max_bytes_ratio")
               if hasattr(STLConfig, name)}
EVERYWHERE = (FusedRegion((1, 2**20), (1, 2**20), (1, 64)),)


def _count(gm, *ops):
    return sum(1 for n in gm.graph.nodes if n.target in [op.default for op in ops])


class Residual(nn.Module):
    """fc1 (bias) → GELU → fc2 (no bias) → residual: fc1's decode feeds fc2's encode (the
    decode → encode fusion takes it when ``fuse``), fc2's decode feeds a residual add."""

    def __init__(self, dim=32, bias2=False):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim, bias=bias2)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(x)))


def _compile(model, x, table, monkeypatch, fuse=True, **config):
    monkeypatch.setattr(pass_module, "FUSED_FASTER", table)
    return stl_compile(model, (x,), STLConfig(min_dim=8, fuse=fuse, **CONVERT_ALL, **config),
                       backend="eager")


BASES = [{"basis": "strassen"}, {"basis": "random", "rank": 24}]


@pytest.mark.parametrize("basis", BASES, ids=["exact", "rank24"])
@pytest.mark.parametrize("seq", [8, 10])  # 10: partial tiles, cropped inside the op
def test_fused_graph_equals_unfused(basis, seq, monkeypatch):
    model = Residual().eval()
    x = torch.randn(2, seq, 32)
    plain = _compile(model, x, (), monkeypatch, **basis)
    fused = _compile(model, x, EVERYWHERE, monkeypatch, **basis)
    # fc1's decode went into fc2's encode (decode_act_encode); fc2's bmm + decode fused here
    assert _count(plain, stl.gemm_decode) == 0 and _count(plain, stl.decode) == 1
    assert _count(fused, stl.gemm_decode) == 1
    assert _count(fused, stl.decode, stl.decode_epilogue) == 0
    assert sum(1 for n in fused.graph.nodes if n.target is torch.ops.aten.bmm.default) == 1
    for size in ((2, seq), (3, 7)):  # the example shape and another (dynamic dims)
        x2 = torch.randn(*size, 32)
        with torch.no_grad():
            assert rel_err(fused(x2), plain(x2)) < 1e-5
            if basis["basis"] == "strassen":
                assert rel_err(fused(x2), model(x2)) < 1e-5


def test_fuse_off_leaves_graph(monkeypatch):
    """``config.fuse=False`` turns every fusion pass off, this one too."""
    fused = _compile(Residual().eval(), torch.randn(2, 8, 32), EVERYWHERE, monkeypatch,
                     fuse=False, basis="strassen")
    assert _count(fused, stl.gemm_decode) == 0
    assert _count(fused, stl.decode, stl.decode_epilogue) == 2


def test_bias_epilogue_and_unfused_sites(monkeypatch):
    """Without the decode → encode fusion both sites' bmm + decode fuse; fc2 keeps its bias."""
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    x = torch.randn(4, 12, 32)
    plain = _compile(model, x, (), monkeypatch, basis="strassen", fuse_row_strip=False)
    plain_decodes = _count(plain, stl.decode, stl.decode_epilogue)
    fused = _compile(model, x, EVERYWHERE, monkeypatch, basis="strassen",
                     fuse_row_strip=False)
    assert _count(fused, stl.gemm_decode) == plain_decodes >= 1
    epilogues = [n for n in fused.graph.nodes if n.target is stl.gemm_decode.default]
    assert all(n.args[3] is not None for n in epilogues)  # the biases rode along
    with torch.no_grad():
        assert rel_err(fused(x), plain(x)) < 1e-5
        assert rel_err(fused(x), model(x)) < 1e-5


def test_table_decides(monkeypatch):
    """Only sites inside a measured region are rewritten."""
    model = Residual().eval()
    x = torch.randn(2, 8, 32)
    fc2_only = (FusedRegion((64, 64), (32, 32), (1, 64)),)  # fc2: 64 → 32
    elsewhere = (FusedRegion((64, 64), (33, 4096), (1, 64)),)
    assert _count(_compile(model, x, fc2_only, monkeypatch, basis="strassen"),
                  stl.gemm_decode) == 1
    assert _count(_compile(model, x, elsewhere, monkeypatch, basis="strassen"),
                  stl.gemm_decode) == 0


def test_fused_is_faster_reads_the_table(monkeypatch):
    monkeypatch.setattr(pass_module, "FUSED_FASTER", (FusedRegion((1024, 1280), (4096, 5120),
                                                                   (16, 24)),))
    assert fused_is_faster(1280, 5120, 24)
    assert not fused_is_faster(1280, 5120, 32)
    assert not fused_is_faster(5120, 1280, 24)
