"""Row-strip fusion: decode → residual add → LayerNorm/RMSNorm → encode(s) becomes one
``stl::decode_norm_encode``; fused and unfused graphs agree, the right tensor is kept, gradients
match, and what cannot be fused is reported with its reason."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from stl_helpers import assert_gradients_match, rel_err, tiny_config
from torch import nn

from stl_compiler import stl_compile

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
