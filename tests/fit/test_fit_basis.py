import json
import os

import pytest
import torch

from stl_compiler import bases
from stl_compiler.fit import balance, basis_alpha, fit_basis, two_four_alpha

SHIPPED = (16, 20, 24, 28, 32, 36, 39, 40, 41, 42, 44, 48)
# α of the bases shipped before the rank-48 start (deflation from Strassen-49 only): the
# shipped bases must never get worse than these
PREVIOUS_ALPHA = {16: 2.641778262079539, 20: 2.3290917550598373, 24: 1.8958051156935292,
                  28: 1.5817072009811837, 32: 1.260575371072458, 36: 0.9290847395316733,
                  40: 0.585537154555615, 41: 0.5170973043362799, 42: 0.45050988138209086,
                  44: 0.31688728788914744, 48: 0.06267687593279371}


@pytest.mark.parametrize("method", ["als", "sgd"])
def test_short_fit_improves_over_its_initialization(method):
    init = bases.pruned(bases.strassen(4), 24, seed=5)
    basis, alpha = fit_basis(4, 24, init=init, method=method, steps=30)
    assert alpha < basis_alpha(init) - 0.05
    assert basis.alpha == alpha == pytest.approx(basis_alpha(basis), rel=1e-9)


def test_rank_49_from_strassen_init_is_exact():
    basis, alpha = fit_basis(4, 49, init="strassen-pruned", restarts=1, steps=20)
    assert alpha < 1e-6


def test_deflation_from_the_rank_48_scheme():
    # rank 48 from dps48 is the exact scheme itself, balanced
    basis, alpha = fit_basis(4, 48, init="deflate-dps48", steps=5)
    assert alpha < 1e-20 and basis.exactness_error() < 1e-9
    # one row dropped costs ~1/16 of α from dps48; Strassen-49 deflation needs two drops
    # (α ≈ 0.13 at rank 47), so this fails if the start were not the rank-48 scheme
    assert fit_basis(4, 47, init="deflate-dps48", steps=10)[1] < 0.07


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
    with pytest.raises(ValueError, match="exact rank-48 basis 'dps48-rational' and cannot give "
                                         "rank 49"):
        fit_basis(4, 49, init="deflate-dps48")
    with pytest.raises(ValueError, match="4x4 tiles, the fit asks for tile 2"):
        fit_basis(2, 5, init="deflate-dps48")
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
        entry = index["bases"][str(rank)]
        assert entry["alpha"] == pytest.approx(basis.alpha, rel=1e-12)
        # the better of the two deflation starts is the one shipped (a kept file is the same
        # fit up to rounding: ALS is not bit-reproducible across machines)
        starts = {"strassen49": entry["alpha_start_strassen49"],
                  "dps48": entry["alpha_start_dps48"]}
        assert entry["alpha"] <= min(starts.values()) * (1 + 1e-9)
        assert starts[entry["start"]] == pytest.approx(entry["alpha"], rel=1e-9)
        assert basis.alpha <= PREVIOUS_ALPHA.get(rank, float("inf")) * (1 + 1e-9)
        assert basis.alpha < previous  # more rank, less error
        previous = basis.alpha
    assert bases.fitted(4, 40).alpha <= two_four_alpha(4)  # issue 15: match 2:4 at r <= 40
    assert bases.fitted(4, 48).exactness_error() < 1e-9  # deflating dps48 by 0 rows: exact


# --- causal token bases (fit_basis(support=...)) ----------------------------------------

def _tile_error_monte_carlo(basis, moments, n=100_000, seed=0):
    """Mean squared error per entry of the STL tile product against X @ W, in float64, for
    X, W drawn with the given second moments (Gaussian, so the moments are all there is)."""
    gen = torch.Generator().manual_seed(seed)
    lx, lw = (torch.linalg.cholesky(m) for m in moments)
    x = torch.randn(n, 16, generator=gen, dtype=torch.float64) @ lx.T
    w = torch.randn(n, 16, generator=gen, dtype=torch.float64) @ lw.T
    exact = (x.view(n, 4, 4) @ w.view(n, 4, 4)).reshape(n, 16)
    approx = ((x @ basis.ex.T) * (w @ basis.ew.T)) @ basis.d
    return float((exact - approx).square().mean())


def _outside_support(basis, support="causal"):
    from stl_compiler.fit.fitting import basis_pivots, pivot_masks

    pivots = basis_pivots(basis, support)
    assert pivots is not None
    ex_mask, d_mask = pivot_masks(4, pivots, support)
    return torch.cat([basis.ex[~ex_mask], basis.d[~d_mask]])


def test_causal_fit_is_causal_and_beats_row_separable_on_correlated_tokens():
    from stl_compiler.fit.alpha import token_moments
    from stl_compiler.tiling import is_causal, is_row_separable, row_separable

    moments = token_moments(4, 0.8)
    basis, alpha = fit_basis(4, 24, data=moments, support="causal", restarts=2, steps=150,
                             seed=3, search_sweeps=30)
    assert is_causal(basis, tol=0.0) and not is_row_separable(basis)  # exact zeros
    assert torch.all(_outside_support(basis) == 0)
    assert basis.name == "causal4x24"
    assert alpha == pytest.approx(basis_alpha(basis, moments), rel=1e-9)
    separable = basis_alpha(row_separable(4, 24), moments)
    assert separable == pytest.approx(2.5, rel=1e-6)  # (64 - r)/16 whatever the correlation
    assert alpha < 0.6 * separable  # measured 1.10 (rho = 0.8) against 2.5
    # α is the mean squared error of the tile product on such tiles (Monte Carlo, 1e5 tiles:
    # a standard error of about 1%)
    assert _tile_error_monte_carlo(basis, moments) == pytest.approx(alpha, rel=0.05)


