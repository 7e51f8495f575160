"""rewrite_matmul: act×act sites next to pre-converted STL layers, filter_fn for act×act
sites, the cost guard (small heads), and overrides that match no site."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from stl_compiler import STLConfig, stl_compile, swap_linears_


class Attention(nn.Module):
    def __init__(self, dim: int = 128, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.eval()  # inference: stl_compile warns about train() mode

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).reshape(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        scores = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
        return self.out((scores @ v).transpose(1, 2).reshape(b, s, d))


X = torch.randn(2, 64, 128)  # 2 heads of 64, 64 tokens
ANY_COST = {"max_cost_ratio": None}


def _matmul_rows(compiled):
    return [s for s in compiled.stl_report.sites if s.kind == "matmul"]


def test_act_act_sites_convert_in_a_plain_model():
    compiled = stl_compile(Attention(), (X,), STLConfig(basis="random", **ANY_COST),
                           backend="eager")
    assert [s.converted for s in _matmul_rows(compiled)] == [True, True]


def test_preconverted_model_keeps_act_act_sites_dense_and_says_so():
    model = Attention()
    swap_linears_(model, STLConfig(basis="random", **ANY_COST))  # e.g. then calibrated
    with pytest.warns(UserWarning, match="already holds 2 STL layer.*2 activation x activation "
                                         "site.*stay dense"):
        compiled = stl_compile(model, (X,), STLConfig(basis="random", **ANY_COST),
                               backend="eager")
    rows = _matmul_rows(compiled)
    assert len(rows) == 2 and not any(s.converted for s in rows)
    assert all(s.reason.startswith("kept dense next to the model's STL layers") for s in rows)


def test_explicit_targets_convert_act_act_sites_next_to_stl_layers_with_a_warning():
    model = Attention()
    swap_linears_(model, STLConfig(basis="random", **ANY_COST))
    with pytest.warns(UserWarning, match="2 activation x activation site.*converted "
                                         "UNCALIBRATED in a model with 2 STL layer"):
        compiled = stl_compile(model, (X,), STLConfig(basis="random", targets={"linear", "matmul"},
                                                      **ANY_COST), backend="eager")
    assert all(s.converted for s in _matmul_rows(compiled))


def test_filter_fn_gets_none_as_module_for_act_act_sites():
    seen = []

    def record(module, fqn):
        seen.append((module, fqn))
        return module is not None  # keep act×act sites dense

    compiled = stl_compile(Attention(), (X,), STLConfig(basis="random", filter_fn=record,
                                                        **ANY_COST), backend="eager")
    act = [(m, f) for m, f in seen if f.startswith("matmul")]
    assert len(act) == 2 and all(m is None for m, _ in act)
    assert all(s.reason == "filtered by filter_fn" for s in _matmul_rows(compiled))


def test_cost_guard_keeps_small_heads_dense():
    # head size 16 (8 heads of 128), 64 tokens, rank 24: 24/64 + 24/16 + 2 * 24/64 = 2.625x
    compiled = stl_compile(Attention(heads=8), (X,), STLConfig(basis="random"), backend="eager")
    rows = _matmul_rows(compiled)
    assert rows[0].reason == ("cost: STL costs 2.62x dense FLOPs (n=64, k=16, m=64) > "
                              "max_cost_ratio=0.8 (max_cost_ratio=None converts anyway)")
    assert "k=64, m=16" in rows[1].reason and not any(s.converted for s in rows)


def test_override_matching_no_site_warns_and_a_matching_one_does_not():
    with pytest.warns(UserWarning, match=r"override pattern\(s\) \['attn\.\*'\] match no site"):
        stl_compile(Attention(), (X,), STLConfig(basis="random", overrides={"attn.*": "skip"},
                                                 **ANY_COST), backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stl_compile(Attention(), (X,), STLConfig(basis="random", overrides={"qkv": "skip"},
                                                 **ANY_COST), backend="eager")
