"""stl_compiler.fit.conditioning: amplification and the bf16 drift emulation of one layer."""

from __future__ import annotations

import pytest
import torch

from stl_compiler import STLLinear, bases
from stl_compiler.fit.conditioning import (
    amplification,
    bf16_drift,
    bf16_drift_ratio,
    bf16_round,
    dense_bf16_drift,
    gaussian_layer,
    stl_layer,
    term_norms,
    tile_vectors,
)
from stl_compiler.tiling import row_separable


def test_tile_vectors_are_row_major_tiles():
    a = torch.arange(32.0).reshape(4, 8)
    tv = tile_vectors(a, 4)
    assert tv.shape == (1, 2, 16)
    assert torch.equal(tv[0, 1], a[:, 4:].reshape(16))


def test_amplification_is_one_without_cancellation_and_large_for_min_alpha_bases():
    for basis in (bases.naive(4), row_separable(4, 24)):
        assert amplification(basis) == pytest.approx(1.0, rel=1e-12)
    ex, ew, d = bases.naive(2).matrices
    scaled = bases.STLBasis(2, 8, 2 * ex, ew, d / 2)
    assert torch.allclose(term_norms(scaled), torch.ones(8, dtype=torch.float64))
    assert amplification(bases.strassen(4)) == pytest.approx(4.0, rel=0.01)


def test_stl_layer_is_the_product_for_an_exact_basis_and_rounds_when_asked():
    x, w = gaussian_layer(64, 32, 48, seed=1)
    exact = tile_vectors(x @ w, 4)
    for basis in (bases.strassen(4), bases.naive(4)):
        assert torch.allclose(stl_layer(basis, x, w), exact, atol=1e-12)
    rounded = stl_layer(bases.naive(4), x, w, bf16=True)
    assert torch.equal(bf16_round(rounded), rounded) and not torch.equal(rounded, exact)


def test_drift_ratio_of_naive_is_near_one_and_of_the_min_alpha_basis_far_above_three():
    x, w = torch.randn(512, 128, dtype=torch.float64), torch.randn(128, 128,
                                                                   dtype=torch.float64) / 16
    dense = dense_bf16_drift(x, w)
    assert 1e-3 < dense < 5e-3  # bf16 keeps 8 significant bits
    assert 1.0 <= bf16_drift(bases.naive(4), x, w) / dense < 1.5
    result = bf16_drift_ratio(bases.fitted(4, 24), n=512, k=128, seed=2)
    assert result.ratio == pytest.approx(result.drift / result.dense)
    assert result.ratio > 10


def test_emulation_matches_torch_cpu_bf16_stl_linear():
    """The emulation is the measurement of a real bf16 STLLinear (torch CPU), within 10%."""
    basis = bases.fitted(4, 24)
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(128, 128, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(128, 128, generator=gen) / 128 ** 0.5)
    x = torch.randn(1024, 128, generator=gen)
    layer = STLLinear.from_linear(linear, basis)
    with torch.no_grad():
        y32 = layer(x).double()
        y16 = layer.to(torch.bfloat16)(x.bfloat16()).double()
    torch_drift = float((y16 - y32).norm() / y32.norm())
    emulated = bf16_drift(basis, x.double(), linear.weight.detach().double().T)
    assert emulated == pytest.approx(torch_drift, rel=0.1)
