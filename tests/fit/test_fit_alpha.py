import math

import pytest
import torch

from stl_compiler import bases
from stl_compiler.fit import basis_alpha, two_four_alpha


def _monte_carlo(basis, x, w):
    t = basis.tile
    exact = (x.view(-1, t, t) @ w.view(-1, t, t)).reshape(-1, t * t)
    approx = ((x @ basis.ex.T) * (w @ basis.ew.T)) @ basis.d
    return float((exact - approx).square().mean())


def test_two_four_alpha_reproduces_paper():
    assert abs(two_four_alpha(4) - 0.53) < 0.02


def test_two_four_alpha_matches_monte_carlo_of_magnitude_pruning():
    gen = torch.Generator().manual_seed(0)
    n = 100_000
    w = torch.randn(n, 4, 4, generator=gen, dtype=torch.float64)
    x = torch.randn(n, 4, 4, generator=gen, dtype=torch.float64)
    keep = torch.zeros_like(w).scatter_(1, w.abs().topk(2, dim=1).indices, 1.0)  # per column
    mc = float((x @ (w - w * keep)).square().sum((1, 2)).mean()) / 16
    assert two_four_alpha(4) == pytest.approx(mc, abs=0.01)


def test_two_four_alpha_rejects_bad_tiles():
    with pytest.raises(ValueError, match="multiple of 4"):
        two_four_alpha(6)
    with pytest.raises(TypeError):
        two_four_alpha(4.0)


@pytest.mark.parametrize("basis", [bases.random(4, 24, seed=3),
                                   bases.pruned(bases.strassen(4), 40, seed=1)],
                         ids=["random", "pruned"])
def test_gaussian_alpha_is_tensor_distance(basis):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(200_000, 16, generator=gen, dtype=torch.float64)
    w = torch.randn(200_000, 16, generator=gen, dtype=torch.float64)
    closed = float((bases.tile_product_tensor(4) - basis.tensor()).square().sum()) / 16
    assert basis_alpha(basis) == pytest.approx(closed, rel=1e-12)
    assert _monte_carlo(basis, x, w) == pytest.approx(closed, rel=0.03)


def test_sample_alpha_is_exact_for_independent_draws():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(64, 4, 4, generator=gen, dtype=torch.float64).abs()   # correlated: mean != 0
    w = torch.randn(48, 16, generator=gen, dtype=torch.float64) * 3
    basis = bases.random(4, 20, seed=0)
    xi = x.reshape(64, 1, 16).expand(64, 48, 16).reshape(-1, 16)
    wi = w.reshape(1, 48, 16).expand(64, 48, 16).reshape(-1, 16)
    assert basis_alpha(basis, (x, w)) == pytest.approx(_monte_carlo(basis, xi, wi), rel=1e-7)
    assert math.isclose(basis_alpha(bases.strassen(4), (x, w)), 0.0, abs_tol=1e-20)


def test_alpha_rejects_bad_data():
    with pytest.raises(ValueError, match="gaussian"):
        basis_alpha(bases.strassen(4), "uniform")
    with pytest.raises(ValueError, match="shape"):
        basis_alpha(bases.strassen(4), (torch.zeros(3, 9), torch.zeros(3, 16)))
    with pytest.raises(TypeError):
        basis_alpha("strassen")
