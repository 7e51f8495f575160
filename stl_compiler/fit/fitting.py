"""Fitting STL bases to the tile product (paper §4.1 "class 0", appendix B.1).

The error α of a basis is a weighted distance between the matmul tensor ``T`` and the rank-r
tensor of the basis (see :mod:`.alpha`), so fitting is a rank-r tensor approximation:
alternating least squares (ALS) solves for ``ex``, ``ew`` and ``d`` in turn, each a linear
least-squares problem; ``method="sgd"`` is the paper's gradient descent, for comparison.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .. import bases
from ..bases import STLBasis, tile_product_tensor
from ._progress import Progress
from .alpha import Samples, _is_gaussian, tile_samples, whitening

__all__ = ["fit_basis", "balance", "INITS", "METHODS"]

INITS = ("strassen-pruned", "random", "deflate", "deflate-dps48")
METHODS = ("als", "sgd")
Mats = list[torch.Tensor]
_SPECS = ("abc,pb,pc->pa", "abc,pa,pc->pb", "abc,pa,pb->pc")


def _residual(target: torch.Tensor, mats: Mats) -> float:
    return float((target - torch.einsum("pa,pb,pc->abc", *mats)).square().sum())


def _als(target: torch.Tensor, mats: Mats, steps: int, ridge: tuple[float, float],
         tick: Callable[[float], None]) -> tuple[Mats, float]:
    """``steps`` ALS sweeps; returns the iterate with the best residual.

    Each sweep minimizes ``‖target − T_r‖² + λ Σ_p c_p²`` over one factor, where
    ``c_p = ‖ex[p]‖·‖ew[p]‖·‖d[p]‖``: for the factor being solved this is a ridge weighted by
    the diagonal of its Gram matrix. λ decays geometrically from ``ridge[0]`` to ``ridge[1]``.
    """
    mats = [m.clone() for m in mats]
    best, best_err = [m.clone() for m in mats], _residual(target, mats)
    for step in range(steps):
        lam = ridge[0] * (ridge[1] / ridge[0]) ** (step / max(steps - 1, 1))
        for k in range(3):
            a, b = (mats[j] for j in range(3) if j != k)
            gram = (a @ a.T) * (b @ b.T)
            rhs = torch.einsum(_SPECS[k], target, a, b)
            mats[k] = torch.linalg.solve(gram + torch.diag(lam * gram.diagonal() + 1e-12), rhs)
        err = _residual(target, mats)
        if err < best_err:
            best, best_err = [m.clone() for m in mats], err
        tick(best_err)
    return best, best_err


def _sgd(target: torch.Tensor, mats: Mats, steps: int, lr: float,
         tick: Callable[[float], None]) -> tuple[Mats, float]:
    """Adam on ``‖target − T_r‖²`` (the exact expected loss), cosine-decayed learning rate."""
    params = [m.clone().requires_grad_(True) for m in mats]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1), eta_min=lr / 100)
    best, best_err = [m.clone() for m in mats], _residual(target, mats)
    for _ in range(steps):
        loss = (target - torch.einsum("pa,pb,pc->abc", *params)).square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        err = _residual(target, [p.detach() for p in params])
        if err < best_err:
            best, best_err = [p.detach().clone() for p in params], err
        tick(best_err)
    return best, best_err


def balance(basis: STLBasis) -> STLBasis:
    """Rescale each row triple ``(ex[p], ew[p], d[p])`` to equal norms.

    The tensor (hence α) is unchanged: ``ex[p]⊗ew[p]⊗d[p]`` is invariant under scalings whose
    product is 1. Equal norms keep encoded values near the scale of the inputs, which suits
    low-precision kernels.
    """
    norms = torch.stack([m.norm(dim=1) for m in basis.matrices])  # (3, r)
    alive = (norms > 0).all(dim=0)
    target = norms.prod(dim=0).clamp_min(0).pow(1 / 3)
    scale = torch.where(alive, target / norms.clamp_min(1e-300), torch.ones_like(norms))
    ex, ew, d = (m * s[:, None] for m, s in zip(basis.matrices, scale))
    return STLBasis(basis.tile, basis.rank, ex, ew, d, name=basis.name, alpha=basis.alpha)


def _check_count(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _exact_start(init: str, tile: int) -> STLBasis:
    """The exact basis a deflation starts from: Strassen's, or the rank-48 ``bases.dps48``."""
    if init == "deflate":
        return bases.strassen(tile)
    if tile != 4:
        raise ValueError(f"init={init!r} deflates the rank-48 scheme for 4x4 tiles, the fit asks "
                         f"for tile {tile}; use init='deflate' (from Strassen)")
    return bases.dps48()


def _initial(init: str | STLBasis, tile: int, rank: int, seed: int) -> STLBasis:
    if isinstance(init, STLBasis):
        if (init.tile, init.rank) != (tile, rank):
            raise ValueError(f"init basis has tile={init.tile}, rank={init.rank}; the fit asks "
                             f"for tile={tile}, rank={rank}")
        return init
    if init == "random":
        return bases.random(tile, rank, seed)
    exact = bases.strassen(tile)
    if rank > exact.rank:
        raise ValueError(f"init={init!r} prunes Strassen's rank-{exact.rank} basis and cannot "
                         f"give rank {rank}; use init='random'")
    return bases.pruned(exact, rank, seed)


