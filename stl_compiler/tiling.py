"""Tiles, padding and row grouping, in plain aten ops (traceable, exportable)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ROW_GROUPINGS = ("tokens", "batch")


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

    ``"tokens"``: rows are consecutive positions of one sequence, ``(*B, S, K)`` unchanged.
    ``"batch"``: rows are the same position across sequences: ``(S, N, K)`` with
    ``N = prod(B)``. A 2-D input ``(N, K)`` is N sequences of length 1 in that case.
    """
    if row_grouping == "tokens":
        return x
    if x.dim() == 2:
        return x.unsqueeze(0)
    return x.reshape(-1, x.shape[-2], x.shape[-1]).transpose(0, 1)


def ungroup_rows(y: torch.Tensor, like: torch.Tensor, row_grouping: str) -> torch.Tensor:
    """Inverse of :func:`group_rows` for an output whose last dim may differ from ``like``'s."""
    if row_grouping == "tokens":
        return y
    if like.dim() == 2:
        return y.squeeze(0)
    return y.transpose(0, 1).reshape(*like.shape[:-1], y.shape[-1])


def padded_rows(shape: tuple[int, ...], tile: int, row_grouping: str) -> int:
    """Rows an STL linear layer computes for an input of ``shape`` (…, K), padding included."""
    leading = shape[:-1] or (1,)
    if row_grouping == "tokens" or len(leading) == 1:
        *batch, seq = leading
        return round_up(seq, tile) * math.prod(batch)
    *batch, seq = leading
    return round_up(math.prod(batch), tile) * seq
