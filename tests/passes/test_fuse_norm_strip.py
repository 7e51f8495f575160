"""fuse_norm_strip: decode → residual add → LayerNorm/RMSNorm (aten or spelled out) →
encode(s) becomes one ``stl::decode_norm_encode``; fused and unfused graphs agree, the right
tensor is kept, gradients match, and what cannot be fused is reported with its reason."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pass_helpers import captured, count, run
from stl_helpers import assert_gradients_match, rel_err, tiny_config
from torch import nn

from stl_compiler import stl_compile
from stl_compiler.passes import LOWERING, REWRITES
from stl_compiler.passes.fuse_norm_strip import fuse_norm_strip

stl = torch.ops.stl


def _count(gm, op):
    return sum(1 for n in gm.graph.nodes if n.target is op.default)


def _decodes(gm):
    return _count(gm, stl.decode) + _count(gm, stl.decode_epilogue)


def _pair(model, x, **config):
    return [stl_compile(model, (x,), tiny_config(fuse=fuse, **config), backend="eager")
            for fuse in (False, True)]


def _norm(kind, dim):
    return {"layer": nn.LayerNorm(dim), "rms": nn.RMSNorm(dim, eps=1e-6)}[kind]


class PreNorm(nn.Module):
    """x + fc2(gelu(fc1(norm(x)))), twice, then a final norm and a head (GPT/ViT layout)."""

    def __init__(self, norm="layer", dim=32):
        super().__init__()
        self.norms = nn.ModuleList([_norm(norm, dim) for _ in range(3)])
        self.fc1 = nn.ModuleList([nn.Linear(dim, 2 * dim) for _ in range(2)])
        self.fc2 = nn.ModuleList([nn.Linear(2 * dim, dim) for _ in range(2)])
        self.head = nn.Linear(dim, 16)

    def forward(self, x):
        for norm, fc1, fc2 in zip(self.norms, self.fc1, self.fc2):
            x = x + fc2(F.gelu(fc1(norm(x))))
        return self.head(self.norms[2](x))


class PostNorm(nn.Module):
    """h = norm(h + fc2(relu(fc1(h)))), twice (BERT layout): the normalized value is the
    residual stream."""

    def __init__(self, dim=32):
        super().__init__()
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(2)])
        self.fc1 = nn.ModuleList([nn.Linear(dim, 2 * dim) for _ in range(2)])
        self.fc2 = nn.ModuleList([nn.Linear(2 * dim, dim) for _ in range(2)])

    def forward(self, h):
        for norm, fc1, fc2 in zip(self.norms, self.fc1, self.fc2):
            h = norm(h + fc2(F.relu(fc1(h))))
        return h


BASES = [{"basis": "strassen"}, {"basis": "random", "rank": 24}]


def _agree(plain, fused, shapes, tol=1e-5):
    for shape in shapes:
        x = torch.randn(*shape)
        with torch.no_grad():
            assert rel_err(fused(x), plain(x)) < tol, shape


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("basis", BASES, ids=["exact", "rank24"])
def test_prenorm_stack_keeps_the_residual_sum(norm, basis):
    model = PreNorm(norm).eval()
    x = torch.randn(2, 8, 32)
    plain, fused = _pair(model, x, **basis)
    # Between block 1 and block 2 and before the head: two row strips (the first norm reads
    # the model input, not a decode).
    assert _count(fused, stl.decode_norm_encode) == 2
    assert _decodes(plain) - _decodes(fused) == 2 + 2  # + the two GELU boundaries
    rows = [(b.producer, b.kind, b.reason) for b in fused.stl_report.boundaries
            if b.kind == "row-strip"]
    assert rows == [("fc2.0", "row-strip", f"bias+residual+{norm}_norm+keeps sum"),
                    ("fc2.1", "row-strip", f"bias+residual+{norm}_norm+keeps none")]
    _agree(plain, fused, [(2, 8, 32), (3, 7, 32), (1, 13, 32)])  # 7, 13: padded strips
    if basis["basis"] == "strassen":
        with torch.no_grad():
            assert rel_err(fused(x), model(x)) < 1e-4


@pytest.mark.parametrize("basis", BASES, ids=["exact", "rank24"])
def test_postnorm_keeps_the_normalized_value(basis):
    model = PostNorm().eval()
    x = torch.randn(2, 8, 32)
    plain, fused = _pair(model, x, **basis)
    (row,) = [b for b in fused.stl_report.boundaries if b.kind == "row-strip"]
    assert (row.producer, row.consumers, row.reason) == (
        "fc2.0", ["fc1.1"], "bias+residual+layer_norm+keeps normed")
    assert _count(fused, stl.decode_norm_encode) == 1
    _agree(plain, fused, [(2, 8, 32), (3, 5, 32)])


def test_one_norm_feeding_several_sites_is_encoded_once():
    class QKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.norm = nn.Linear(32, 32), nn.LayerNorm(32)
            self.q, self.k, self.v = nn.Linear(32, 16), nn.Linear(32, 16), nn.Linear(32, 32)

        def forward(self, x):
            h = x + self.a(x)
            n = self.norm(h)
            return h + self.v(n) + torch.cat([self.q(n), self.k(n)], -1)

    model = QKV().eval()
    x = torch.randn(2, 8, 32)
    plain, fused = _pair(model, x, basis="random", rank=24)
    (row,) = [b for b in fused.stl_report.boundaries if b.kind == "row-strip"]
    assert sorted(row.consumers) == ["k", "q", "v"]
    assert _count(fused, stl.decode_norm_encode) == 1
    assert _count(plain, stl.encode) - _count(fused, stl.encode) == 3
    # unfused: decoded + sum + normed written and read (x3 encodes); fused: only the sum written
    assert row.bytes_saved == 2 * 8 * 32 * 4 * (5 + 3) - 2 * 8 * 32 * 4

    _agree(plain, fused, [(2, 8, 32), (3, 6, 32)])


def test_broadcast_residual_positional_embedding():
    class Embed(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.pos = nn.Linear(48, 32), nn.Parameter(torch.randn(1, 8, 32))
            self.norm, self.fc = nn.LayerNorm(32), nn.Linear(32, 32)

        def forward(self, x):
            return self.fc(self.norm(self.proj(x) + self.pos))

    model = Embed().eval()
    x = torch.randn(3, 8, 48)
    plain, fused = stl_compile(model, (x,), tiny_config(fuse=False), backend="eager",
                               dynamic_shapes=None), stl_compile(
        model, (x,), tiny_config(), backend="eager", dynamic_shapes=None)
    assert _count(fused, stl.decode_norm_encode) == 1
    _agree(plain, fused, [(3, 8, 48)])


def test_gradients_match_unfused():
    model = PreNorm("rms")
    x = torch.randn(2, 10, 32)
    plain, fused = _pair(model, x, basis="random", rank=24)
    assert _count(fused, stl.decode_norm_encode) == 2
    assert_gradients_match(plain, fused, x)


def test_sum_and_normed_both_read_elsewhere_is_reported():
    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.norm = nn.Linear(32, 32), nn.Linear(32, 32), nn.LayerNorm(32)

        def forward(self, x):
            h = x + self.a(x)
            n = self.norm(h)
            return self.b(n) + h * n

    plain, fused = _pair(Both().eval(), torch.randn(2, 8, 32), basis="random", rank=24)
    assert _count(fused, stl.decode_norm_encode) == 0
    (row,) = fused.stl_report.boundaries
    assert (row.producer, row.consumers, row.kind) == ("a", ["b"], "not fused")
    assert row.reason == ("row-strip: both the residual sum and the normalized value are read "
                          "elsewhere")
    _agree(plain, fused, [(2, 8, 32)])


def test_switch_off_leaves_the_boundary_unfused_and_says_so():
    model = PreNorm().eval()
    x = torch.randn(2, 8, 32)
    gm = stl_compile(model, (x,), tiny_config(fuse_row_strip=False), backend="eager")
    assert _count(gm, stl.decode_norm_encode) == 0
    assert _count(gm, stl.decode_act_encode) == 2  # element-wise fusion still on
    off = [b for b in gm.stl_report.boundaries if b.kind == "not fused"]
    assert len(off) == 2 and all("row-strip fusion is off" in b.reason for b in off)


def test_token_mixing_between_norm_and_encode_is_not_fused():
    """A mean over tokens after the norm crosses strips: the chain stays unfused."""

    class Pool(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.norm, self.head = nn.Linear(32, 32), nn.LayerNorm(32), nn.Linear(32, 8)

        def forward(self, x):
            return self.head(self.norm(x + self.a(x)).mean(1))

    plain, fused = _pair(Pool().eval(), torch.randn(8, 8, 32), basis="random", rank=24)
    assert _count(fused, stl.decode_norm_encode) == 0
    (row,) = fused.stl_report.boundaries
    assert row.kind == "not fused" and "row-wise" in row.reason
    _agree(plain, fused, [(8, 8, 32)])


def test_the_pass_alone_fuses_the_norms_of_a_lowered_graph():
    model, x = PreNorm("rms").eval(), torch.randn(2, 8, 32)
    gm, ctx = captured(model, x, config=tiny_config(basis="strassen"))
    gm = run(gm, ctx, *REWRITES, *LOWERING, fuse_norm_strip)
    assert count(gm, stl.decode_norm_encode.default) == 2
    assert [b.reason for b in ctx.report.boundaries] == [
        "bias+residual+rms_norm+keeps sum", "bias+residual+rms_norm+keeps none"]
    with torch.no_grad():  # the exact basis: the model's own output
        assert rel_err(gm(x), model(x)) < 1e-4


EPS = 1e-6


def _llama_rms(h, w):
    """transformers' LlamaRMSNorm: statistics in a wider dtype, cast back, weight on the left
    (float64 here, so the casts exist in a float32 model)."""
    wide = h.double()
    return w * (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + EPS)).to(h.dtype)


#: RMSNorms written out as models write them: name -> (norm(h, weight), fused?)
SPELLINGS = {
    "llama_casts": (_llama_rms, True),
    "rsqrt_first_weight_right": (
        lambda h, w: (torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * h) * w, True),
    "positive_last_dim": (
        lambda h, w: h * torch.rsqrt(h.pow(2).mean(2, keepdim=True) + EPS) * w, True),
    "no_weight": (lambda h, w: h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS), True),
    # not recognized (reported unfused): the square as a product, the mean without keepdim
    "square_as_product": (
        lambda h, w: h * torch.rsqrt((h * h).mean(-1, keepdim=True) + EPS) * w, False),
    "no_keepdim": (
        lambda h, w: h * torch.rsqrt(h.pow(2).mean(-1) + EPS)[..., None] * w, False),
}


class SpelledRMS(nn.Module):
    """x + a(x) → an RMSNorm written out → b."""

    def __init__(self, spelling):
        super().__init__()
        self.norm = SPELLINGS[spelling][0]
        self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 16)
        self.weight = nn.Parameter(torch.rand(32) + 0.5)

    def forward(self, x):
        return self.b(self.norm(x + self.a(x), self.weight))


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_spelled_out_rms_norms(spelling):
    x = torch.randn(2, 8, 32)
    plain, fused = _pair(SpelledRMS(spelling).eval(), x, basis="random", rank=24)
    (row,) = fused.stl_report.boundaries
    if SPELLINGS[spelling][1]:
        assert _count(fused, stl.decode_norm_encode) == 1
        assert (row.producer, row.kind, row.reason) == (
            "a", "row-strip", "bias+residual+rms_norm+keeps none")
    else:
        assert _count(fused, stl.decode_norm_encode) == 0
        assert row.kind == "not fused" and "row-wise" in row.reason
    _agree(plain, fused, [(2, 8, 32), (3, 5, 32)])


def test_bf16_llama_rmsnorm_with_float32_casts_fuses_exactly():
    """transformers' LlamaRMSNorm in bf16 casts to float32 and back around the statistics;
    the row strip must see through the casts and round as the unfused graph does."""
    pytest.importorskip("transformers")
    from model_zoo import CASES

    model = CASES["llama"].build().eval().to(torch.bfloat16)
    ids = torch.randint(0, 96, (2, 8))
    plain, fused = [stl_compile(model, (), tiny_config(basis="strassen", fuse=fuse),
                                example_kwargs={"input_ids": ids}, backend="eager")
                    for fuse in (False, True)]
    assert _count(fused, stl.decode_norm_encode) == 4
    with torch.no_grad():
        assert torch.equal(fused(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_printed_boundary_table_stays_aligned_with_long_names():
    from stl_compiler.report import BoundaryRow, STLReport

    long = "model.layers.11.self_attn.o_proj"
    report = STLReport(boundaries=[
        BoundaryRow(long, [f"{long[:-6]}{p}_proj" for p in "qkv"], "row-strip", "x", 1),
        BoundaryRow("a", ["b"], "elementwise", "y", 2)])
    lines = str(report).splitlines()[-3:]
    assert len({line.index(" row-strip ") if "row-strip" in line else
                line.index(" elementwise ") if "elementwise" in line else line.index(" fusion ")
                for line in lines}) == 1
