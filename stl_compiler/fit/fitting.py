"""Fitting STL bases to the tile product (paper §4.1 "class 0", appendix B.1).

The error α of a basis is a weighted distance between the matmul tensor ``T`` and the rank-r
tensor of the basis (see :mod:`.alpha`), so fitting is a rank-r tensor approximation:
alternating least squares (ALS) solves for ``ex``, ``ew`` and ``d`` in turn, each a linear
least-squares problem; ``method="sgd"`` is the paper's gradient descent, for comparison.

``support="causal"`` / ``"row_separable"`` fits under a zero pattern: each term ``p`` has a
pivot row and may read (``ex``) only tile rows at or before it and write (``d``) only rows at
or after it (causal), or read and write only that row (row-separable). Each ALS step is then
a least-squares problem over the allowed entries only, so the zeros are exact.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch

from .. import bases
from ..bases import STLBasis, tile_product_tensor
from ._progress import Progress
from .alpha import Samples, TileMoments, _resolve_data, whitening

__all__ = ["fit_basis", "balance", "pivot_masks", "basis_pivots", "als", "INITS", "METHODS",
           "SUPPORTS"]

INITS = ("strassen-pruned", "random", "deflate", "deflate-dps48")
METHODS = ("als", "sgd")
SUPPORTS = ("causal", "row_separable")
Mats = list[torch.Tensor]
Solver = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Solvers = tuple["Solver | None", "Solver | None", "Solver | None"]
_SPECS = ("abc,pb,pc->pa", "abc,pa,pc->pb", "abc,pa,pb->pc")


def _residual(target: torch.Tensor, mats: Mats) -> float:
    return float((target - torch.einsum("pa,pb,pc->abc", *mats)).square().sum())


def _mask_solver(mask: torch.Tensor, factor: torch.Tensor | None
                 ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The least squares of one ALS factor with the entries outside ``mask`` (bool
    ``(r, n)``) held at zero: ``solve(lhs, rhs)`` with ``lhs`` ``(r, r)`` and ``rhs``
    ``(r, n)`` the normal equations of the (whitened) factor ``Z``, solved column by column
    without a mask.

    ``factor=None``: the mask applies to ``Z`` itself; columns with the same pattern of
    allowed terms share one solve. Otherwise ``Z = E @ factor`` and the mask applies to
    ``E``: one Kronecker system over the allowed entries of ``E`` (used when the whitening
    would move entries across the mask)."""
    if factor is None:
        patterns, which = torch.unique(mask.T, dim=0, return_inverse=True)
        groups = [(keep, keep[:, None] & (which == i)[None], which == i)
                  for i, keep in enumerate(patterns) if bool(keep.any())]

        def solve(lhs: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
            out = torch.zeros_like(rhs)
            for keep, entries, cols in groups:
                out[entries] = torch.linalg.solve(lhs[keep][:, keep],
                                                  rhs[keep][:, cols]).reshape(-1)
            return out

        return solve
    # minimize tr(Fᵀ Eᵀ lhs E F) − 2 tr(Fᵀ Eᵀ rhs) over E on the mask, F = factor
    keep = mask.reshape(-1)
    metric = factor @ factor.T

    def solve_kron(lhs: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        flat = torch.zeros(keep.numel(), dtype=rhs.dtype)
        flat[keep] = torch.linalg.solve(torch.kron(lhs, metric)[keep][:, keep],
                                        (rhs @ factor.T).reshape(-1)[keep])
        return flat.reshape(rhs.shape) @ factor

    return solve_kron


def als(target: torch.Tensor, mats: Mats, steps: int, ridge: tuple[float, float],
        tick: Callable[[float], None] | None = None, solvers: Solvers = (None, None, None)
        ) -> tuple[Mats, float]:
    """``steps`` ALS sweeps from ``mats`` = ``[ex, ew, d]`` (each ``(r, t²)``, in the
    coordinates of ``target``, a ``(t², t², t²)`` tensor); returns the iterate with the best
    residual ``‖target − T_r‖²`` and that residual. The inputs are not changed.

    :func:`fit_basis` is the way to fit a basis; this step is public for searches that drive
    ALS themselves (tools/alpha_floor.py's beam search over deflation paths).

    Each sweep minimizes ``‖target − T_r‖² + λ Σ_p c_p²`` over one factor, where
    ``c_p = ‖ex[p]‖·‖ew[p]‖·‖d[p]‖``: for the factor being solved this is a ridge weighted by
    the diagonal of its Gram matrix. λ decays geometrically from ``ridge[0]`` to ``ridge[1]``.
    ``solvers[k]`` (or None: a plain solve): the least squares of factor k under a zero
    pattern (:func:`_mask_solver`); the entries outside it stay exactly 0. ``tick`` (if
    given) gets the best residual after each sweep.
    """
    mats = [m.clone() for m in mats]
    best, best_err = [m.clone() for m in mats], _residual(target, mats)
    for step in range(steps):
        lam = ridge[0] * (ridge[1] / ridge[0]) ** (step / max(steps - 1, 1))
        for k in range(3):
            a, b = (mats[j] for j in range(3) if j != k)
            gram = (a @ a.T) * (b @ b.T)
            rhs = torch.einsum(_SPECS[k], target, a, b)
            lhs = gram + torch.diag(lam * gram.diagonal() + 1e-12)
            solver = solvers[k]
            mats[k] = torch.linalg.solve(lhs, rhs) if solver is None else solver(lhs, rhs)
        err = _residual(target, mats)
        if err < best_err:
            best, best_err = [m.clone() for m in mats], err
        if tick is not None:
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
            trials.append(als(target, [m[keep] for m in mats], sweeps, ridge))
        mats = min(trials, key=lambda trial: trial[1])[0]
        tick(min(trial[1] for trial in trials))
    return mats


def pivot_masks(tile: int, pivots: object, support: str = "causal"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ex_mask, d_mask)``, bool ``(rank, t*t)``: the entries a term with pivot row
    ``pivots[p]`` may use under ``support``.

    ``"causal"``: ``ex[p]`` only on tile rows ``<= pivots[p]``, ``d[p]`` only on rows
    ``>= pivots[p]``; any basis inside these masks is causal
    (:func:`~stl_compiler.tiling.is_causal`: each term reads no row after the first row it
    writes). ``"row_separable"``: both only on row ``pivots[p]``
    (:func:`~stl_compiler.tiling.is_row_separable`).
    """
    if support not in SUPPORTS:
        raise ValueError(f"support must be one of {SUPPORTS}, got {support!r}")
    piv = torch.as_tensor(pivots, dtype=torch.long).reshape(-1)
    if piv.numel() and not bool(((piv >= 0) & (piv < tile)).all()):
        raise ValueError(f"pivots must be tile rows 0..{tile - 1}, got {piv.tolist()}")
    row = (torch.arange(tile * tile) // tile)[None]
    piv = piv[:, None]
    if support == "row_separable":
        return row == piv, row == piv
    return row <= piv, row >= piv


def basis_pivots(basis: STLBasis, support: str = "causal", tol: float = 1e-6
                 ) -> list[int] | None:
    """Each term's pivot row (the first tile row it writes; for a term that writes nothing,
    the last row it reads), or None when ``basis`` does not fit ``support`` with them
    (:func:`pivot_masks`). Entries below ``tol`` times the largest of their matrix count as
    zero, as in :func:`~stl_compiler.tiling.is_causal`."""
    from ..tiling import rows_touched

    t = basis.tile
    reads, writes = (rows_touched(m, t, tol) for m in (basis.ex, basis.d))
    row = torch.arange(t)
    first_write = torch.where(writes, row, t).amin(1)
    last_read = torch.where(reads, row, -1).amax(1)
    pivots = torch.where(writes.any(1), first_write, last_read.clamp_min(0))
    ex_mask, d_mask = pivot_masks(t, pivots, support)
    fits = [not bool((rows.repeat_interleave(t, dim=1) & ~mask).any())
            for rows, mask in ((reads, ex_mask), (writes, d_mask))]
    return pivots.tolist() if all(fits) else None


def _balanced_counts(tile: int, rank: int) -> list[int]:
    return [rank // tile + (a < rank % tile) for a in range(tile)]


def _pivots_of(counts: list[int]) -> list[int]:
    return [a for a, n in enumerate(counts) for _ in range(n)]


def _separable_start(tile: int, pivots: list[int], seed: int) -> STLBasis:
    """Row-separable start: the ``j``-th term of row ``a`` reads ``X[a, l]`` and writes
    ``Y[a, (l + j // t) mod t]`` (``l = j mod t``), the layout of
    :func:`~stl_compiler.tiling.row_separable`; a row with more than t² terms gets random
    extra terms on that row."""
    t, rank = tile, len(pivots)
    extra = bases.random(t, rank, seed)
    ex_mask, d_mask = pivot_masks(t, pivots, "row_separable")
    ex, ew, d = extra.ex * ex_mask, extra.ew.clone(), extra.d * d_mask
    seen = [0] * t
    for p, a in enumerate(pivots):
        j = seen[a]
        seen[a] += 1
        if j >= t * t:
            continue
        l, col = j % t, (j % t + j // t) % t
        for m in (ex, ew, d):
            m[p] = 0.0
        ex[p, a * t + l] = ew[p, l * t + col] = d[p, a * t + col] = 1.0
    return STLBasis(t, rank, ex, ew, d)


def _prefix_closed(mask: torch.Tensor) -> bool:
    """Whether each row of ``mask`` is True on a prefix of its entries only (a pattern that a
    lower-triangular whitening keeps)."""
    as_int = mask.to(torch.int8)
    return bool((as_int.cummin(dim=1).values == as_int).all())


def _fit_supported(target: torch.Tensor, lx: torch.Tensor, lw: torch.Tensor, tile: int,
                   pivots: list[int], support: str, starts: list[STLBasis], steps: int,
                   ridge: tuple[float, float], tick: Callable[[int, float], None]
                   ) -> tuple[Mats, float]:
    """ALS under the masks of ``pivots`` from each start; the best (whitened) iterate."""
    ex_mask, d_mask = pivot_masks(tile, pivots, support)
    # a causal mask is a prefix of the row-major vector, kept by the triangular whitening:
    # solve in whitened coordinates; otherwise mask the unwhitened ex (_mask_solver)
    whitened = lx.equal(torch.eye(lx.shape[0], dtype=lx.dtype)) or _prefix_closed(ex_mask)
    solvers = (_mask_solver(ex_mask, None if whitened else lx), None,
               _mask_solver(d_mask, None))
    best: tuple[Mats, float] = ([], math.inf)
    for run, start in enumerate(starts):
        mats = [(start.ex * ex_mask) @ lx, start.ew @ lw, start.d * d_mask]
        fitted = als(target, mats, steps, ridge, lambda err, run=run: tick(run, err),
                     solvers)
        if fitted[1] < best[1] or not best[0]:
            best = fitted
    return best


def _search_pivots(target: torch.Tensor, lx: torch.Tensor, lw: torch.Tensor, tile: int,
                   rank: int, seed: int, ridge: tuple[float, float], sweeps: int,
                   least: int, bar: Progress) -> list[int]:
    """Terms per pivot row for ``support="causal"``: a pattern search from the balanced
    split. It moves ``step`` terms from one row to another, keeping at least ``least`` per
    row, while a short fit (``sweeps`` ALS sweeps from the row-separable start and one random
    start) improves, halving ``step`` (from ``rank / (2 t)``) when no move does; ties keep
    the current split."""
    scores: dict[tuple[int, ...], float] = {}

    def score(counts: list[int]) -> float:
        key = tuple(counts)
        if key not in scores:
            piv = _pivots_of(counts)
            starts = [_separable_start(tile, piv, seed), bases.random(tile, rank, seed)]
            scores[key] = _fit_supported(target, lx, lw, tile, piv, "causal", starts, sweeps,
                                         ridge, lambda *_: None)[1]
            bar.update(1, alpha=min(scores.values()) / tile**2)
        return scores[key]

    counts = _balanced_counts(tile, rank)
    best = score(counts)
    step = max(1, rank // (2 * tile))
    while step >= 1:
        moves = [[n - step * (i == a) + step * (i == b) for i, n in enumerate(counts)]
                 for a in range(tile) for b in range(tile)
                 if a != b and counts[a] - step >= least]
        err, choice = min(((score(c), c) for c in moves), key=lambda trial: trial[0],
                          default=(math.inf, counts))
        if err < best * (1 - 1e-6):
            best, counts = err, choice
        else:
            step //= 2
    return _pivots_of(counts)


def _check_support(support: object, pivots: object, method: str, init: object, tile: int,
                   rank: int) -> list[int] | None:
    """Validate ``support`` / ``pivots``; the pivots of an explicit init basis or argument."""
    if support is None:
        if pivots is not None:
            raise ValueError("pivots needs support='causal' or 'row_separable'")
        return None
    if support not in SUPPORTS:
        raise ValueError(f"support must be None or one of {SUPPORTS}, got {support!r}")
    if method != "als":
        raise ValueError(f"support={support!r} is fitted by ALS only, got method={method!r}")
    if isinstance(init, str) and init not in ("strassen-pruned", "random"):
        raise ValueError(f"support={support!r} starts from the row-separable basis and random "
                         f"bases on the support; init={init!r} is not one of them (leave init "
                         f"at its default, or pass an STLBasis that fits the support)")
    given = None
    if pivots is not None:
        given = [int(p) for p in torch.as_tensor(pivots).reshape(-1).tolist()]
        if len(given) != rank:
            raise ValueError(f"pivots must give one tile row per term ({rank}), got "
                             f"{len(given)}")
        pivot_masks(tile, given, support)  # range check
    if isinstance(init, STLBasis):
        own = basis_pivots(init, support)
        if own is None:
            raise ValueError(f"init basis {init.name!r} does not fit support={support!r}: "
                             f"some term reads a row after the first row it writes"
                             if support == "causal" else
                             f"init basis {init.name!r} does not fit support={support!r}: "
                             f"some term reads or writes two tile rows")
        if given is not None and given != own:
            raise ValueError(f"pivots {given} differ from the init basis' own pivots {own}")
        given = own
    return given


def fit_basis(tile: int = 4, rank: int = 24, *, data: str | Samples | TileMoments = "gaussian",
              init: str | STLBasis = "strassen-pruned", method: str = "als", restarts: int = 4,
              steps: int = 500, seed: int = 0, ridge: float = 1e-5, lr: float = 0.02,
              support: str | None = None, pivots: object = None, search_sweeps: int = 100,
              min_row_terms: int | None = None, progress: bool = False) -> tuple[STLBasis, float]:
    """Fit a rank-``rank`` STL basis to the ``tile``×``tile`` matrix product.

    Args:
        tile, rank: tile side t and tensor rank r.
        data: ``"gaussian"`` (X, W with i.i.d. N(0, 1) entries: the objective is exactly
            ``‖T − T_r‖²/t²``), ``(x_tiles, w_tiles)``, samples of shape ``(N, t, t)`` or
            ``(N, t*t)`` (the objective is exact for X and W drawn independently from them),
            or :class:`~stl_compiler.fit.alpha.TileMoments` (exact for X, W with these
            second moments, e.g. :func:`~stl_compiler.fit.alpha.token_moments`).
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
        support: None (any basis), ``"causal"`` (every term ``p`` reads only tile rows at or
            before its pivot row and writes only rows at or after it: the result passes
            :func:`~stl_compiler.tiling.is_causal`, with exact zeros) or
            ``"row_separable"`` (each term reads and writes its pivot row only). ALS only;
            the first restart starts from the row-separable basis of the pivots, the others
            from random bases restricted to the support (``init`` left at its default or
            ``"random"``), or from ``init`` when it is an :class:`STLBasis` that fits the
            support (fitted once, with its own pivots). For Gaussian tiles no causal basis
            beats the row-separable one (docs/quality.md, "Causal bases"); fit causal bases
            to correlated tokens (``data=token_moments(tile, rho)``).
        pivots: with ``support``, the pivot row of each term (``rank`` ints in
            ``0..tile-1``). None: ``"row_separable"`` splits the terms evenly over the rows
            (earlier rows get the remainder); ``"causal"`` searches from that split, moving
            terms from one row to another while a short fit (``search_sweeps`` sweeps, two
            starts) improves (a pattern search: moves of rank/(2t) terms, halved when none
            improves, down to 1), then fits the best split with ``restarts`` and ``steps``.
        search_sweeps: ALS sweeps of each short fit of the causal pivot search.
        min_row_terms: the causal pivot search keeps at least this many terms per pivot row
            (None: ``rank // (2 * tile)``, half an even share). A row with no pivot terms has
            its output computed from earlier rows only: fits to strongly correlated tokens
            prefer that (e.g. 16, 0, 8, 0 terms per row at rank 24), but the token would
            then be invisible to its own layer, and calibration keeps the pivots.
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
    _check_count(search_sweeps, "search_sweeps", 1)
    least = rank // (2 * tile) if min_row_terms is None else _check_count(
        min_row_terms, "min_row_terms", 0)
    if least * tile > rank:
        raise ValueError(f"min_row_terms={least} needs rank >= {least * tile} (tile {tile}), "
                         f"got rank {rank}")
    if not ridge >= 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    if isinstance(init, STLBasis) and (init.tile, init.rank) != (tile, rank):
        raise ValueError(f"init basis has tile={init.tile}, rank={init.rank}; the fit asks "
                         f"for tile={tile}, rank={rank}")
    piv = _check_support(support, pivots, method, init, tile, rank)
    with _one_thread():
        return _fit(tile, rank, data, init, method, restarts, steps, seed, ridge, lr, support,
                    piv, (search_sweeps, least), progress)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread: the fit's matrices are tiny (at most a few hundred
    rows), and several threads on them only wait on each other; on a loaded machine that
    made a fit 30x slower (measured: 5 s on one thread, 160 s on two, 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fit(tile: int, rank: int, data: object, init: str | STLBasis, method: str,
         restarts: int, steps: int, seed: int, ridge: float, lr: float, support: str | None,
         piv: list[int] | None, search: tuple[int, int], progress: bool
         ) -> tuple[STLBasis, float]:
    """:func:`fit_basis` after its argument checks."""
    schedule = (max(ridge, 1e-2), max(ridge, 1e-15))
    lx, lw = whitening(_resolve_data(data, tile), tile)
    target = torch.einsum("abc,aA,bB->ABc", tile_product_tensor(tile), lx, lw)
    t2 = tile * tile
    if support is not None:
        best, name = _fit_with_support(target, lx, lw, tile, rank, support, piv, init,
                                       restarts, steps, seed, schedule, search,
                                       progress)
    else:
        best, name = _fit_free(target, lx, lw, tile, rank, init, method, restarts, steps,
                               seed, schedule, lr, progress), f"fitted{tile}x{rank}"
    ex = torch.linalg.solve_triangular(lx, best[0][0], upper=False, left=False)
    ew = torch.linalg.solve_triangular(lw, best[0][1], upper=False, left=False)
    d = best[0][2]
    if support is not None:  # exact zeros outside the support, whatever the rounding
        ex_mask, d_mask = pivot_masks(tile, best[1], support)
        ex, d = ex * ex_mask, d * d_mask
    raw = STLBasis(tile, rank, ex, ew, d, name=name)
    balanced = balance(raw)
    alpha = float(torch.einsum("abc,aA,bB->ABc", tile_product_tensor(tile) - balanced.tensor(),
                               lx, lw).square().sum()) / t2
    return STLBasis(tile, rank, *balanced.matrices, name=name, alpha=alpha), alpha


def _fit_with_support(target: torch.Tensor, lx: torch.Tensor, lw: torch.Tensor, tile: int,
                      rank: int, support: str, piv: list[int] | None, init: str | STLBasis,
                      restarts: int, steps: int, seed: int, schedule: tuple[float, float],
                      search: tuple[int, int], progress: bool
                      ) -> tuple[tuple[Mats, list[int]], str]:
    """``((whitened mats, pivots), name)`` of the best supported fit."""
    if piv is None and support == "causal":
        bar = Progress(4 * tile * (tile - 1), f"pivot search t={tile} r={rank}", progress)
        piv = _search_pivots(target, lx, lw, tile, rank, seed, schedule, *search, bar)
        bar.close()
    elif piv is None:
        piv = _pivots_of(_balanced_counts(tile, rank))
    if isinstance(init, STLBasis):
        starts = [init]
    else:
        starts = [_separable_start(tile, piv, seed)]
        starts += [bases.random(tile, rank, seed + run) for run in range(1, restarts)]
    bar = Progress(len(starts) * steps, f"fit-basis {support} t={tile} r={rank}", progress)
    t2 = tile * tile

    def tick(run: int, err: float) -> None:
        bar.update(1, restart=run + 1, alpha=err / t2)

    mats, _ = _fit_supported(target, lx, lw, tile, piv, support, starts, steps, schedule, tick)
    bar.close()
    label = "causal" if support == "causal" else "row-separable-fit"
    return (mats, piv), f"{label}{tile}x{rank}"


def _fit_free(target: torch.Tensor, lx: torch.Tensor, lw: torch.Tensor, tile: int, rank: int,
              init: str | STLBasis, method: str, restarts: int, steps: int, seed: int,
              schedule: tuple[float, float], lr: float, progress: bool) -> tuple[Mats, None]:
    """The unconstrained fit: ``(best whitened mats, None)``."""
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
            fitted = als(target, mats, steps, schedule, tick)
        else:
            fitted = _sgd(target, mats, steps, lr, tick)
        if fitted[1] < best[1] or not best[0]:
            best = fitted
    bar.close()
    return best[0], None
