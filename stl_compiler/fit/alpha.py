"""Error measures of the class-0 experiment (paper §4.1, appendix B.1).

α is the mean squared error per output entry of one t×t tile product ``X @ W``. For X, W
with i.i.d. standard Gaussian entries, the error of a basis is exactly
``α = ‖T − T_r‖²_F / t²``, with ``T`` the matmul tensor (:func:`bases.tile_product_tensor`)
and ``T_r`` the tensor of the basis; for X, W drawn independently from samples with second
moments ``Cx = Lx Lxᵀ`` and ``Cw = Lw Lwᵀ`` it is ``‖(T − T_r) ×₁ Lxᵀ ×₂ Lwᵀ‖²_F / t²``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from ..bases import STLBasis, tile_product_tensor

__all__ = ["basis_alpha", "two_four_alpha", "tile_samples", "whitening", "TileMoments",
           "token_moments"]

Samples = tuple[torch.Tensor, torch.Tensor]


class TileMoments(NamedTuple):
    """Second moments of the tile distribution, each ``(t*t, t*t)``: ``x = E[vec(X) vec(X)ᵀ]``
    and ``w = E[vec(W) vec(W)ᵀ]`` (row-major tile vectors). As ``data`` of :func:`basis_alpha`
    and :func:`~stl_compiler.fit.fit_basis` it makes α exact for X and W drawn independently
    with these moments (α depends on nothing else)."""

    x: torch.Tensor
    w: torch.Tensor


def token_moments(tile: int, rho: float | Sequence[float]) -> TileMoments:
    """Moments of tiles whose rows are ``tile`` consecutive tokens of a sequence: every entry
    has unit variance, features are independent, and rows ``a``, ``b`` of a feature are
    correlated ``c[|a − b|]``; W is i.i.d. N(0, 1).

    ``rho``: a number, the lag-1 correlation of a stationary AR(1) sequence
    (``c[k] = rho ** k``), or the ``tile − 1`` correlations at lags 1, 2, ... (e.g. measured
    on a model's activations: ``E[x_i · x_{i+k}] / E[|x|²]``); they must make a positive
    definite correlation matrix. ``rho = 0`` is the Gaussian class-0 model. Causal token
    bases (``bases.causal``) are fitted to this model: for Gaussian tiles no causal basis
    beats the row-separable one (docs/quality.md, "Causal bases"), the gain comes from the
    correlation of neighbouring tokens.
    """
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 2:
        raise ValueError(f"tile must be an int >= 2, got {tile!r}")
    if isinstance(rho, (int, float)) and not isinstance(rho, bool):
        if not -1 < rho < 1:
            raise ValueError(f"rho must be in (-1, 1), got {rho!r}")
        lags = [float(rho) ** k for k in range(tile)]
    elif isinstance(rho, Sequence) and len(rho) == tile - 1 and all(
            isinstance(c, (int, float)) and not isinstance(c, bool) for c in rho):
        lags = [1.0, *map(float, rho)]
    else:
        raise ValueError(f"rho must be a number or {tile - 1} lag correlations, got {rho!r}")
    lag = (torch.arange(tile)[:, None] - torch.arange(tile)[None]).abs()
    rows = torch.tensor(lags, dtype=torch.float64)[lag]
    if float(torch.linalg.eigvalsh(rows)[0]) <= 0:
        raise ValueError(f"the lag correlations {lags[1:]} do not make a positive definite "
                         f"correlation matrix")
    eye = torch.eye(tile, dtype=torch.float64)
    return TileMoments(torch.kron(rows, eye), torch.eye(tile * tile, dtype=torch.float64))


def tile_samples(data: object, tile: int) -> Samples:
    """Validate ``data = (x_tiles, w_tiles)``: each ``(N, t, t)`` or ``(N, t*t)``.

    Returns both as float64 ``(N, t*t)`` row-major tile vectors.
    """
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise TypeError("data must be 'gaussian' or a pair (x_tiles, w_tiles) of tensors, got "
                        f"{type(data).__name__}")
    out = []
    for name, value in zip(("x_tiles", "w_tiles"), data):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor, got "
                            f"{getattr(value, 'dtype', type(value).__name__)}")
        if value.dim() == 3 and tuple(value.shape[1:]) == (tile, tile):
            value = value.reshape(value.shape[0], tile * tile)
        if value.dim() != 2 or value.shape[1] != tile * tile or value.shape[0] < 1:
            raise ValueError(f"{name} must have shape (N, {tile}, {tile}) or (N, {tile * tile}) "
                             f"with N >= 1, got {tuple(value.shape)}")
        out.append(value.detach().to("cpu", torch.float64))
    return out[0], out[1]


def _tile_moments(data: TileMoments, tile: int) -> TileMoments:
    """Validate ``data``: two symmetric positive semi-definite ``(t*t, t*t)`` matrices."""
    out = []
    for name, value in zip(("x", "w"), data):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise TypeError(f"TileMoments.{name} must be a floating-point torch.Tensor")
        value = value.detach().to("cpu", torch.float64)
        if tuple(value.shape) != (tile * tile, tile * tile):
            raise ValueError(f"TileMoments.{name} must have shape ({tile * tile}, "
                             f"{tile * tile}), got {tuple(value.shape)}")
        if not torch.allclose(value, value.T, rtol=1e-10, atol=1e-12):
            raise ValueError(f"TileMoments.{name} must be symmetric (a second moment)")
        out.append(value)
    return TileMoments(*out)


def _resolve_data(data: object, tile: int) -> Samples | TileMoments | None:
    """None (Gaussian), validated samples, or validated moments."""
    if _is_gaussian(data):
        return None
    if isinstance(data, TileMoments):
        return _tile_moments(data, tile)
    return tile_samples(data, tile)


def whitening(samples: Samples | TileMoments | None, tile: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(Lx, Lw)`` (lower triangular) with ``Lx Lxᵀ`` the second moment of the X
    tiles (identity for Gaussian data, ``samples=None``; the given matrices for
    :class:`TileMoments`); a tiny jitter keeps a rank-deficient moment invertible."""
    eye = torch.eye(tile * tile, dtype=torch.float64)
    if samples is None:
        return eye, eye
    factors = []
    for s in samples:
        moment = s if isinstance(samples, TileMoments) else s.T @ s / s.shape[0]
        jitter = 1e-9 * float(moment.diagonal().mean().clamp_min(1e-30))
        factors.append(torch.linalg.cholesky(moment + jitter * eye))
    return factors[0], factors[1]


def basis_alpha(basis: STLBasis, data: str | Samples | TileMoments = "gaussian") -> float:
    """α of ``basis``: mean squared error per output entry of a tile product.

    ``data="gaussian"``: X, W with i.i.d. N(0, 1) entries (exact, ``‖T − T_r‖²/t²``).
    ``data=(x_tiles, w_tiles)``: X and W drawn independently from these samples (exact for
    their empirical distributions). ``data=TileMoments(...)`` (e.g. :func:`token_moments`):
    X and W independent with these second moments (exact).
    """
    if not isinstance(basis, STLBasis):
        raise TypeError(f"basis must be an STLBasis, got {type(basis).__name__}")
    t = basis.tile
    lx, lw = whitening(_resolve_data(data, t), t)
    error = torch.einsum("abc,aA,bB->ABc", tile_product_tensor(t) - basis.tensor(), lx, lw)
    return float(error.square().sum()) / t**2


def _is_gaussian(data: object) -> bool:
    if isinstance(data, str):
        if data != "gaussian":
            raise ValueError(f"data must be 'gaussian' or a pair (x_tiles, w_tiles), got {data!r}")
        return True
    return False


def two_four_alpha(tile: int = 4) -> float:
    """α of magnitude 2:4 pruning of W for Gaussian tiles (paper appendix B.1, ≈ 0.53).

    W keeps the 2 largest-magnitude entries of every group of 4 along each column (the
    reduction dim). For X with identity covariance the best re-fitted W̃ is W itself on the
    mask, so the error ``X (W − W⊙M)`` has per-entry variance ``(t/4)·E[s]`` where ``s`` is the
    sum of the two smallest squares of 4 i.i.d. N(0, 1) draws; ``E[s]`` is computed by
    quadrature over the half-normal order statistics (exact to ~1e-9).
    """
    if isinstance(tile, bool) or not isinstance(tile, int):
        raise TypeError(f"tile must be an int, got {type(tile).__name__}")
    if tile < 4 or tile % 4:
        raise ValueError(f"2:4 pruning needs a tile that is a multiple of 4, got {tile}")
    y = torch.linspace(0.0, 14.0, 400_001, dtype=torch.float64)
    density = 2.0 * torch.exp(-0.5 * y * y) / math.sqrt(2.0 * math.pi)  # half-normal |z|
    cdf = torch.erf(y / math.sqrt(2.0))
    n = 4
    expected = 0.0
    for k in (1, 2):  # the two smallest of four order statistics
        coeff = math.factorial(n) / (math.factorial(k - 1) * math.factorial(n - k))
        order_density = coeff * cdf ** (k - 1) * (1.0 - cdf) ** (n - k) * density
        expected += float(torch.trapezoid(y * y * order_density, y))
    return tile / 4 * expected
