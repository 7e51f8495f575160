"""Error measures of the class-0 experiment (paper §4.1, appendix B.1).

α is the mean squared error per output entry of one t×t tile product ``X @ W``. For X, W
with i.i.d. standard Gaussian entries, the error of a basis is exactly
``α = ‖T − T_r‖²_F / t²``, with ``T`` the matmul tensor (:func:`bases.tile_product_tensor`)
and ``T_r`` the tensor of the basis; for X, W drawn independently from samples with second
moments ``Cx = Lx Lxᵀ`` and ``Cw = Lw Lwᵀ`` it is ``‖(T − T_r) ×₁ Lxᵀ ×₂ Lwᵀ‖²_F / t²``.
"""

from __future__ import annotations

import math

import torch

from ..bases import STLBasis, tile_product_tensor

__all__ = ["basis_alpha", "two_four_alpha", "tile_samples", "whitening"]

Samples = tuple[torch.Tensor, torch.Tensor]


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


def whitening(samples: Samples | None, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(Lx, Lw)`` with ``Lx Lxᵀ`` the second moment of the X tiles (identity for
    Gaussian data, ``samples=None``); a tiny jitter keeps a rank-deficient moment invertible."""
    eye = torch.eye(tile * tile, dtype=torch.float64)
    if samples is None:
        return eye, eye
    factors = []
    for s in samples:
        moment = s.T @ s / s.shape[0]
        jitter = 1e-9 * float(moment.diagonal().mean().clamp_min(1e-30))
        factors.append(torch.linalg.cholesky(moment + jitter * eye))
    return factors[0], factors[1]


def basis_alpha(basis: STLBasis, data: str | Samples = "gaussian") -> float:
    """α of ``basis``: mean squared error per output entry of a tile product.

    ``data="gaussian"``: X, W with i.i.d. N(0, 1) entries (exact, ``‖T − T_r‖²/t²``).
    ``data=(x_tiles, w_tiles)``: X and W drawn independently from these samples (exact for
    their empirical distributions).
    """
    if not isinstance(basis, STLBasis):
        raise TypeError(f"basis must be an STLBasis, got {type(basis).__name__}")
    t = basis.tile
    samples = None if _is_gaussian(data) else tile_samples(data, t)
    lx, lw = whitening(samples, t)
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
