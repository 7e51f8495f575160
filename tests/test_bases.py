"""stl_compiler.bases: construction checks, exactness, pruning, save/load."""

from __future__ import annotations

import importlib.util
import json
import os
import struct
from fractions import Fraction

import pytest
import torch
from safetensors.torch import save_file
from stl_helpers import EXACT_BASES

from stl_compiler import bases
from stl_compiler.bases import STLBasis
from stl_compiler.functional import stl_matmul


def _mats(rank: int, tile: int, dtype=torch.float64):
    return [torch.randn(rank, tile * tile, dtype=dtype) for _ in range(3)]


def _vec(tile: torch.Tensor) -> torch.Tensor:
    """Row-major vectorization written out by hand: index a*t + b holds tile[a, b]."""
    t = tile.shape[0]
    return torch.stack([tile[a, b] for a in range(t) for b in range(t)])


def _tile_product(basis: STLBasis, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """One tile product d.T @ ((ex @ vec X) * (ew @ vec W)), reshaped row-major to t×t."""
    y = basis.d.T @ ((basis.ex @ _vec(x)) * (basis.ew @ _vec(w)))
    return y.reshape(basis.tile, basis.tile)


# --- exact bases ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(EXACT_BASES))
def test_exact_basis_computes_the_tile_product(name):
    basis = EXACT_BASES[name]()
    t = basis.tile
    for _ in range(3):
        x, w = torch.randn(t, t, dtype=torch.float64), torch.randn(t, t, dtype=torch.float64)
        y = _tile_product(basis, x, w)
        assert torch.allclose(y, x @ w, rtol=0, atol=1e-12)
    assert basis.exactness_error() < 1e-12
    assert basis.alpha == 0.0


@pytest.mark.parametrize("tile, rank", [(2, 7), (4, 49), (8, 343)])
def test_strassen_rank(tile, rank):
    basis = bases.strassen(tile)
    assert (basis.tile, basis.rank) == (tile, rank)
    assert all(m.shape == (rank, tile * tile) for m in basis.matrices)


@pytest.mark.parametrize("tile", [2, 3, 4])
def test_naive_rank_and_tensor(tile):
    basis = bases.naive(tile)
    assert basis.rank == tile**3
    assert torch.equal(basis.tensor(), bases.tile_product_tensor(tile))


def test_tile_product_tensor_is_row_major_matmul():
    t = 3
    T = bases.tile_product_tensor(t)
    x, w = torch.randn(t, t, dtype=torch.float64), torch.randn(t, t, dtype=torch.float64)
    y = torch.einsum("a,b,abc->c", _vec(x), _vec(w), T)
    assert torch.allclose(y, _vec(x @ w), atol=1e-12)


def test_strassen_needs_power_of_two():
    with pytest.raises(ValueError, match="power-of-two"):
        bases.strassen(3)


# --- pruned / random -----------------------------------------------------------------------

def test_pruned_full_rank_is_exact():
    basis = bases.pruned(bases.strassen(4), 49)
    assert basis.rank == 49
    assert basis.exactness_error() < 1e-12
    assert basis.alpha == 0.0


def test_pruned_keeps_a_subset_of_rows_deterministically():
    full = bases.strassen(4)
    a, b = bases.pruned(full, 24, seed=3), bases.pruned(full, 24, seed=3)
    c = bases.pruned(full, 24, seed=4)
    assert a.rank == 24 and a.alpha is None
    assert torch.equal(a.ex, b.ex) and torch.equal(a.d, b.d)
    assert not torch.equal(a.ex, c.ex)
    stacked = torch.cat([full.ex, full.ew, full.d], dim=1)
    for row in torch.cat([a.ex, a.ew, a.d], dim=1):
        assert (stacked == row).all(dim=1).any()
    assert a.exactness_error() > 1.0


def test_pruned_errors():
    with pytest.raises(ValueError, match="cannot prune"):
        bases.pruned(bases.strassen(2), 8)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        bases.pruned(bases.strassen(2), 0)
    with pytest.raises(TypeError, match="STLBasis"):
        bases.pruned("strassen", 3)


def test_random_basis():
    a, b = bases.random(4, 24, seed=1), bases.random(4, 24, seed=1)
    c = bases.random(4, 24, seed=2)
    assert (a.tile, a.rank) == (4, 24)
    assert torch.equal(a.ew, b.ew) and not torch.equal(a.ew, c.ew)
    assert a.exactness_error() > 1.0


# --- construction checks -------------------------------------------------------------------

@pytest.mark.parametrize("tile", [1, 0, -2])
def test_tile_below_two_raises(tile):
    with pytest.raises(ValueError, match="tile must be >= 2"):
        STLBasis(tile, 3, *_mats(3, 2))
    with pytest.raises(ValueError, match="tile must be >= 2"):
        bases.random(tile, 3)
    with pytest.raises(ValueError, match="tile must be >= 2"):
        bases.naive(tile)


@pytest.mark.parametrize("rank", [0, -1])
def test_rank_below_one_raises(rank):
    with pytest.raises(ValueError, match="rank must be >= 1"):
        STLBasis(2, rank, *_mats(1, 2))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        bases.random(2, rank)


def test_non_int_tile_or_rank_raises():
    with pytest.raises(TypeError, match="tile must be an int"):
        STLBasis(2.0, 3, *_mats(3, 2))
    with pytest.raises(TypeError, match="rank must be an int"):
        STLBasis(2, "3", *_mats(3, 2))


@pytest.mark.parametrize("label", ["ex", "ew", "d"])
@pytest.mark.parametrize("shape", [(3, 9), (4, 4), (3,), (3, 4, 1)])
def test_wrong_matrix_shape_raises(label, shape):
    mats = dict(zip(("ex", "ew", "d"), _mats(3, 2)))
    mats[label] = torch.randn(shape, dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"'{label}' has shape"):
        STLBasis(2, 3, **mats)


@pytest.mark.parametrize("label", ["ex", "ew", "d"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_matrix_raises(label, bad):
    mats = dict(zip(("ex", "ew", "d"), _mats(3, 2)))
    mats[label][1, 2] = bad
    with pytest.raises(ValueError, match=rf"'{label}' contains NaN or Inf"):
        STLBasis(2, 3, **mats)


def test_non_float_or_non_tensor_matrix_raises():
    ex, ew, d = _mats(3, 2)
    with pytest.raises(TypeError, match="'ew' must be floating point"):
        STLBasis(2, 3, ex, torch.ones(3, 4, dtype=torch.int64), d)
    with pytest.raises(TypeError, match="'d' must be a torch.Tensor"):
        STLBasis(2, 3, ex, ew, d.tolist())


def test_matrices_are_stored_as_float64_cpu_copies():
    ex, ew, d = _mats(3, 2, torch.float32)
    ex.requires_grad_(True)
    basis = STLBasis(2, 3, ex, ew, d)
    for m in basis.matrices:
        assert m.dtype == torch.float64 and m.device.type == "cpu" and m.is_contiguous()
        assert not m.requires_grad
    assert torch.equal(basis.ex, ex.detach().double())
    ex32, _, d32 = basis.to(torch.float32)
    assert ex32.dtype == torch.float32 and torch.equal(d32, d)


def test_repr_names_the_basis():
    text = repr(bases.strassen(2))
    assert "strassen2" in text and "tile=2" in text and "rank=7" in text


# --- dps48: the published exact rank-48 scheme ------------------------------------------------

_TOOLS = os.path.join(os.path.dirname(__file__), os.pardir, "tools")
_SHIPPED_DPS48 = [v for v in bases.DPS48_VARIANTS if os.path.exists(
    os.path.join(os.path.dirname(bases.__file__), "data", f"dps48_t4_{v}.safetensors"))]


def _parse_plinopt():
    spec = importlib.util.spec_from_file_location("parse_plinopt",
                                                  os.path.join(_TOOLS, "parse_plinopt.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dps48_ships_every_variant():
    assert _SHIPPED_DPS48 == list(bases.DPS48_VARIANTS)


@pytest.mark.parametrize("variant", _SHIPPED_DPS48)
def test_dps48_tensor_is_exactly_the_4x4_matmul_tensor(variant):
    basis = bases.dps48(variant)
    assert (basis.tile, basis.rank, basis.alpha) == (4, 48, 0.0)
    # all 4096 entries equal, not close: the coefficients are dyadic, so float64 is exact
    assert torch.equal(basis.tensor(), bases.tile_product_tensor(4))


@pytest.mark.parametrize("variant", _SHIPPED_DPS48)
def test_dps48_stl_matmul_equals_dense(variant):
    basis = bases.dps48(variant)
    x = torch.randn(3, 20, 36, dtype=torch.float64)  # padded: 20, 36 and 12 -> tiles of 4
    w = torch.randn(36, 12, dtype=torch.float64)
    dense = x @ w
    scale = float(x.abs().amax() * w.abs().amax()) * 36
    assert (stl_matmul(x, w, basis) - dense).abs().max() < 1e-13 * scale
    # a one-term change breaks it: the test can see an inexact basis
    broken = STLBasis(4, 48, basis.ex, basis.ew, basis.d * (1 + 1e-3 * (torch.arange(48) == 7
                                                                          )[:, None]))
    assert (stl_matmul(x, w, broken) - dense).abs().max() > 1e-6 * scale


@pytest.mark.parametrize("variant", _SHIPPED_DPS48)
def test_dps48_file_is_the_parsed_plinopt_data_with_provenance(variant):
    from safetensors import safe_open

    tool = _parse_plinopt()
    commit, files = tool.VARIANTS[variant]
    L, R, P = (tool.product([tool.read_sms(os.path.join(tool.SOURCE, f)) for f in files[m]])
               for m in "LRP")
    parsed = tool.to_basis(L, R, P, name="parsed")
    for ours, theirs in zip(bases.dps48(variant).matrices, parsed.matrices):
        assert torch.equal(ours, theirs)
    path = os.path.join(os.path.dirname(bases.__file__), "data", f"dps48_t4_{variant}.safetensors")
    with safe_open(path, framework="pt") as handle:
        meta = handle.metadata()
    assert meta["source_commit"] == commit and "jgdumas/plinopt" in meta["source_repository"]
    assert "arXiv:2506.13242" in meta["source_paper"] and "CeCILL-B" in meta["licence"]


def test_parse_plinopt_reads_sms_and_rejects_inexact_schemes(tmp_path):
    tool = _parse_plinopt()
    path = tmp_path / "m.sms"
    path.write_text("# a comment\n2 3 M\n1 1 -1/8\n2 3 2\n0 0 0\n")
    assert tool.read_sms(str(path)) == [[Fraction(-1, 8), 0, 0], [0, 0, 2]]
    path.write_text("2 3 M\n3 1 1\n0 0 0\n")
    with pytest.raises(ValueError, match="outside a 2x3 matrix"):
        tool.read_sms(str(path))
    path.write_text("2 3 M\n1 1 1\n")
    with pytest.raises(ValueError, match="terminating"):
        tool.read_sms(str(path))
    naive = bases.naive(4)
    L, R, P = ([[Fraction(int(v)) for v in row] for row in m.tolist()]
               for m in (naive.ex, naive.ew, naive.d.T))
    tool.check_exact(L, R, P)  # the naive rank-64 scheme is exact
    P[5][9] += 1
    with pytest.raises(ValueError, match="not an exact scheme"):
        tool.check_exact(L, R, P)


def test_dps48_errors():
    with pytest.raises(ValueError, match="variant must be one of"):
        bases.dps48("complex")
    with pytest.raises(ValueError, match="4x4 tile scheme, config asks for tile 2"):
        bases.resolve("dps48", 2, 48)


# --- resolve / fitted ----------------------------------------------------------------------

def test_resolve_names():
    assert bases.resolve("strassen", 2, 5).rank == 7
    assert bases.resolve("naive", 3, 5).rank == 27
    assert bases.resolve("strassen-pruned", 4, 20).rank == 20
    assert bases.resolve("random", 4, 6).rank == 6
    assert bases.resolve("dps48", 4, 24).rank == 48  # exact: its rank is fixed, like strassen
    basis = bases.random(2, 3)
    assert bases.resolve(basis, 2, 99) is basis


def test_resolve_errors():
    with pytest.raises(ValueError, match="unknown basis name 'strasen'"):
        bases.resolve("strasen", 4, 24)
    with pytest.raises(ValueError, match="has tile 2, config asks for 4"):
        bases.resolve(bases.strassen(2), 4, 7)
    with pytest.raises(TypeError, match="STLBasis or a name"):
        bases.resolve(3, 4, 24)


def test_fitted_missing_rank_raises():
    with pytest.raises(ValueError, match="no fitted basis ships for tile=7, rank=5"):
        bases.fitted(7, 5)


# --- save / load ---------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [None, 0.0, 0.4375])
def test_save_load_round_trip(tmp_path, alpha):
    ex, ew, d = _mats(5, 3)
    basis = STLBasis(3, 5, ex, ew, d, name="mine", alpha=alpha)
    path = tmp_path / "basis.safetensors"
    basis.save(path)
    loaded = bases.load(path)
    assert (loaded.tile, loaded.rank, loaded.name) == (3, 5, "mine")
    assert loaded.alpha == alpha
    for a, b in zip(loaded.matrices, basis.matrices):
        assert torch.equal(a, b) and a.dtype == torch.float64
    bases.load(str(path))  # str paths work too


def test_save_keeps_extra_metadata_and_protects_its_own_keys(tmp_path):
    from safetensors import safe_open

    basis = bases.strassen(2)
    path = tmp_path / "basis.safetensors"
    basis.save(path, metadata={"licence": "mine"})
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["licence"] == "mine"
    assert bases.load(path).name == "strassen2"
    with pytest.raises(ValueError, match=r"metadata keys \['rank'\] are reserved"):
        basis.save(path, metadata={"rank": "3"})
    with pytest.raises(TypeError, match="metadata must map str to str"):
        basis.save(path, metadata={"year": 2025})


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no basis file"):
        bases.load(tmp_path / "absent.safetensors")


def test_load_random_bytes_raises(tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(os.urandom(512))
    with pytest.raises(ValueError, match="not a safetensors file"):
        bases.load(path)


def test_load_bad_header_raises(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 12) + b"not json ...")
    with pytest.raises(ValueError, match="not a safetensors file"):
        bases.load(path)


def test_load_safetensors_with_other_tensors_raises(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"weight": torch.randn(4, 4), "bias": torch.randn(4)}, str(path))
    with pytest.raises(ValueError, match="not an STL basis"):
        bases.load(path)


def test_load_right_tensor_names_without_metadata_raises(tmp_path):
    path = tmp_path / "nometa.safetensors"
    save_file(dict(zip(("ex", "ew", "d"), _mats(3, 2))), str(path))
    with pytest.raises(ValueError, match="not an STL basis"):
        bases.load(path)


def test_load_malformed_metadata_raises(tmp_path):
    path = tmp_path / "malformed.safetensors"
    meta = {"format": "stl-basis/1", "tile": "two", "rank": "3", "alpha": json.dumps(None)}
    save_file(dict(zip(("ex", "ew", "d"), _mats(3, 2))), str(path), metadata=meta)
    with pytest.raises(ValueError, match="malformed basis metadata"):
        bases.load(path)


def test_load_inconsistent_shapes_raises(tmp_path):
    path = tmp_path / "inconsistent.safetensors"
    meta = {"format": "stl-basis/1", "tile": "2", "rank": "4", "alpha": "null"}
    save_file(dict(zip(("ex", "ew", "d"), _mats(3, 2))), str(path), metadata=meta)
    with pytest.raises(ValueError, match="has shape"):
        bases.load(path)


# --- shipped causal token bases (bases.causal) ---------------------------------------------

CAUSAL_SHIPPED = (16, 20, 24, 28, 32, 36, 40, 44, 48)


def _causal_index() -> dict:
    path = os.path.join(os.path.dirname(bases.__file__), "data", "fitted_bases.json")
    with open(path) as handle:
        return json.load(handle)["causal"]


def test_causal_bases_ship_for_the_documented_ranks():
    assert set(CAUSAL_SHIPPED) <= set(bases.causal_ranks(4))
    assert set(bases.causal_ranks(4)) == {int(r) for r in _causal_index()["bases"]}


@pytest.mark.parametrize("rank", CAUSAL_SHIPPED)
def test_shipped_causal_basis_is_causal_and_matches_its_recorded_alpha(rank):
    from safetensors import safe_open

    from stl_compiler.fit import basis_alpha
    from stl_compiler.fit.alpha import token_moments
    from stl_compiler.tiling import is_causal, row_separable

    basis = bases.causal(4, rank)
    assert (basis.tile, basis.rank) == (4, rank)
    assert is_causal(basis, tol=0.0)  # exact zeros, not small numbers
    index = _causal_index()
    entry = index["bases"][str(rank)]
    # alpha: class-0 (Gaussian tiles), recorded in the file and in the index
    assert basis.alpha == pytest.approx(basis_alpha(basis), rel=1e-9)
    assert entry["alpha"] == pytest.approx(basis.alpha, rel=1e-12)
    # no causal basis beats the row-separable one on Gaussian tiles: alpha >= (64 - r)/16
    assert basis.alpha >= (64 - rank) / 16 * (1 - 1e-9)
    # on the correlated tokens it was fitted to, it beats the row-separable basis
    path = os.path.join(os.path.dirname(bases.__file__), "data", entry["file"])
    with safe_open(path, framework="pt") as handle:
        meta = handle.metadata()
    rho = json.loads(meta["rho"])
    assert rho == index["rho"]
    tokens = token_moments(4, rho)
    alpha_tokens = basis_alpha(basis, tokens)
    assert alpha_tokens == pytest.approx(entry["alpha_tokens"], rel=1e-9)
    assert alpha_tokens == pytest.approx(json.loads(meta["alpha_tokens"]), rel=1e-9)
    assert alpha_tokens < 0.95 * basis_alpha(row_separable(4, rank), tokens)
    assert meta["command"] == entry["command"] and "--causal" in entry["command"]


def test_causal_missing_rank_raises_and_names_the_shipped_ranks():
    with pytest.raises(ValueError, match=r"no causal basis ships for tile=4, rank=7; shipped "
                                         r"causal ranks for tile 4: \[16, "):
        bases.causal(4, 7)


# --- bf16-conditioned fitted bases (fitted(..., conditioning="bf16")) -----------------------

BF16_SHIPPED = (16, 20, 24, 28, 32, 36, 39, 40, 41, 42, 44, 48)


def _bf16_index() -> dict:
    path = os.path.join(os.path.dirname(bases.__file__), "data", "fitted_bases.json")
    with open(path) as handle:
        return json.load(handle)["bf16"]


def test_a_bf16_basis_ships_beside_every_fitted_basis():
    assert bases.fitted_ranks(4, conditioning="bf16") == bases.fitted_ranks(4)
    assert set(BF16_SHIPPED) == set(bases.fitted_ranks(4, "bf16"))
    assert set(bases.fitted_ranks(4, "bf16")) == {int(r) for r in _bf16_index()["bases"]}


@pytest.mark.parametrize("rank", BF16_SHIPPED)
def test_shipped_bf16_basis_has_its_recorded_alpha_and_provenance(rank):
    from safetensors import safe_open

    from stl_compiler.fit import basis_alpha
    from stl_compiler.fit.conditioning import amplification, bf16_round

    basis = bases.fitted(4, rank, conditioning="bf16")
    assert (basis.tile, basis.rank, basis.name) == (4, rank, f"fitted4x{rank}-bf16")
    # alpha recomputed in float64 equals the recorded one (file and index)
    assert basis_alpha(basis) == pytest.approx(basis.alpha, rel=1e-6)
    entry = _bf16_index()["bases"][str(rank)]
    assert entry["alpha"] == pytest.approx(basis.alpha, rel=1e-12)
    # the runtime coefficients are bf16 numbers: casting them to bf16 adds no error
    assert all(torch.equal(bf16_round(m), m) for m in basis.matrices)
    # provenance in the file's metadata
    path = os.path.join(os.path.dirname(bases.__file__), "data", entry["file"])
    with safe_open(path, framework="pt") as handle:
        meta = handle.metadata()
    assert meta["conditioning"] == "bf16" and meta["tool"] == "tools/fit_bf16_bases.py"
    assert meta["command"].startswith(".venv/bin/python tools/fit_bf16_bases.py")
    assert meta["date"] and json.loads(meta["settings"])["target_ratio"] == 3.0
    assert meta["recipe"] == entry["recipe"]
    assert "fit_basis(4, " in meta["recipe"] or "dps48" in meta["recipe"]
    minimum = bases.fitted(4, rank)
    assert json.loads(meta["alpha_min_alpha"]) == pytest.approx(minimum.alpha, rel=1e-12)
    assert json.loads(meta["amplification"]) == pytest.approx(amplification(basis), rel=1e-9)
    # bf16 safety is paid in alpha: never below the minimum-alpha basis
    assert basis.alpha >= minimum.alpha * (1 - 1e-9)


def test_shipped_bf16_bases_drift_at_most_3x_dense_on_fresh_inputs():
    """One bf16 layer (CPU float64 emulation: x, W, coefficients, planes and output rounded)
    drifts from its float64 output at most 3x as much as a dense layer, with a margin; the
    minimum-alpha basis of the same rank does not (a few seconds for all ranks)."""
    from stl_compiler.fit.conditioning import bf16_drift, dense_bf16_drift

    x = torch.randn(1024, 256, dtype=torch.float64)  # fresh inputs, not the tool's problem
    w = torch.randn(256, 256, dtype=torch.float64) / 16
    dense = dense_bf16_drift(x, w)
    for rank in BF16_SHIPPED:
        ratio = bf16_drift(bases.fitted(4, rank, conditioning="bf16"), x, w) / dense
        assert ratio <= 3.0, (rank, ratio)
        assert ratio == pytest.approx(_bf16_index()["bases"][str(rank)]["drift_ratio"], rel=0.05)
        assert bf16_drift(bases.fitted(4, rank), x, w) / dense > 3.5, rank


def test_fitted_bf16_errors_and_resolve():
    with pytest.raises(ValueError, match=r"conditioning must be one of \(None, 'bf16'\)"):
        bases.fitted(4, 24, conditioning="fp8")
    with pytest.raises(ValueError, match=r"no bf16-conditioned fitted basis ships for tile=4, "
                                         r"rank=7; shipped ranks for tile 4: \[16, "):
        bases.fitted(4, 7, conditioning="bf16")
    with pytest.raises(ValueError, match="conditioning must be one of"):
        bases.fitted_ranks(4, "fp8")
    resolved = bases.resolve("fitted-bf16", 4, 24)
    assert all(torch.equal(a, b) for a, b in
               zip(resolved.matrices, bases.fitted(4, 24, conditioning="bf16").matrices))
