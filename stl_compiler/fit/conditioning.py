"""bf16 conditioning of a basis: how much rounding to bf16 changes one STL layer.

α (:func:`~stl_compiler.fit.basis_alpha`) is measured in float64. In bf16 an inexact basis
adds a second error: its product terms cancel (``‖ex[p]‖·‖ew[p]‖·‖d[p]‖`` far above the
size of the result), so a rounding error of the encoded planes is amplified by the basis.
Two measures (docs/quality.md, "bf16 conditioning"; ``tools/bf16_tradeoff.py``,
``tools/fit_bf16_bases.py``):

- :func:`amplification`: ``sqrt(Σ_p c_p² / ‖T_r‖²)`` with ``c_p = ‖ex[p]‖‖ew[p]‖‖d[p]‖``,
  the predicted amplification of a relative rounding error at one point (1 for the naive and
  the row-separable bases); it predicts the drift ratio at one rounding point to ~1%.
- :func:`bf16_drift` / :func:`bf16_drift_ratio`: one layer in float64 emulation with every
  bf16 rounding a bf16 STL layer does (x, W, the runtime coefficients ex and d, the encoded
  planes Xh = ex·X and Wh = ew·W, the product planes Yh = Xh·Wh and the output; the weight is
  encoded offline in float64 with the exact ``ew`` and then rounded, as ``STLLinear`` does;
  float64 accumulation), relative to the same STL layer in float64; the ratio divides it by
  the drift of a dense layer (x, W and the output rounded). It matches torch CPU bf16
  ``STLLinear`` within 1% (``tools/bf16_tradeoff.py``). Issue 15's target is ratio ≤ 3.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..bases import STLBasis

__all__ = ["bf16_round", "term_norms", "amplification", "tile_vectors", "relative_error",
           "gaussian_layer", "stl_layer", "dense_bf16_drift", "bf16_drift", "bf16_drift_ratio",
           "DriftRatio"]


def bf16_round(a: torch.Tensor) -> torch.Tensor:
    """Round to bfloat16 and back to float64."""
    return a.to(torch.bfloat16).to(torch.float64)


def term_norms(basis: STLBasis) -> torch.Tensor:
    """``c_p = ‖ex[p]‖·‖ew[p]‖·‖d[p]‖``, shape (rank,)."""
    return torch.stack([m.norm(dim=1) for m in basis.matrices]).prod(dim=0)


def amplification(basis: STLBasis) -> float:
    """Predicted amplification ``sqrt(Σ_p c_p² / ‖T_r‖²)`` of a relative rounding error at
    one point (Xh, Wh or Yh) over the same error in a dense layer; ``T_r`` is the basis's
    tensor (its norm sets the norm of the STL output). 1 for naive and row-separable bases."""
    return float(term_norms(basis).square().sum() / basis.tensor().square().sum()) ** 0.5


def tile_vectors(a: torch.Tensor, t: int) -> torch.Tensor:
    """(R, C) -> (R/t, C/t, t*t), row-major tile vectors."""
    rows, cols = a.shape
    return a.reshape(rows // t, t, cols // t, t).permute(0, 2, 1, 3).reshape(
        rows // t, cols // t, t * t)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖ / ‖b‖`` in float64."""
    return float((a.double() - b.double()).norm() / b.double().norm())


def gaussian_layer(n: int = 4096, k: int = 512, m: int | None = None, seed: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, w)``, float64: x (n, k) standard Gaussian, w (k, m) Gaussian with std 1/√k."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=gen, dtype=torch.float64)
    w = torch.randn(k, k if m is None else m, generator=gen, dtype=torch.float64) / math.sqrt(k)
    return x, w


def stl_layer(basis: STLBasis, x: torch.Tensor, w: torch.Tensor, bf16: bool = False,
              fp32_coefficients: bool = False) -> torch.Tensor:
    """The STL product of ``x`` (n, k) and ``w`` (k, m) in float64, output tiles
    ``(n/t, m/t, t*t)``; every dimension must be a multiple of the tile.

    ``bf16``: round to bf16 like a bf16 STL layer: x, W, ex and d (the runtime
    coefficients), the encoded planes Xh and Wh (W encoded offline in float64 with the exact
    ``ew``, then rounded), the product planes Yh and the output; float64 accumulation.
    ``fp32_coefficients``: with ``bf16``, keep ex and d unrounded (a kernel that holds its
    r×t² coefficients in float32).
    """
    t = basis.tile
    ex, ew, d = basis.matrices
    rnd = bf16_round if bf16 else (lambda a: a)
    cx, cd = (ex, d) if fp32_coefficients or not bf16 else (rnd(ex), rnd(d))
    xh = rnd(torch.einsum("ikq,pq->pik", tile_vectors(rnd(x), t), cx))
    wh = rnd(torch.einsum("kjq,pq->pkj", tile_vectors(rnd(w), t), ew))
    return rnd(torch.einsum("pij,pq->ijq", rnd(torch.bmm(xh, wh)), cd))


def dense_bf16_drift(x: torch.Tensor, w: torch.Tensor) -> float:
    """Relative change of a dense layer ``x @ w`` when x, w and the output are rounded to
    bf16 (float64 accumulation)."""
    return relative_error(bf16_round(bf16_round(x) @ bf16_round(w)), x @ w)


def bf16_drift(basis: STLBasis, x: torch.Tensor, w: torch.Tensor,
               fp32_coefficients: bool = False) -> float:
    """Relative change of the STL layer when run in bf16 (:func:`stl_layer` with
    ``bf16=True`` vs float64): the "all" emulation of ``tools/bf16_tradeoff.py``."""
    return relative_error(stl_layer(basis, x, w, bf16=True, fp32_coefficients=fp32_coefficients),
                          stl_layer(basis, x, w))


class DriftRatio(NamedTuple):
    """:func:`bf16_drift_ratio`'s result: the STL drift, the dense drift, their ratio."""

    drift: float
    dense: float
    ratio: float


def bf16_drift_ratio(basis: STLBasis, n: int = 4096, k: int = 512, seed: int = 0,
                     fp32_coefficients: bool = False) -> DriftRatio:
    """bf16 drift of one STL layer over the dense layer's on the same Gaussian problem
    (:func:`gaussian_layer` ``(n, k, k, seed)``; the defaults are those of
    ``tools/bf16_tradeoff.py`` and ``tools/fit_bf16_bases.py``). About 0.5 s on one CPU
    thread at rank 24 with the defaults; the ratio hardly depends on the size (it is set by
    :func:`amplification`), so ``n=1024, k=256`` is a cheap check."""
    x, w = gaussian_layer(n, k, k, seed)
    drift, dense = bf16_drift(basis, x, w, fp32_coefficients), dense_bf16_drift(x, w)
    return DriftRatio(drift, dense, drift / dense)
