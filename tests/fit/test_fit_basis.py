import json
import os

import pytest
import torch

from stl_compiler import bases
from stl_compiler.fit import balance, basis_alpha, fit_basis, two_four_alpha

SHIPPED = (16, 20, 24, 28, 32, 36, 40, 41, 42, 44, 48)


@pytest.mark.parametrize("method", ["als", "sgd"])
def test_short_fit_improves_over_its_initialization(method):
    init = bases.pruned(bases.strassen(4), 24, seed=5)
    basis, alpha = fit_basis(4, 24, init=init, method=method, steps=30)
    assert alpha < basis_alpha(init) - 0.05
    assert basis.alpha == alpha == pytest.approx(basis_alpha(basis), rel=1e-9)


def test_rank_49_from_strassen_init_is_exact():
    basis, alpha = fit_basis(4, 49, init="strassen-pruned", restarts=1, steps=20)
    assert alpha < 1e-6


def test_restarts_keep_the_best():
    one = fit_basis(4, 16, init="random", restarts=1, steps=40, seed=0)[1]
    three = fit_basis(4, 16, init="random", restarts=3, steps=40, seed=0)[1]
    assert three <= one


def test_fit_on_samples_beats_gaussian_fit_on_those_samples():
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(16, 16, generator=gen, dtype=torch.float64) * 0.5 + torch.eye(16)
    x = torch.randn(512, 16, generator=gen, dtype=torch.float64) @ mix
    w = torch.randn(512, 16, generator=gen, dtype=torch.float64)
    gaussian, _ = fit_basis(4, 24, steps=60, restarts=1)
    fitted, alpha = fit_basis(4, 24, data=(x, w), steps=60, restarts=1)
    assert alpha == pytest.approx(basis_alpha(fitted, (x, w)), rel=1e-9)
    assert alpha < basis_alpha(gaussian, (x, w))


def test_balance_keeps_the_tensor_and_equalizes_row_norms():
    raw = bases.random(4, 12, seed=1)
    raw = bases.STLBasis(4, 12, raw.ex * 10, raw.ew, raw.d / 5)
    out = balance(raw)
    assert torch.allclose(out.tensor(), raw.tensor(), atol=1e-12)
    norms = torch.stack([m.norm(dim=1) for m in out.matrices])
    assert torch.allclose(norms[0], norms[1]) and torch.allclose(norms[1], norms[2])


def test_fit_basis_rejects_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        fit_basis(4, 8, method="lbfgs")
    with pytest.raises(ValueError, match="init"):
        fit_basis(4, 8, init="naive")
    with pytest.raises(ValueError, match="rank 50"):
        fit_basis(4, 50, init="strassen-pruned")
    with pytest.raises(ValueError, match="restarts"):
        fit_basis(4, 8, restarts=0)
    with pytest.raises(TypeError, match="steps"):
        fit_basis(4, 8, steps=1.5)


def test_shipped_bases_load_and_their_alpha_is_reproduced():
    assert set(SHIPPED) <= set(bases.fitted_ranks(4))
    index_path = os.path.join(os.path.dirname(bases.__file__), "data", "fitted_bases.json")
    with open(index_path) as handle:
        index = json.load(handle)
    assert index["alpha_2_4"] == pytest.approx(two_four_alpha(4))
    previous = float("inf")
    for rank in SHIPPED:
        basis = bases.fitted(4, rank)
        assert (basis.tile, basis.rank) == (4, rank)
        assert basis.alpha == pytest.approx(basis_alpha(basis), rel=1e-9)
        assert index["bases"][str(rank)]["alpha"] == pytest.approx(basis.alpha, rel=1e-12)
        assert basis.alpha < previous  # more rank, less error
        previous = basis.alpha
    assert bases.fitted(4, 41).alpha <= two_four_alpha(4)