def test_causal_fit_on_gaussian_tiles_ties_the_row_separable_bound():
    """For i.i.d. tiles the diagonal blocks (input row a -> output row a) of a causal basis
    come from the terms with pivot a only, so α >= (64 - r)/16, which row-separable bases
    reach: the fit must land exactly there, at any rank (not only multiples of 4)."""
    from stl_compiler.tiling import is_causal

    for rank in (18, 24):
        basis, alpha = fit_basis(4, rank, support="causal", restarts=1, steps=60,
                                 search_sweeps=20)
        assert is_causal(basis, tol=0.0)
        assert alpha == pytest.approx((64 - rank) / 16, rel=1e-6)
        assert alpha >= (64 - rank) / 16 * (1 - 1e-9)


def test_row_separable_support_with_correlated_samples_keeps_exact_zeros():
    from stl_compiler.tiling import is_row_separable, row_separable

    gen = torch.Generator().manual_seed(1)
    mix = torch.randn(16, 16, generator=gen, dtype=torch.float64) * 0.4 + torch.eye(16)
    x = torch.randn(400, 16, generator=gen, dtype=torch.float64) @ mix
    w = torch.randn(400, 16, generator=gen, dtype=torch.float64)
    basis, alpha = fit_basis(4, 12, data=(x, w), support="row_separable", restarts=2,
                             steps=40)
    assert is_row_separable(basis, tol=0.0)
    assert torch.all(_outside_support(basis, "row_separable") == 0)
    assert alpha == pytest.approx(basis_alpha(basis, (x, w)), rel=1e-9)
    assert alpha < basis_alpha(row_separable(4, 12), (x, w))


def test_causal_fit_is_deterministic_and_honours_given_pivots():
    from stl_compiler.fit.alpha import token_moments
    from stl_compiler.fit.fitting import basis_pivots

    moments = token_moments(4, 0.5)
    pivots = [0] * 10 + [2] * 6
    a, alpha_a = fit_basis(4, 16, data=moments, support="causal", pivots=pivots, restarts=2,
                           steps=40, seed=7)
    b, alpha_b = fit_basis(4, 16, data=moments, support="causal", pivots=pivots, restarts=2,
                           steps=40, seed=7)
    assert alpha_a == alpha_b and all(torch.equal(x, y) for x, y in zip(a.matrices,
                                                                       b.matrices))
    assert sorted(basis_pivots(a)) == pivots
    # a causal basis as init keeps its pivots and does not get worse
    again, alpha = fit_basis(4, 16, data=moments, support="causal", init=a, steps=20)
    assert alpha <= alpha_a * (1 + 1e-9) and sorted(basis_pivots(again)) == pivots


def test_fit_basis_rejects_bad_support_arguments():
    with pytest.raises(ValueError, match="support must be None or one of"):
        fit_basis(4, 8, support="lower")
    with pytest.raises(ValueError, match="ALS only"):
        fit_basis(4, 8, support="causal", method="sgd")
    with pytest.raises(ValueError, match="init='deflate' is not one of them"):
        fit_basis(4, 8, support="causal", init="deflate")
    with pytest.raises(ValueError, match="pivots must give one tile row per term"):
        fit_basis(4, 8, support="causal", pivots=[0, 1])
    with pytest.raises(ValueError, match="pivots must be tile rows 0..3"):
        fit_basis(4, 2, support="causal", pivots=[0, 4])
    with pytest.raises(ValueError, match="pivots needs support"):
        fit_basis(4, 2, pivots=[0, 1])
    with pytest.raises(ValueError, match="does not fit support='causal'"):
        fit_basis(4, 49, support="causal", init=bases.strassen(4))


def test_fit_basis_cli_causal(tmp_path, capsys):
    from safetensors import safe_open

    from stl_compiler.cli import main
    from stl_compiler.fit.alpha import token_moments
    from stl_compiler.tiling import is_causal

    out = tmp_path / "causal.safetensors"
    argv = ["fit-basis", "--causal", "--rho", "0.8", "--rank", "12", "--steps", "40",
            "--restarts", "1", "--out", str(out), "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    basis = bases.load(out)
    assert is_causal(basis, tol=0.0) and basis.rank == 12
    assert summary["alpha"] == basis.alpha == pytest.approx(basis_alpha(basis), rel=1e-9)
    assert summary["alpha_tokens"] == pytest.approx(
        basis_alpha(basis, token_moments(4, 0.8)), rel=1e-9)
    assert summary["alpha_tokens"] < summary["alpha_row_separable"] == (64 - 12) / 16
    with safe_open(str(out), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["support"] == "causal" and json.loads(meta["rho"]) == 0.8
    # --rho needs --causal; --causal refuses a deflation init
    for extra, message in ((["--rho", "0.5"], "--rho needs --causal"),
                           (["--causal", "--init", "deflate"], "drop --init deflate"),
                           (["--causal", "--rho", "0.5", "0.2"], "--rho takes 1 value")):
        argv = ["fit-basis", "--rank", "12", "--out", str(tmp_path / "x.safetensors"), *extra]
        assert main(argv) == 2
        assert message in capsys.readouterr().err
