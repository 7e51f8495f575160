"""detect_causal / check_causal on tiny graphs: the causal mask matcher against the one
definition of the mask, graph and module-tree evidence, the row grouping it resolves, and
the refusal of sites that break causality."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pass_helpers import CONVERT_ALL, captured, run, targets
from torch import nn

from stl_compiler import STLConfig
from stl_compiler.passes import REWRITES
from stl_compiler.passes.detect_causal import (
    check_causal,
    detect_causal,
    is_causal_mask,
)
from stl_compiler.runtime.ops import causal_mask, causal_mask_ops

aten = torch.ops.aten


class Masked(nn.Module):
    """Attention scores masked with ``mask_fn(rows, cols)`` (True = hidden)."""

    def __init__(self, mask_fn):
        super().__init__()
        self.mask_fn = mask_fn

    def forward(self, q, k):
        scores = q @ k.transpose(-2, -1)
        mask = self.mask_fn(scores.shape[-2], scores.shape[-1])
        return scores.masked_fill(mask, float("-inf")).softmax(-1)


def _masked_fill(mask_fn, queries=6, keys=6):
    q, k = torch.randn(2, queries, 8), torch.randn(2, keys, 8)
    gm, _ = captured(Masked(mask_fn), q, k)
    (node,) = [n for n in gm.graph.nodes if n.target in (aten.masked_fill.Scalar,
                                                           aten.masked_fill.Tensor)]
    return node


def test_causal_mask_definition():
    assert torch.equal(causal_mask(3, 4), torch.tensor([[False, True, True, True],
                                                        [False, False, True, True],
                                                        [False, False, False, True]]))
    assert causal_mask_ops() == (aten.ones.default, aten.tril.default, aten.bitwise_not.default)


@pytest.mark.parametrize("mask_fn, causal", [
    (causal_mask, True),
    (lambda r, c: ~torch.ones(r, c, dtype=torch.bool).tril(), True),
    (lambda r, c: torch.ones(r, c, dtype=torch.bool).triu(1), False),  # same values, other ops
    (lambda r, c: ~torch.ones(r, c, dtype=torch.bool).tril(-1), False),  # hides the diagonal
    (lambda r, c: torch.zeros(r, c, dtype=torch.bool), False),
])
def test_is_causal_mask(mask_fn, causal):
    node = _masked_fill(mask_fn)
    assert is_causal_mask(node.args[1], node) is causal


def test_is_causal_mask_checks_the_sizes():
    node = _masked_fill(lambda r, c: ~torch.ones(r, r, dtype=torch.bool).tril()[:, :c],
                        queries=6, keys=6)
    assert not is_causal_mask(node.args[1], node)  # a slice between: not the pattern
    assert not is_causal_mask(None, node)


class Attention(nn.Module):
    def __init__(self, is_causal):
        super().__init__()
        self.is_causal = is_causal
        self.qkv, self.out = nn.Linear(32, 96), nn.Linear(32, 32)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return self.out(F.scaled_dot_product_attention(q, k, v, is_causal=self.is_causal))


@pytest.mark.parametrize("is_causal", [True, False])
def test_detect_causal_resolves_row_grouping(is_causal):
    model, x = Attention(is_causal), torch.randn(2, 8, 32)
    gm, ctx = captured(model, x)
    assert ctx.config.row_grouping is None
    before = targets(gm)

    gm = run(gm, ctx, detect_causal)

    assert targets(gm) == before  # analysis only
    assert ctx.report.row_grouping == ctx.config.row_grouping
    assert ctx.report.row_grouping_auto
    if is_causal:
        assert "is_causal" in ctx.report.causal_model or "causal" in ctx.report.causal_model
        assert ctx.config.row_grouping == "causal"
    else:
        assert ctx.report.causal_model is None
        assert ctx.config.row_grouping == "tokens"


def test_detect_causal_from_the_module_tree():
    """No causal op in the graph: an attention module's ``is_causal=True`` flag decides."""

    class Flagged(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.Linear(32, 32)
            self.attn.is_causal = True

        def forward(self, x):
            return self.attn(x)

    gm, ctx = captured(Flagged(), torch.randn(2, 8, 32))
    run(gm, ctx, detect_causal)
    assert ctx.report.causal_model is not None and "attn" in ctx.report.causal_model
    assert ctx.config.row_grouping == "causal"


def test_detect_causal_is_idempotent():
    gm, ctx = captured(Attention(True), torch.randn(2, 8, 32))
    run(gm, ctx, detect_causal)
    config, report = ctx.config, ctx.report.causal_model
    run(gm, ctx, detect_causal)
    assert ctx.config is config and ctx.report.causal_model == report


def test_check_causal_refuses_sites_that_break_causality():
    """An explicit "tokens" grouping with an inexact basis on a causal model: the rewrite
    passes convert the sites, check_causal refuses them (before lowering)."""
    model, x = Attention(True), torch.randn(2, 8, 32)
    config = STLConfig(row_grouping="tokens", basis="random", targets=("linear",),
                       **CONVERT_ALL)
    gm, ctx = captured(model, x, config=config)
    assert REWRITES[-1] is check_causal
    gm = run(gm, ctx, *REWRITES[:-1])
    assert [s.causal for s in ctx.report.sites if s.converted] == ["not kept"] * 2
    with pytest.raises(ValueError, match="causal"):
        run(gm, ctx, check_causal)
    allowed = STLConfig(row_grouping="tokens", basis="random", targets=("linear",),
                        allow_non_causal=True, **CONVERT_ALL)
    gm, ctx = captured(model, x, config=allowed)
    run(gm, ctx, *REWRITES)
    assert all(s.causal == "not kept" for s in ctx.report.sites if s.converted)
