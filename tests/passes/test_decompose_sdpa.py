"""decompose_sdpa: ``scaled_dot_product_attention`` becomes QKᵀ → :func:`attention_probs` → AV,
with SDPA's semantics, fully masked query rows (left padding) included: SDPA gives 0 there,
a plain softmax NaN."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stl_compiler import STLConfig, stl_compile
from stl_compiler.passes.decompose_sdpa import attention_probs

stl = torch.ops.stl
# The cost guard keeps sites of models this small dense; these tests need them STL.
CONVERT_ALL = {"max_cost_ratio": None}


def _qkv(gen: torch.Generator, batch=2, heads=3, queries=5, keys=7, dim=8):
    return [torch.randn(batch, heads, n, dim, generator=gen, dtype=torch.float64)
            for n in (queries, keys, keys)]


def _decomposed(q, k, v, **sdpa):
    scores = q @ k.transpose(-2, -1)
    return attention_probs(scores, q.shape[-1], sdpa.get("attn_mask"), 0.0,
                           sdpa.get("is_causal", False), sdpa.get("scale")) @ v


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_fully_masked_rows_match_sdpa(kind):
    """Query rows whose keys are all masked (a boolean row of False, an additive row of -inf)
    give 0, as torch's SDPA does; the other rows its values."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = _qkv(gen)
    keep = torch.rand(2, 1, 5, 7, generator=gen) < 0.6
    keep[..., 0] = True
    keep[0, :, 1] = False  # query 1 of sequence 0 sees no key
    keep[1, :, 3:] = False  # queries 3, 4 of sequence 1
    mask = keep if kind == "bool" else torch.zeros(keep.shape, dtype=torch.float64).masked_fill(
        ~keep, float("-inf"))
    ours = _decomposed(q, k, v, attn_mask=mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.isfinite(ours).all()
    assert torch.equal(ours[0, :, 1], torch.zeros_like(ours[0, :, 1]))
    assert torch.equal(ours[1, :, 3:], torch.zeros_like(ours[1, :, 3:]))
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_causal_scale_and_mask_match_sdpa():
    gen = torch.Generator().manual_seed(1)
    q, k, v = _qkv(gen, queries=7)
    mask = torch.randn(7, 7, generator=gen, dtype=torch.float64)
    for sdpa in ({"is_causal": True}, {"attn_mask": mask, "scale": 0.3}):
        torch.testing.assert_close(_decomposed(q, k, v, **sdpa),
                                   F.scaled_dot_product_attention(q, k, v, **sdpa),
                                   rtol=1e-12, atol=1e-12)


def _mistral():
    transformers = pytest.importorskip("transformers")
    config = transformers.MistralConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        sliding_window=None, use_cache=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.MistralForCausalLM(config).eval()


@pytest.mark.parametrize("fuse", [False, True], ids=["unfused", "fused"])
def test_left_padded_mistral_matches_dense(fuse):
    """A Mistral-style model, left-padded batch, every matmul on the exact (Strassen) basis:
    the padded sequence's logits stay finite and equal dense's, real tokens and padding rows
    alike (a fully masked query row used to give NaN, which the tiles spread everywhere)."""
    model = _mistral()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0  # sequence 1: three pad tokens on the left
    compiled = stl_compile(
        model, (ids,), STLConfig(basis="strassen", decompose_sdpa=True, min_dim=1, fuse=fuse,
                                 targets=("linear", "matmul"), **CONVERT_ALL),
        example_kwargs={"attention_mask": mask}, backend="eager", dynamic_shapes=None)
    converted = [s for s in compiled.stl_report.sites if s.converted and s.kind == "matmul"]
    assert len(converted) == 4, "both layers' QKᵀ and AV must be STL sites"
    if fuse:
        assert sum(n.target is stl.decode_softmax_encode.default
                   for n in compiled.graph.nodes) == 2
    with torch.no_grad():
        dense = model(ids, attention_mask=mask).logits
        ours = compiled(ids, attention_mask=mask).logits
    assert torch.isfinite(dense).all()
    assert torch.isfinite(ours).all()
    err = ((ours - dense).norm() / dense.norm()).item()
    assert err < 1e-5, err
    real = mask.bool()
    assert ((ours[real] - dense[real]).norm() / dense[real].norm()).item() < 1e-5


class _PaddedAttention(torch.nn.Module):
    """Two-head self-attention through SDPA with a boolean keep-mask (True: attend)."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = torch.nn.Linear(32, 96), torch.nn.Linear(32, 32)

    def forward(self, x, keep):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 2, c // 2).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return self.out(o.transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize("fuse", [False, True], ids=["unfused", "fused"])
def test_fully_masked_rows_survive_onnx_export(tmp_path, fuse):
    """The exported graph (``_safe_softmax``, or the fused op's decomposition) gives the
    zero rows too, in ONNX Runtime."""
    pytest.importorskip("onnxruntime")
    from stl_compiler.exporters import export_onnx
    from stl_compiler.runtime import ort_session

    torch.manual_seed(3)
    model = _PaddedAttention().eval()
    x = torch.randn(2, 8, 32)
    keep = torch.ones(2, 1, 8, 8, dtype=torch.bool)
    keep[1, :, :3] = False  # queries 0-2 of sequence 1 see nothing
    keep[1, :, 3:, :3] = False
    compiled = stl_compile(model, (x, keep), STLConfig(
        basis="strassen", decompose_sdpa=True, min_dim=1, fuse=fuse,
        targets=("linear", "matmul"), **CONVERT_ALL), backend="eager", dynamic_shapes=None)
    assert sum(s.converted for s in compiled.stl_report.sites if s.kind == "matmul") == 2
    path = export_onnx(compiled, (x, keep), tmp_path / "attention.onnx", dynamic_shapes=None)
    (ours,) = ort_session(path).run(x, keep)
    with torch.no_grad():
        dense = model(x, keep)
    assert torch.isfinite(ours).all()
    assert ((ours - dense).norm() / dense.norm()).item() < 1e-5
