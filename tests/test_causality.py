"""Causal models are recognized: detection, the automatic row grouping, the refusal of a
non-causal grouping, the report, and swap_linears_ (issue 14, item 6)."""

from __future__ import annotations

import warnings

import pytest
import torch
from model_zoo import CASES, SERVING_CASES, output_tensor
from torch import nn

from stl_compiler import STLConfig, STLLinear, bases, stl_compile, swap_linears_
from stl_compiler.capture import capture
from stl_compiler.models import Attention, DecoderLM, EncoderBlock
from stl_compiler.passes.detect_causal import (
    CAUSAL_KEPT,
    CAUSAL_NOT_KEPT,
    CAUSAL_ROUND_OFF,
    MATMUL_DENSE_REASON,
    causal_in_graph,
    causal_in_modules,
    find_causality,
    layer_causality,
    resolve_config,
    site_causality,
)
from stl_compiler.tiling import is_causal, is_row_separable, row_separable

pytest.importorskip("transformers")

#: small enough that every linear of the tiny models converts
CONVERT_ALL = {"min_dim": 8, "max_cost_ratio": None}


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    return SERVING_CASES["gpt2"].build().eval().double()


def _llama() -> nn.Module:
    """Every matmul an nn.Linear (GPT-2's are transformers Conv1D, which swap_linears_ skips)."""
    torch.manual_seed(0)
    return CASES["llama"].build().eval().double()


def _linears(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Linear) for m in model.modules())


