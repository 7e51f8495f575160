"""The STL product ``X ⋄ W`` (paper eq. 2), its float64 reference, and the FLOP model."""

from __future__ import annotations

import torch
from torch import Tensor

from .bases import STLBasis
from .runtime.ops import decode, encode
from .tiling import pad_last2, round_up

__all__ = [
    "stl_matmul", "stl_product", "stl_matmul_reference", "stl_flops", "dense_flops",
    "stl_bytes", "dense_bytes",
    "check_operand", "check_matmul_operands",
]


def check_operand(x: object, name: str, min_dim: int = 2) -> None:
    """Raise a clear TypeError/ValueError when ``x`` cannot be an STL operand."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}; "
                        f"convert it with .float() first")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dims, got shape {tuple(x.shape)}")


def check_matmul_operands(x: object, w: object) -> None:
    """Raise a clear error unless ``x (..., n, k) @ w (..., k, m)`` is a valid STL product."""
    check_operand(x, "x")
    check_operand(w, "w")
    if x.shape[-1] != w.shape[-2]:
        raise ValueError(f"inner dimensions differ: x is {tuple(x.shape)} and w is "
                         f"{tuple(w.shape)} (x.shape[-1] must equal w.shape[-2])")
    if x.dtype != w.dtype:
        raise TypeError(f"x and w dtypes differ: {x.dtype} vs {w.dtype}")


def _check_basis(basis: object) -> None:
    if not isinstance(basis, STLBasis):
        raise TypeError(f"basis must be an STLBasis (see stl_compiler.bases), "
                        f"got {type(basis).__name__}")


def stl_matmul(x: Tensor, w: Tensor, basis: STLBasis) -> Tensor:
    """STL product of ``x (..., n, k)`` and ``w (..., k, m)`` with broadcast batch dims.

    Any n, k, m: operands are zero-padded to multiples of the tile and the result is sliced
    back. Both operands are encoded at call time; for a fixed weight use
    :class:`stl_compiler.STLLinear`, which keeps it pre-encoded. With an exact basis the result
    equals ``torch.matmul(x, w)`` up to rounding.
    """
    check_matmul_operands(x, w)
    _check_basis(basis)
    return stl_product(x, w, *basis.to(x.dtype, x.device), basis.tile)


def stl_product(x: Tensor, w: Tensor, ex: Tensor, ew: Tensor, d: Tensor, tile: int) -> Tensor:
    """STL product with explicit (possibly trainable) basis tensors; no input validation.

    Leading dims of the operands are aligned (not expanded) so the rank-major encoded tensors
    broadcast in the batched matmul exactly as ``torch.matmul`` would.
    """
    n, m = x.shape[-2], w.shape[-1]
    ndim = max(x.dim(), w.dim())
    x = x.reshape((1,) * (ndim - x.dim()) + tuple(x.shape))
    w = w.reshape((1,) * (ndim - w.dim()) + tuple(w.shape))
    xh = encode(x, ex.to(x.dtype), tile)
    wh = encode(w, ew.to(w.dtype), tile)
    return decode(torch.matmul(xh, wh), d.to(x.dtype), tile, n, m)


def stl_matmul_reference(x: Tensor, w: Tensor, basis: STLBasis) -> Tensor:
    """Float64 STL product straight from eq. (2), one output tile at a time.

    ``vec(Y[I,J]) = d.T @ sum_L (ex @ vec(X[I,L])) * (ew @ vec(W[L,J]))``. Deliberately naive
    (Python loops over tiles, slicing instead of reshapes): it is the oracle of the tests.
    """
    t = basis.tile
    x, w = x.double(), w.double()
    batch = torch.broadcast_shapes(x.shape[:-2], w.shape[:-2])
    n, k, m = x.shape[-2], x.shape[-1], w.shape[-1]
    xs = pad_last2(x.expand(*batch, n, k), round_up(n, t), round_up(k, t))
    ws = pad_last2(w.expand(*batch, k, m), round_up(k, t), round_up(m, t))
    ex, ew, d = basis.matrices
    y = torch.zeros(*batch, xs.shape[-2], ws.shape[-1], dtype=torch.float64)

    def vec(a: Tensor, i: int, j: int) -> Tensor:
        return a[..., i * t:(i + 1) * t, j * t:(j + 1) * t].reshape(*batch, t * t)

    for i in range(xs.shape[-2] // t):
        for j in range(ws.shape[-1] // t):
            acc = torch.zeros(*batch, basis.rank, dtype=torch.float64)
            for l in range(xs.shape[-1] // t):
                acc += (vec(xs, i, l) @ ex.T) * (vec(ws, l, j) @ ew.T)
            y[..., i * t:(i + 1) * t, j * t:(j + 1) * t] = (acc @ d).reshape(*batch, t, t)
    return y[..., :n, :m]


def stl_flops(n: int, k: int, m: int, tile: int, rank: int, *, encode_w: bool = False) -> int:
    """FLOPs of the STL product of ``(n×k)·(k×m)`` (dims padded to the tile).

    ``2rnk`` to encode X, ``2rnkm/t³`` for the r small GEMMs, ``2rnm`` to decode; plus
    ``2rkm`` when W is encoded at run time (activation × activation).
    """
    n, k, m = (round_up(v, tile) for v in (n, k, m))
    flops = 2 * rank * n * k + 2 * rank * n * k * m // tile**3 + 2 * rank * n * m
    return flops + (2 * rank * k * m if encode_w else 0)


def dense_flops(n: int, k: int, m: int) -> int:
    """FLOPs of a dense ``(n×k)·(k×m)`` matmul: ``2nkm``."""
    return 2 * n * k * m


def stl_bytes(n: int, k: int, m: int, tile: int, rank: int, *, encode_w: bool = False,
              itemsize: int = 4) -> int:
    """Bytes the unfused STL product of ``(n×k)·(k×m)`` moves (docs/math.md, "Bytes model").

    Read X (n·k), write and read the encoded X (r·n·k/t² each way), read the encoded W
    (r·k·m/t²), write and read the r products (r·n·m/t² each way), write Y (n·m); with
    ``encode_w`` also read W (k·m) and write its encoding (r·k·m/t²). Dims padded to the tile.
    """
    npad, kpad, mpad = (round_up(v, tile) for v in (n, k, m))
    xh = rank * npad * kpad // tile**2
    wh = rank * kpad * mpad // tile**2
    yh = rank * npad * mpad // tile**2
    words = n * k + 2 * xh + wh + 2 * yh + n * m + (k * m + wh if encode_w else 0)
    return words * itemsize


def dense_bytes(n: int, k: int, m: int, *, itemsize: int = 4) -> int:
    """Bytes a dense ``(n×k)·(k×m)`` matmul moves: read X and W, write Y."""
    return (n * k + k * m + n * m) * itemsize
