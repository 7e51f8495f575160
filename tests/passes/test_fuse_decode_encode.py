"""The fusion pass: fused and unfused graphs agree, node counts drop as expected, gradients
match, and every boundary is reported."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from model_zoo import CASES, output_tensor
from stl_helpers import assert_gradients_match, rel_err, tiny_config
from torch import nn

from stl_compiler import stl_compile
from stl_compiler.models import MLP
from stl_compiler.passes._graph import module_path

stl = torch.ops.stl


def _count(gm, op):
    return sum(1 for n in gm.graph.nodes if n.target is op.default)


def _decodes(gm):
    """Decode nodes, with or without a fused bias epilogue."""
    return _count(gm, stl.decode) + _count(gm, stl.decode_epilogue)


def _pair(model, args, kwargs=None, dynamic_shapes="auto", **config):
    kwargs = kwargs or {}
    return [stl_compile(model, args, tiny_config(fuse=fuse, **config),
                        example_kwargs=kwargs, dynamic_shapes=dynamic_shapes, backend="eager")
            for fuse in (False, True)]


class PreNormBlock(nn.Module):
    def __init__(self, dim=32, norm="layer"):
        super().__init__()
        self.norm = nn.LayerNorm(dim) if norm == "layer" else nn.RMSNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


BASES = [{"basis": "strassen"}, {"basis": "random", "rank": 24}]


@pytest.mark.parametrize("basis", BASES, ids=["exact", "rank24"])
@pytest.mark.parametrize("seq", [8, 10])  # 10: padded rows must be re-zeroed inside the op
def test_mlp_chain_fuses_both_boundaries(basis, seq):
    model = MLP([32, 64, 48, 16], ["gelu", "relu"]).eval()
    x = torch.randn(2, seq, 32)
    plain, fused = _pair(model, (x,), **basis)
    assert (_count(plain, stl.encode), _decodes(plain)) == (3, 3)
    assert (_count(fused, stl.encode), _decodes(fused)) == (1, 1)
    assert _count(fused, stl.decode_act_encode) == 2
    kinds = [(b.producer, b.consumers, b.kind, b.reason) for b in fused.stl_report.boundaries]
    assert kinds == [("layers.0", ["layers.1"], "elementwise", "bias+gelu"),
                     ("layers.1", ["layers.2"], "elementwise", "bias+relu")]
    assert all(b.bytes_saved > 0 for b in fused.stl_report.boundaries)
    for size in ((2, seq), (3, 7)):
        x2 = torch.randn(*size, 32)
        with torch.no_grad():
            assert rel_err(fused(x2), plain(x2)) < 1e-5
    if basis["basis"] == "strassen":
        with torch.no_grad():
            assert rel_err(fused(x), model(x)) < 1e-4


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("basis", BASES, ids=["exact", "rank24"])
def test_prenorm_residual_block(norm, basis):
    model = PreNormBlock(norm=norm).eval()
    x = torch.randn(2, 8, 32)
    plain, fused = _pair(model, (x,), **basis)
    assert _count(fused, stl.decode_act_encode) == 1
    assert _count(fused, stl.encode) == _count(plain, stl.encode) - 1
    with torch.no_grad():
        assert rel_err(fused(x), plain(x)) < 1e-5


# Per model with 2 blocks: (reencode ops, decode_act_encode, decode_glu_encode,
# decode_norm_encode, decode_softmax_encode, decodes removed, encodes removed). Algebraic per
# block: Q, K, V -> QKᵀ/AV and AV -> out (4), except Llama where rotary embeddings keep Q and K
# decoded (2); the MLP boundary is GELU (element-wise) or SwiGLU (gated: two decodes into one
# encode). Row strips: the attention softmax of every block (QKᵀ -> AV), and every norm reading
# a decoded sum (residual + norm), i.e. all but the first (it reads the embedding) and, in BERT,
# the last (the pooler reads one token); the repo ViT's first norm reads the patch embedding (an
# STL site) plus the positional embedding. Each row strip removes one decode and the encodes of
# every site reading it (3 for Q/K/V, 2 for gate/up).
EXPECTED = {
    "vit": (8, 2, 0, 4, 2, 10 + 4 + 2, 10 + 3 + 1 + 3 + 1 + 2),
    "bert": (8, 2, 0, 3, 2, 10 + 3 + 2, 10 + 1 + 3 + 1 + 2),
    "llama": (4, 0, 2, 4, 2, 8 + 4 + 2, 6 + 2 + 3 + 2 + 1 + 2),
    "decoder": (8, 0, 2, 4, 2, 12 + 4 + 2, 10 + 2 + 3 + 2 + 1 + 2),
}


@pytest.mark.parametrize("basis", BASES, ids=["exact", "rank24"])
@pytest.mark.parametrize("name", list(EXPECTED))
def test_models_agree_and_counts_drop(name, basis):
    case = CASES[name]
    model = case.build().eval()
    b, s = case.example
    plain, fused = _pair(model, case.args(b, s), case.kwargs(b, s),
                         decompose_sdpa=case.uses_sdpa, **basis)
    reencodes, act, glu, norms, softmaxes, decodes_removed, encodes_removed = EXPECTED[name]
    assert _count(fused, stl.reencode) == reencodes
    assert _count(fused, stl.decode_act_encode) == act
    assert _count(fused, stl.decode_glu_encode) == glu
    assert _count(fused, stl.decode_norm_encode) == norms
    assert _count(fused, stl.decode_softmax_encode) == softmaxes
    assert _decodes(plain) - _decodes(fused) == decodes_removed
    assert _count(plain, stl.encode) - _count(fused, stl.encode) == encodes_removed
    # no decoded tensor at an algebraically fused boundary: its producer has no decode left
    algebraic = {row.producer for row in fused.stl_report.boundaries if row.kind == "algebraic"}
    assert len(algebraic) == reencodes
    decoded_sites = {module_path(n) for n in fused.graph.nodes
                     if n.target in (stl.decode.default, stl.decode_epilogue.default)}
    assert not algebraic & decoded_sites
    for size in (case.example, case.other, (3, 7)):
        args, kwargs = case.args(*size), case.kwargs(*size)
        with torch.no_grad():
            out = output_tensor(fused(*args, **kwargs))
            ref = output_tensor(plain(*args, **kwargs))
        assert rel_err(out, ref) < 1e-5, size


def test_gradients_through_fused_ops_match_unfused():
    model = MLP([32, 64, 48, 16], ["gelu", "relu"])
    x = torch.randn(2, 10, 32)
    plain, fused = _pair(model, (x,), basis="random", rank=24)
    assert_gradients_match(plain, fused, x)


def test_decode_feeding_several_encodes_is_decoded_once():
    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(32, 32), nn.Linear(32, 16), nn.Linear(32, 16)

        def forward(self, x):
            h = F.silu(self.a(x))
            return self.b(h) + self.c(h)

    model = Fork().eval()
    x = torch.randn(2, 8, 32)
    plain, fused = _pair(model, (x,), basis="random", rank=24)
    assert _count(fused, stl.decode_act_encode) == 1
    (row,) = fused.stl_report.boundaries[:1]
    assert row.consumers == ["b", "c"] and row.kind == "elementwise"
    with torch.no_grad():
        assert rel_err(fused(x), plain(x)) < 1e-5


def test_algebraic_boundary_has_no_decoded_tensor():
    model = nn.Sequential(nn.Linear(32, 64, bias=False), nn.Linear(64, 32)).eval()
    x = torch.randn(2, 8, 32)
    plain, fused = _pair(model, (x,), basis="random", rank=24)
    (row,) = fused.stl_report.boundaries
    assert row.kind == "algebraic"
    assert _decodes(fused) == 1 and _count(fused, stl.encode) == 1
    assert _count(fused, stl.reencode) == 1
    assert not any(n.target in (stl.decode.default, stl.decode_epilogue.default)
                   and module_path(n) == "0"
                   for n in fused.graph.nodes)
    for size in ((2, 8), (3, 7)):  # 7 rows: the padded row strip is re-encoded exactly
        x2 = torch.randn(*size, 32)
        with torch.no_grad():
            assert rel_err(fused(x2), plain(x2)) < 1e-5


def test_residual_use_blocks_fusion_and_is_reported():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 32)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return h + self.b(h)  # h is needed decoded: no fused op may hide it

    model = Residual().eval()
    x = torch.randn(2, 8, 32)
    plain, fused = _pair(model, (x,), basis="random", rank=24)
    assert _count(fused, stl.decode_act_encode) == 0
    (row,) = fused.stl_report.boundaries
    assert row.kind == "not fused"
    with torch.no_grad():
        assert rel_err(fused(x), plain(x)) < 1e-6