def _deflate(target: torch.Tensor, mats: Mats, rank: int, sweeps: int,
             ridge: tuple[float, float], tick: Callable[[float], None]) -> Mats:
    """Drop one row at a time, greedily (the row whose removal refits best), down to ``rank``."""
    while mats[0].shape[0] > rank:
        r = mats[0].shape[0]
        trials = []
        for p in range(r):
            keep = [i for i in range(r) if i != p]
            trials.append(_als(target, [m[keep] for m in mats], sweeps, ridge,
                               lambda _: None))
        mats = min(trials, key=lambda trial: trial[1])[0]
        tick(min(trial[1] for trial in trials))
    return mats


def fit_basis(tile: int = 4, rank: int = 24, *, data: str | Samples = "gaussian",
              init: str | STLBasis = "strassen-pruned", method: str = "als", restarts: int = 4,
              steps: int = 500, seed: int = 0, ridge: float = 1e-5, lr: float = 0.02,
              progress: bool = False) -> tuple[STLBasis, float]:
    """Fit a rank-``rank`` STL basis to the ``tile``×``tile`` matrix product.

    Args:
        tile, rank: tile side t and tensor rank r.
        data: ``"gaussian"`` (X, W with i.i.d. N(0, 1) entries: the objective is exactly
            ``‖T − T_r‖²/t²``) or ``(x_tiles, w_tiles)``, samples of shape ``(N, t, t)`` or
            ``(N, t*t)`` (the objective is exact for X and W drawn independently from them).
        init: ``"strassen-pruned"`` (a random subset of Strassen's rows, paper B.1),
            ``"random"`` (Gaussian), ``"deflate"`` (from Strassen's exact basis, drop the row
            whose removal refits best, one at a time; deterministic), ``"deflate-dps48"``
            (the same from the exact rank-48 scheme :func:`bases.dps48`, tile 4 only), or an
            :class:`STLBasis`.
        method: ``"als"`` (alternating least squares with a decaying ridge) or ``"sgd"``
            (Adam on the exact loss, learning rate ``lr``, as in the paper).
        restarts: independent fits (init seeds ``seed``, ``seed+1``, ...); the best is kept.
            Deflation and an explicit basis are deterministic and fit once.
        steps: ALS sweeps or SGD steps per restart.
        seed: seed of the first restart.
        ridge: ALS penalty ``ridge · Σ_p c_p²`` with ``c_p = ‖ex[p]‖‖ew[p]‖‖d[p]‖`` (the
            rounding-error amplification of row p). Unpenalized fits drift to huge cancelling
            rows that are useless in bf16; 1e-5 costs ~1-2% of α and keeps them
            sane. The sweeps start at ``max(ridge, 1e-2)`` and decay to ``ridge``.
        lr: learning rate of ``method="sgd"``.
        progress: show a progress bar on stderr.

    Returns:
        ``(basis, alpha)``: the best basis, rows balanced (:func:`balance`), with
        ``basis.alpha = alpha``, the mean squared error per output entry on ``data``.
    """
    bases._check_tile_rank(tile, rank)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(init, STLBasis) and init not in INITS:
        raise ValueError(f"init must be one of {INITS} or an STLBasis, got {init!r}")
    _check_count(restarts, "restarts", 1)
    _check_count(steps, "steps", 0)
    _check_count(seed, "seed", 0)
    if not ridge >= 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    schedule = (max(ridge, 1e-2), max(ridge, 1e-15))
    samples = None if _is_gaussian(data) else tile_samples(data, tile)
    lx, lw = whitening(samples, tile)
    target = torch.einsum("abc,aA,bB->ABc", tile_product_tensor(tile), lx, lw)

    deflate = isinstance(init, str) and init.startswith("deflate")
    exact = _exact_start(init, tile) if deflate else None
    runs = 1 if deflate or isinstance(init, STLBasis) else restarts
    exact_rank = exact.rank if exact is not None else rank
    if rank > exact_rank:
        raise ValueError(f"init={init!r} starts from the exact rank-{exact_rank} basis "
                         f"{exact.name!r} and cannot give rank {rank}; use init='random'")
    bar = Progress(runs * steps + (exact_rank - rank), f"fit-basis t={tile} r={rank}", progress)
    t2 = tile * tile
    best: tuple[Mats, float] = ([], math.inf)
    for run in range(runs):
        start = exact if exact is not None else _initial(init, tile, rank, seed + run)
        mats = [start.ex @ lx, start.ew @ lw, start.d.clone()]

        def tick(err: float, run: int = run, prior: float = best[1]) -> None:
            bar.update(1, restart=run + 1, alpha=min(err, prior) / t2)

        if deflate:
            mats = _deflate(target, mats, rank, 30, schedule, tick)
        if method == "als":
            fitted = _als(target, mats, steps, schedule, tick)
        else:
            fitted = _sgd(target, mats, steps, lr, tick)
        if fitted[1] < best[1] or not best[0]:
            best = fitted
    bar.close()
    ex = torch.linalg.solve_triangular(lx, best[0][0], upper=False, left=False)
    ew = torch.linalg.solve_triangular(lw, best[0][1], upper=False, left=False)
    name = f"fitted{tile}x{rank}"
    raw = STLBasis(tile, rank, ex, ew, best[0][2], name=name)
    balanced = balance(raw)
    alpha = float(torch.einsum("abc,aA,bB->ABc", tile_product_tensor(tile) - balanced.tensor(),
                               lx, lw).square().sum()) / t2
    return STLBasis(tile, rank, *balanced.matrices, name=name, alpha=alpha), alpha