def _ids(batch: int = 2, seq: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens, and the same tokens with the last position changed."""
    ids = torch.randint(0, 96, (batch, seq))
    later = ids.clone()
    later[:, -1] = (later[:, -1] + 1) % 96
    return ids, later


def _earlier_logits_change(model: nn.Module) -> bool:
    ids, later = _ids()
    with torch.no_grad():
        a, b = output_tensor(model(ids)), output_tensor(model(later))
    assert not torch.equal(a[:, -1], b[:, -1])  # the changed position itself does change
    return not torch.equal(a[:, :-1], b[:, :-1])


# --- detection --------------------------------------------------------------------------------

@pytest.mark.parametrize("name, causal", [("gpt2", True), ("llama", True), ("bert", False),
                                          ("hf_vit", False), ("hf_swin", False)])
def test_module_tree_detects_hf_decoders(name, causal):
    model = {**CASES, **SERVING_CASES}[name].build()
    found = causal_in_modules(model)
    assert (found is not None) == causal, found
    if causal:
        assert "causal language model" in found


def test_module_tree_detects_is_decoder_and_causal_attention_flags():
    from transformers import BertConfig, BertModel

    decoder = BertModel(BertConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2, is_decoder=True))
    assert "is_decoder=True" in causal_in_modules(decoder)
    # a generation model whose class name says nothing
    chat = CASES["llama"].build()
    chat.__class__ = type("Chat", (type(chat),), {})
    assert "GenerationMixin" in causal_in_modules(chat)
    # the repo's decoder: its attention modules say causal=True
    assert "causal=True" in causal_in_modules(DecoderLM(vocab=96, dim=32, depth=1, heads=2,
                                                        kv_heads=1, mlp_dim=64))
    assert causal_in_modules(EncoderBlock(32, 2, 64)) is None
    assert causal_in_modules(nn.TransformerEncoderLayer(32, 2, 64, batch_first=True)) is None
    # a flag named "causal" counts on attention modules only
    holder = nn.Module()
    holder.mixer = nn.Linear(4, 4)
    holder.mixer.causal = True
    assert causal_in_modules(holder) is None


@pytest.mark.parametrize("model, causal", [
    (lambda: DecoderLM(vocab=96, dim=32, depth=1, heads=2, kv_heads=1, mlp_dim=64), "is_causal"),
    (lambda: Attention(32, 2, causal=True), "tril"),  # explicit ~ones(n, n).tril() mask
    (lambda: Attention(32, 2, causal=False), None),
    (lambda: EncoderBlock(32, 2, 64), None),
    (lambda: CASES["vit"].build(), None),
])
def test_graph_detects_causal_sdpa_and_tril_masks(model, causal):
    model = model().eval()
    x = (torch.randint(0, 96, (2, 8)) if isinstance(model, DecoderLM)
         else torch.randn(2, 3, 16, 16) if not isinstance(model, (Attention, EncoderBlock))
         else torch.randn(2, 8, 32))
    gm = capture(model, (x,), {}, "auto")
    found = causal_in_graph(gm)
    assert (found is None) == (causal is None), found
    if causal:
        assert causal in found
        assert find_causality(None, gm) == found  # graph evidence needs no module tree


# --- policy -----------------------------------------------------------------------------------

def test_resolve_config_picks_the_grouping():
    auto = STLConfig()
    assert auto.row_grouping is None and not auto.allow_non_causal
    assert resolve_config(auto, None).row_grouping == "tokens"
    assert resolve_config(auto, "a decoder").row_grouping == "causal"
    # exact bases keep causality up to round-off with token tiles: "tokens" stays
    assert resolve_config(STLConfig(basis="strassen"), "a decoder").row_grouping == "tokens"
    assert resolve_config(STLConfig(basis="strassen", overrides={"x": {"basis": "naive"}}),
                          "a decoder").row_grouping == "tokens"
    # an explicit grouping is kept
    assert resolve_config(STLConfig(row_grouping="batch"), "a decoder").row_grouping == "batch"
    # a basis that cannot be causal, chosen automatically: the error says why and what to do
    with pytest.raises(ValueError, match=r"causal \(a decoder\).*automatic.*allow_non_causal"):
        resolve_config(STLConfig(basis="random"), "a decoder")
    with pytest.raises(TypeError, match="allow_non_causal"):
        STLConfig(allow_non_causal="yes")
    data = STLConfig(allow_non_causal=True).to_dict()
    assert data["row_grouping"] is None and STLConfig.from_dict(data).allow_non_causal


def test_site_causality_verdicts():
    strassen, naive, fitted = bases.strassen(4), bases.naive(4), bases.fitted(4, 24)
    assert site_causality(row_separable(4, 24), "causal") == CAUSAL_KEPT
    assert site_causality(naive, "tokens", kind="matmul") == CAUSAL_KEPT
    assert site_causality(strassen, "tokens") == CAUSAL_ROUND_OFF
    assert site_causality(strassen, "tokens", kind="matmul") == CAUSAL_ROUND_OFF
    assert site_causality(fitted, "tokens") == CAUSAL_NOT_KEPT
    # a causal but inexact basis on QKᵀ / AV still mixes key columns
    assert site_causality(row_separable(4, 24), "tokens", kind="matmul") == CAUSAL_NOT_KEPT
    assert site_causality(fitted, "batch") == CAUSAL_KEPT
    linear = nn.Linear(64, 64)
    assert layer_causality(STLLinear.from_linear(linear, strassen)) == CAUSAL_ROUND_OFF
    assert layer_causality(STLLinear.from_linear(linear, fitted)) == CAUSAL_NOT_KEPT
    assert layer_causality(STLLinear.from_linear(linear, row_separable(4, 24),
                                                 row_grouping="causal")) == CAUSAL_KEPT


# --- stl_compile ------------------------------------------------------------------------------

def test_default_grouping_on_a_causal_lm_is_causal_and_exactly_causal():
    model = _gpt2()
    assert not _earlier_logits_change(model)  # the dense model, as a control
    compiled = stl_compile(model, (_ids()[0],), STLConfig(**CONVERT_ALL), backend="eager")
    report = compiled.stl_report
    assert report.row_grouping == "causal" and report.row_grouping_auto
    assert "causal language model" in report.causal_model
    linears = [s for s in report.converted if s.kind == "linear"]
    assert len(linears) == 4 and {s.causal for s in linears} == {CAUSAL_KEPT}
    assert report.causality == "kept"
    text = " ".join(str(report).split())
    assert "row_grouping='causal'" in text and "chosen for this model" in text
    assert "causal: kept (the model is causal: GPT2LMHeadModel" in text
    assert not _earlier_logits_change(compiled)  # float64, bit for bit


def test_explicit_tokens_on_a_causal_lm_is_refused_unless_allowed():
    model, ids = _gpt2(), _ids()[0]
    with pytest.raises(ValueError, match=r"row_grouping='tokens' on a causal model "
                                         r"\(GPT2LMHeadModel.*later positions.*"
                                         r"allow_non_causal=True"):
        stl_compile(model, (ids,), STLConfig(row_grouping="tokens", **CONVERT_ALL),
                    backend="eager")
    compiled = stl_compile(model, (ids,), STLConfig(row_grouping="tokens",
                                                    allow_non_causal=True, **CONVERT_ALL),
                           backend="eager")
    report = compiled.stl_report
    assert report.causality == "not kept" and not report.row_grouping_auto
    assert all(s.causal == CAUSAL_NOT_KEPT for s in report.converted)
    text = " ".join(str(report).split())
    assert "causal: NOT kept" in text and "STL, acausal" in text
    assert _earlier_logits_change(compiled)  # what the refusal protects against


def test_exact_basis_keeps_tokens_and_attention_matmuls_up_to_round_off():
    model, (ids, later) = _gpt2(), _ids()
    compiled = stl_compile(model, (ids,), STLConfig(basis="strassen", decompose_sdpa=True,
                                                    **CONVERT_ALL), backend="eager")
    report = compiled.stl_report
    assert report.row_grouping == "tokens" and report.causality == "kept up to round-off"
    matmuls = [s for s in report.sites if s.kind == "matmul"]
    assert matmuls and all(s.converted and s.causal == CAUSAL_ROUND_OFF for s in matmuls)
    assert "causal: kept up to round-off" in " ".join(str(report).split())
    with torch.no_grad():
        a, b = compiled(ids).logits, compiled(later).logits
    assert (a[:, :-1] - b[:, :-1]).abs().max() < 1e-12


def test_attention_matmuls_stay_dense_under_causal_grouping():
    case = CASES["decoder"]
    model = case.build().eval()
    compiled = stl_compile(model, case.args(2, 8), STLConfig(decompose_sdpa=True, **CONVERT_ALL),
                           backend="eager")
    report = compiled.stl_report
    assert report.row_grouping == "causal"
    assert "is_causal=True" in report.causal_model  # found in the graph
    matmuls = [s for s in report.sites if s.kind == "matmul"]
    assert len(matmuls) == 4 and not any(s.converted for s in matmuls)
    assert all(s.reason == MATMUL_DENSE_REASON for s in matmuls)
    assert all(s.causal == CAUSAL_KEPT for s in report.converted)


@pytest.mark.parametrize("name", ["bert", "vit"])
def test_non_causal_models_keep_tokens_bit_identically(name):
    case = CASES[name]
    model = case.build().eval()
    b, s = case.example
    args, kwargs = case.args(b, s), case.kwargs(b, s)
    outputs = []
    for grouping in (None, "tokens"):
        compiled = stl_compile(model, args, STLConfig(row_grouping=grouping, **CONVERT_ALL),
                               example_kwargs=kwargs, backend="eager")
        report = compiled.stl_report
        assert report.row_grouping == "tokens" and report.causal_model is None
        assert report.causality == "not a causal model" and report.converted
        assert "causal: not a causal model" in " ".join(str(report).split())
        with torch.no_grad():
            outputs.append(output_tensor(compiled(*args, **kwargs)))
    assert torch.equal(*outputs)


def test_preconverted_layers_of_a_causal_model_are_judged_from_their_weights():
    model, ids = _llama(), _ids()[0]
    layers = _linears(model)
    swap_linears_(model, STLConfig(**CONVERT_ALL))
    compiled = stl_compile(model, (ids,), STLConfig(**CONVERT_ALL), backend="eager")
    report = compiled.stl_report
    pre = [s for s in report.sites if s.preconverted]
    assert len(pre) == layers and {s.causal for s in pre} == {CAUSAL_KEPT}
    assert report.causality == "kept" and not _earlier_logits_change(compiled)


# --- swap_linears_ ----------------------------------------------------------------------------

def test_swap_linears_resolves_causal_and_refuses_tokens():
    model = _llama()
    layers = _linears(model)
    with pytest.raises(ValueError, match=rf"causal model \(LlamaForCausalLM.*{layers} linear "
                                         rf"layer\(s\).*allow_non_causal"):
        swap_linears_(model, STLConfig(row_grouping="tokens", **CONVERT_ALL))
    assert not any(isinstance(m, STLLinear) for m in model.modules())  # untouched

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a causal conversion warns about nothing
        outcome = swap_linears_(model, STLConfig(**CONVERT_ALL))
    assert list(outcome.values()).count("converted") == layers
    layers = [m for m in model.modules() if isinstance(m, STLLinear)]
    assert {m.row_grouping for m in layers} == {"causal"}
    assert all(m.keeps_causality for m in layers)
    assert not _earlier_logits_change(model)


def test_swap_linears_allow_non_causal_warns_and_exact_bases_pass():
    model = _llama()
    with pytest.warns(UserWarning, match="causality NOT kept"):
        swap_linears_(model, STLConfig(row_grouping="tokens", allow_non_causal=True,
                                       **CONVERT_ALL))
    assert _earlier_logits_change(model)
    exact = _llama()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        swap_linears_(exact, STLConfig(basis="strassen", row_grouping="tokens", **CONVERT_ALL))
    assert {m.row_grouping for m in exact.modules() if isinstance(m, STLLinear)} == {"tokens"}
    # a non-causal model keeps "tokens" by default
    mlp = CASES["mlp"].build()
    swap_linears_(mlp, STLConfig(**CONVERT_ALL))
    assert {m.row_grouping for m in mlp.modules() if isinstance(m, STLLinear)} == {"tokens"}


def test_basis_verdicts_do_not_depend_on_the_default_device():
    # swap_linears_ judges layers that live on the GPU; the verdict helpers once built an index
    # tensor on the default device and failed there ("found at least two devices"). A default
    # device other than the basis's reproduces that on a CPU-only machine.
    layer = STLLinear.from_linear(nn.Linear(16, 8), bases.causal(4, 24), row_grouping="causal")
    causal, shared, separable = bases.causal(4, 24), bases.strassen(4), row_separable(4, 24)
    with torch.device("meta"):
        assert is_causal(causal) and layer.keeps_causality
        assert not is_causal(shared)
        assert is_row_separable(separable)
