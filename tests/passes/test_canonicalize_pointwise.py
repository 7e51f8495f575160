"""canonicalize_pointwise: chains after a flattened decode are computed in the decode's shape,
and spelled-out tanh GELUs are named, so that GPT-2-style models (transformers' Conv1D) fuse."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from stl_helpers import rel_err, tiny_config
from torch import nn

from stl_compiler import stl_compile

stl = torch.ops.stl
aten = torch.ops.aten


def _count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.target is target)


def _pair(model, x, **config):
    return [stl_compile(model, (x,), tiny_config(fuse=fuse, **config), backend="eager")
            for fuse in (False, True)]


def new_gelu(x):
    """transformers' NewGELUActivation, spelled out."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3.0))))


class FlatBlock(nn.Module):
    """GPT-2's layout: every matmul on flattened tokens (addmm), everything else on
    (batch, seq, dim); ``pos`` broadcasts over the batch (must not be reshaped)."""

    def __init__(self, dim=32, with_pos=False):
        super().__init__()
        self.w1, self.w2 = nn.Parameter(torch.randn(dim, 4 * dim) / dim**0.5), nn.Parameter(
            torch.randn(4 * dim, dim) / (4 * dim) ** 0.5)
        self.b1, self.b2 = nn.Parameter(torch.randn(4 * dim)), nn.Parameter(torch.randn(dim))
        self.norm, self.head = nn.LayerNorm(dim), nn.Parameter(torch.randn(dim, dim) / dim**0.5)
        self.pos = nn.Parameter(torch.randn(1, 8, dim)) if with_pos else None

    def forward(self, x):
        b, s, c = x.shape
        h = torch.addmm(self.b1, x.reshape(-1, c), self.w1).reshape(b, s, -1)
        h = torch.addmm(self.b2, new_gelu(h).reshape(-1, 4 * c), self.w2).reshape(b, s, c)
        h = x + h if self.pos is None else x + h + self.pos
        return (self.norm(h).reshape(-1, c) @ self.head).reshape(b, s, c)


@pytest.mark.parametrize("basis", [{"basis": "strassen"}, {"basis": "random", "rank": 24}],
                         ids=["exact", "rank24"])
def test_flattened_chains_fuse(basis):
    model = FlatBlock().eval()
    x = torch.randn(2, 8, 32)
    plain, fused = _pair(model, x, **basis)
    kinds = sorted((b.kind, b.reason) for b in fused.stl_report.boundaries)
    assert kinds == [("elementwise", "bias+gelu_tanh"),
                     ("row-strip", "bias+residual+layer_norm+keeps none")]
    assert _count(fused, stl.decode_act_encode.default) == 1
    for shape in ((2, 8, 32), (3, 5, 32)):
        x2 = torch.randn(*shape)
        with torch.no_grad():
            assert rel_err(fused(x2), plain(x2)) < 1e-5, shape
            if basis["basis"] == "strassen":
                assert rel_err(fused(x2), model(x2)) < 1e-4, shape


def test_operand_broadcasting_over_leading_dims_is_left_alone():
    """``+ pos`` of shape (1, 8, C) cannot move to the flattened shape: the chain stays as it
    is (no row strip), and the result is unchanged."""
    model = FlatBlock(with_pos=True).eval()
    x = torch.randn(2, 8, 32)
    plain, fused = stl_compile(model, (x,), tiny_config(fuse=False), backend="eager",
                               dynamic_shapes=None), stl_compile(
        model, (x,), tiny_config(), backend="eager", dynamic_shapes=None)
    assert _count(fused, stl.decode_norm_encode.default) == 0
    assert _count(fused, stl.decode_act_encode.default) == 1  # the GELU still fuses
    with torch.no_grad():
        assert rel_err(fused(x), plain(x)) < 1e-5


def test_spelled_tanh_gelu_is_named():
    x = torch.randn(2, 8, 32)

    class Spelled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(32, 64), nn.Linear(64, 32)

        def forward(self, x):
            return self.b(new_gelu(self.a(x)))

    model = Spelled().eval()
    plain, fused = _pair(model, x, basis="random", rank=24)
    (row,) = fused.stl_report.boundaries
    assert (row.kind, row.reason) == ("elementwise", "bias+gelu_tanh")
    assert _count(plain, aten.tanh.default) == 1  # not rewritten without fusion
    with torch.no_grad():
        assert rel_err(fused(x), plain(x)) < 1e-5
        assert rel_err(new_gelu(x), F.gelu(x, approximate="tanh")) < 1e-6


def test_gpt2_fuses_every_boundary_but_attention():
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64, use_cache=False,
        bos_token_id=0, eos_token_id=0)).eval()
    ids = torch.randint(0, 96, (2, 8))
    plain, fused = [stl_compile(model, (), tiny_config(basis="strassen", fuse=fuse),
                                example_kwargs={"input_ids": ids}, backend="eager")
                    for fuse in (False, True)]
    kinds = [b.kind for b in fused.stl_report.boundaries]
    assert kinds.count("row-strip") == 3 and kinds.count("elementwise") == 2
    assert all(b.kind != "not fused" or "scaled_dot_product_attention" in b.reason
               for b in fused.stl_report.boundaries)
    for batch, seq in ((2, 8), (3, 11)):
        ids = torch.randint(0, 96, (batch, seq))
        with torch.no_grad():
            out, ref = fused(input_ids=ids).logits, plain(input_ids=ids).logits
            assert rel_err(out, ref) < 1e-5
            assert rel_err(out, model(input_ids=ids).logits) < 1e-4
