"""fuse_softmax_strip: decode(QKᵀ) → scale → causal / explicit mask → softmax → encode (AV)
becomes one ``stl::decode_softmax_encode``; fused and unfused graphs agree (dynamic lengths and
gradients included), and probabilities read elsewhere are reported, not fused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pass_helpers import captured, count, run
from stl_helpers import assert_gradients_match, rel_err, tiny_config
from torch import nn

from stl_compiler import stl_compile
from stl_compiler.passes import FUSIONS, LOWERING, REWRITES
from stl_compiler.passes.fuse_decode_encode import fuse_decode_encode
from stl_compiler.passes.fuse_norm_strip import fuse_norm_strip
from stl_compiler.passes.fuse_softmax_strip import fuse_softmax_strip

stl = torch.ops.stl


def _count(gm, op):
    return sum(1 for n in gm.graph.nodes if n.target is op.default)


def _pair(model, x, **config):
    return [stl_compile(model, (x,), tiny_config(fuse=fuse, **config), backend="eager")
            for fuse in (False, True)]


def _agree(plain, fused, shapes, tol=1e-5):
    for shape in shapes:
        x = torch.randn(*shape)
        with torch.no_grad():
            assert rel_err(fused(x), plain(x)) < tol, shape


BASES = [{"basis": "strassen"}, {"basis": "random", "rank": 24}]


class Attention(nn.Module):
    """Multi-head self-attention written out (QKᵀ, softmax, AV as explicit matmuls) or through
    scaled_dot_product_attention (decomposed by the compiler)."""

    def __init__(self, dim=32, heads=2, sdpa=False, causal=False):
        super().__init__()
        self.heads, self.sdpa, self.causal = heads, sdpa, causal
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if self.sdpa:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal)
        else:
            scores = q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5
            if mask is not None:
                scores = scores + mask
            o = scores.softmax(-1) @ v
        return self.out(o.transpose(1, 2).reshape(b, n, c))


def _softmax_rows(gm):
    return [(b.producer, b.reason) for b in gm.stl_report.boundaries
            if "softmax" in b.reason]


@pytest.mark.parametrize("basis", BASES, ids=["exact", "rank24"])
@pytest.mark.parametrize("variant", ["explicit", "sdpa", "sdpa-causal", "explicit-mask"])
def test_attention_softmax_is_fused(basis, variant):
    model = Attention(sdpa=variant.startswith("sdpa"), causal=variant.endswith("causal")).eval()
    x = torch.randn(2, 8, 32)
    kwargs = {"mask": torch.randn(8, 8)} if variant == "explicit-mask" else {}
    plain, fused = [stl_compile(model, (x,), tiny_config(fuse=fuse,
                                                       decompose_sdpa=True, **basis),
                                example_kwargs=kwargs, backend="eager", dynamic_shapes=None)
                    for fuse in (False, True)]
    assert _count(fused, stl.decode_softmax_encode) == 1
    (row,) = _softmax_rows(fused)
    expected = {"explicit": "scale 0.25+softmax", "sdpa": "scale 0.25+softmax",
                "sdpa-causal": "scale 0.25+causal+softmax",
                "explicit-mask": "scale 0.25+mask+softmax"}[variant]
    assert row[1] == expected
    with torch.no_grad():
        assert rel_err(fused(x, **kwargs), plain(x, **kwargs)) < 1e-5
        if basis["basis"] == "strassen":
            assert rel_err(fused(x, **kwargs), model(x, **kwargs)) < 1e-4


@pytest.mark.parametrize("seq", [8, 11])  # 11: padded query rows and key columns
def test_causal_attention_dynamic_lengths_and_gradients(seq):
    model = Attention(sdpa=True, causal=True)
    x = torch.randn(2, seq, 32)
    plain, fused = [stl_compile(model, (x,), tiny_config(fuse=fuse, decompose_sdpa=True,
                                                       basis="random", rank=24),
                                backend="eager") for fuse in (False, True)]
    assert _count(fused, stl.decode_softmax_encode) == 1
    fused.load_state_dict(plain.state_dict())
    _agree(plain, fused, [(2, seq, 32), (3, 5, 32), (1, 13, 32)])
    assert_gradients_match(plain, fused, x)


def test_probabilities_read_elsewhere_are_not_fused():
    class Returns(Attention):
        def forward(self, x):
            b, n, c = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, c).unbind(2)
            probs = (q @ k.transpose(-2, -1)).softmax(-1)
            return self.out(probs @ v), probs  # attention weights returned to the user

    plain, fused = _pair(Returns().eval(), torch.randn(2, 8, 32), basis="random", rank=24)
    assert _count(fused, stl.decode_softmax_encode) == 0
    (row,) = [b for b in fused.stl_report.boundaries if "softmax" in b.reason
              or "read elsewhere" in b.reason]
    assert row.kind == "not fused"
    assert row.reason == "row-strip: the scores or the probabilities are read elsewhere"


def test_switch_off_leaves_the_scores_unfused_and_says_so():
    model, x = Attention().eval(), torch.randn(2, 8, 32)
    gm = stl_compile(model, (x,), tiny_config(fuse_row_strip=False, basis="random", rank=24),
                     backend="eager")
    assert _count(gm, stl.decode_softmax_encode) == 0
    (row,) = [b for b in gm.stl_report.boundaries if "softmax" in b.reason]
    assert row.kind == "not fused" and "row-strip fusion is off" in row.reason


class Block(nn.Module):
    """x + attention(x) → LayerNorm → head: one softmax strip (QKᵀ → AV) and one norm strip
    (out → head)."""

    def __init__(self):
        super().__init__()
        self.attn, self.norm, self.head = Attention(), nn.LayerNorm(32), nn.Linear(32, 16)

    def forward(self, x):
        return self.head(self.norm(x + self.attn(x)))


def test_runs_after_the_norm_strips_and_before_the_element_wise_fusion():
    assert (FUSIONS.index(fuse_norm_strip) + 1 == FUSIONS.index(fuse_softmax_strip)
            < FUSIONS.index(fuse_decode_encode))


def test_the_pass_alone_fuses_the_softmax_and_leaves_the_norm():
    model, x = Block().eval(), torch.randn(2, 8, 32)
    gm, ctx = captured(model, x, config=tiny_config(basis="random", rank=24))
    gm = run(gm, ctx, *REWRITES, *LOWERING)
    with torch.no_grad():
        before = gm(x)
    gm = run(gm, ctx, fuse_softmax_strip)
    assert count(gm, stl.decode_softmax_encode.default) == 1
    assert count(gm, stl.decode_norm_encode.default) == 0
    assert count(gm, torch.ops.aten.layer_norm.default) == 1
    assert [(b.producer, b.reason) for b in ctx.report.boundaries] == [
        ("attn.matmul", "scale 0.25+softmax")]
    gm = run(gm, ctx, fuse_norm_strip)
    assert count(gm, stl.decode_norm_encode.default) == 1
    with torch.no_grad():
        assert rel_err(gm(x), before) < 1e-5
