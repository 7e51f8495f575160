"""Tiles, padding and row grouping, in plain aten ops (traceable, exportable); which bases
keep the rows of a tile isolated (:func:`is_row_separable`, :func:`row_separable`) or causal
(:func:`is_causal`)."""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F

from .bases import STLBasis, _check_tile_rank

ROW_GROUPINGS = ("tokens", "causal", "batch")
# Groupings whose tile rows are consecutive positions of one sequence (dim -2 of the input).
TOKEN_GROUPINGS = ("tokens", "causal")


class _HasBasisRows(Protocol):
    tile: int
    ex: torch.Tensor
    d: torch.Tensor


def round_up(value: int, multiple: int) -> int:
    # Non-negative operands only: exported graphs lower floordiv to ONNX Div, which truncates.
    return (value + multiple - 1) // multiple * multiple


def to_tiles(x: torch.Tensor, tile: int) -> torch.Tensor:
    """``(*b, n, k)`` → ``(*b, n/t, k/t, t*t)``, each tile vectorized row-major."""
    *batch, n, k = x.shape
    t = tile
    tiles = x.reshape(*batch, n // t, t, k // t, t).transpose(-3, -2)
    return tiles.reshape(*batch, n // t, k // t, t * t)


def from_tiles(tiles: torch.Tensor, tile: int) -> torch.Tensor:
    """Inverse of :func:`to_tiles`: ``(*b, a, c, t*t)`` → ``(*b, a*t, c*t)``."""
    *batch, a, c, _ = tiles.shape
    t = tile
    x = tiles.reshape(*batch, a, c, t, t).transpose(-3, -2)
    return x.reshape(*batch, a * t, c * t)


def pad_last2(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad the last two dims of ``x`` up to ``(rows, cols)``; a no-op when already there."""
    pad_rows, pad_cols = rows - x.shape[-2], cols - x.shape[-1]
    # Symbolic sizes (torch.export with dynamic dims) must not be branched on: pad always.
    if type(pad_rows) is int and type(pad_cols) is int and pad_rows == 0 and pad_cols == 0:
        return x
    return F.pad(x, (0, pad_cols, 0, pad_rows))


def check_row_grouping(row_grouping: str) -> None:
    if row_grouping not in ROW_GROUPINGS:
        raise ValueError(f"row_grouping must be one of {ROW_GROUPINGS}, got {row_grouping!r}")


def group_rows(x: torch.Tensor, row_grouping: str) -> torch.Tensor:
    """Arrange an activation ``(*B, S, K)`` so the rows of a tile are dim -2 of the result.

    ``"tokens"`` and ``"causal"``: rows are consecutive positions of one sequence,
    ``(*B, S, K)`` unchanged. ``"batch"``: rows are the same position across sequences:
    ``(S, N, K)`` with ``N = prod(B)``. A 2-D input ``(N, K)`` is N sequences of length 1 in
    that case.
    """
    if row_grouping in TOKEN_GROUPINGS:
        return x
    if x.dim() == 2:
        return x.unsqueeze(0)
    return x.reshape(-1, x.shape[-2], x.shape[-1]).transpose(0, 1)


def ungroup_rows(y: torch.Tensor, like: torch.Tensor, row_grouping: str) -> torch.Tensor:
    """Inverse of :func:`group_rows` for an output whose last dim may differ from ``like``'s."""
    if row_grouping in TOKEN_GROUPINGS:
        return y
    if like.dim() == 2:
        return y.squeeze(0)
    return y.transpose(0, 1).reshape(*like.shape[:-1], y.shape[-1])


def padded_rows(shape: tuple[int, ...], tile: int, row_grouping: str) -> int:
    """Rows an STL linear layer computes for an input of ``shape`` (…, K), padding included."""
    leading = shape[:-1] or (1,)
    if row_grouping in TOKEN_GROUPINGS or len(leading) == 1:
        *batch, seq = leading
        return round_up(seq, tile) * math.prod(batch)
    *batch, seq = leading
    return round_up(math.prod(batch), tile) * seq


def is_row_separable(basis: _HasBasisRows, tol: float = 1e-6) -> bool:
    """Whether no product term of ``basis`` reads or writes two rows of a tile.

    ``basis`` is anything with ``tile``, ``ex`` and ``d`` (an :class:`STLBasis`, an
    ``STLLinear``, an ``STLMatmul``). Term p reads the rows where ``ex[p]`` is nonzero and
    writes the rows where ``d[p]`` is nonzero; entries below ``tol`` times the largest entry of
    their matrix count as zero. With such a basis an output row depends on its own input row
    only, so ``row_grouping="batch"`` keeps batched sequences independent.
    """
    t = basis.tile
    reads, writes = (rows_touched(m.detach(), t, tol) for m in (basis.ex, basis.d))
    active = reads.any(1) & writes.any(1)  # a term with zero ex or zero d contributes nothing
    return bool(((reads | writes).sum(1)[active] <= 1).all())


def is_causal(basis: _HasBasisRows, tol: float = 1e-6) -> bool:
    """Whether every product term of ``basis`` reads only tile rows at or before the first
    row it writes (rows as in :func:`is_row_separable`, same ``tol``).

    With such a basis and ``row_grouping="causal"`` (tile rows = t consecutive positions of
    one sequence), output row ``a`` depends on input rows ``0..a`` of its tile only: no
    position sees a later one, and the zero rows that pad a partial tile change no output of
    the rows that exist. Row-separable bases are causal; exact bases that share work between
    rows (Strassen, rank 48) are not.
    """
    t = basis.tile
    reads, writes = (rows_touched(m.detach(), t, tol) for m in (basis.ex, basis.d))
    active = reads.any(1) & writes.any(1)
    row = torch.arange(t, device=reads.device)
    last_read = torch.where(reads, row, -1).amax(1)
    first_write = torch.where(writes, row, t).amin(1)
    return bool((last_read <= first_write)[active].all())


def causality_message(basis: STLBasis | _HasBasisRows) -> str:
    """The error for a basis that would let a position of a ``row_grouping="causal"`` tile
    depend on a later one."""
    return (f"row_grouping='causal' needs a basis whose every product term reads only tile "
            f"rows at or before the first row it writes, and {_label(basis)} has terms that read a "
            f"later row, so a token's output would depend on tokens after it. Use "
            f"basis='fitted' (resolved to the shipped causal basis of the rank), a "
            f"row-separable basis (stl_compiler.tiling.row_separable(tile, rank)), or "
            f"row_grouping='tokens' for models that are not causal")


def _label(basis: STLBasis | _HasBasisRows) -> str:
    return f"basis {basis.name!r}" if isinstance(basis, STLBasis) else "this basis"


def rows_touched(matrix: torch.Tensor, tile: int, tol: float) -> torch.Tensor:
    """``(rank, tile)`` bool: which tile rows each term's row-major vector has entries in
    (on the CPU: the basis is tiny, and this runs at conversion time, not per call)."""
    magnitude = matrix.detach().to("cpu", torch.float64).abs()
    cutoff = tol * float(magnitude.max()) if magnitude.numel() else 0.0
    return (magnitude.reshape(-1, tile, tile) > cutoff).any(-1)


def row_mixing_message(basis: STLBasis | _HasBasisRows) -> str:
    """The error for a basis that would mix the sequences of a ``row_grouping="batch"`` tile."""
    t = basis.tile
    return (f"row_grouping='batch' puts the same position of {t} different sequences in one "
            f"tile, and {_label(basis)} has product terms that read or write two tile rows, so "
            f"each sequence's output would depend on the sequences batched with it. Use "
            f"basis='fitted' (resolved to the row-separable basis of the rank), basis='naive' "
            f"(exact, rank {t ** 3}), a row-separable basis "
            f"(stl_compiler.tiling.row_separable(tile, rank)), or row_grouping='tokens'")


def row_separable(tile: int, rank: int) -> STLBasis:
    """The row-separable basis of ``rank`` (a multiple of ``tile``): ``rank/t`` terms per tile
    row, each reading one entry ``X[a, l]`` and writing one entry ``Y[a, j]`` of row ``a``.

    It is the exact naive basis (rank t³) restricted to the same ``rank/t`` of the t² weight
    positions ``(l, j)`` in every row, taken diagonal by diagonal (``j = l + k mod t``, k = 0,
    1, ...) so the kept positions spread over all rows and columns of the weight tile. Term
    ``p`` serves row ``p // (rank/t)``, the layout of ``stl_compiler.fit.row_separable_basis``.
    Exact at rank t³; below, each weight tile keeps ``rank/t`` of its t² entries, so ``alpha``
    (Gaussian tiles) is ``(t³ − rank)/t²``: calibrate the layers (``stl_compiler.calibrate``)
    to recover accuracy. This is what ``STLConfig(row_grouping="batch")`` uses for its default
    basis, because any other term mixes the unrelated sequences batched into one tile.
    """
    _check_tile_rank(tile, rank)
    t = tile
    if rank % t or rank > t ** 3:
        raise ValueError(f"a row-separable basis of tile {t} needs a rank that is a multiple of "
                         f"{t} and at most {t ** 3}, got rank={rank}; use rank="
                         f"{min(max(t, rank - rank % t), t ** 3)}")
    per = rank // t
    ex, ew, d = (torch.zeros(rank, t * t, dtype=torch.float64) for _ in range(3))
    for a in range(t):
        for j in range(per):
            p, offset, l = a * per + j, j // t, j % t
            col = (l + offset) % t
            ex[p, a * t + l] = ew[p, l * t + col] = d[p, a * t + col] = 1.0
    return STLBasis(t, rank, ex, ew, d, name=f"row-separable{t}", alpha=(t ** 3 - rank) / t ** 2)
