"""The tile kernels: ``stl::encode`` (zero-padded t×t tiles → rank-major planes) and
``stl::decode`` / ``stl::decode_epilogue`` (planes → cropped plain tensor, with bias,
activation and scale on the fp32 result).

Every kernel is one pass over memory: it reads its input once, contracts each t×t tile with
the basis on the tensor cores (``tl.dot``, fp32 accumulation) and writes its output once. The
tile ↔ vector reshapes happen in registers, so no separate permute / copy pass exists.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import common
from .common import (
    ACTIVATION_CODES,
    CONFIGS,
    block_coords,
    block_grid,
    dense_basis,
    dot,
    flat_encoded,
    flat_plain,
    launch,
    load_basis,
    load_basis_t,
    load_encoded,
    load_plain,
    optional,
    padded_rank,
    program_count,
    store_encoded,
    store_plain,
    tile_epilogue,
    to_tile_vectors,
)


@triton.jit
def _encode_kernel(x_ptr, basis_ptr, out_ptr, R, N, K, NT, KT, n_bi, n_bj, n_blocks,
                   sx_b, sx_n, sx_k, so_p, so_b,
                   T: tl.constexpr, RP: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr,
                   IEEE: tl.constexpr):
    basis_t = load_basis_t(basis_ptr, R, T, RP).to(x_ptr.dtype.element_ty)
    blk = tl.program_id(0)
    step = tl.num_programs(0)
    x = load_plain(x_ptr, blk, n_blocks, n_bi, n_bj, N, K, sx_b, sx_n, sx_k, T, BI, BJ)
    while blk < n_blocks:
        # The next block's load is issued before this block's math and stores: two blocks of
        # reads in flight per program (the kernel is bound by memory latency × bytes in flight).
        x_next = load_plain(x_ptr, blk + step, n_blocks, n_bi, n_bj, N, K, sx_b, sx_n, sx_k, T,
                            BI, BJ)
        acc = dot(to_tile_vectors(x, T, BI, BJ), basis_t, IEEE)
        b, bi, bj = block_coords(blk, n_bi, n_bj)
        store_encoded(out_ptr, acc, b, bi, bj, R, NT, KT, so_p, so_b, RP, BI, BJ)
        x = x_next
        blk += step


@triton.jit
def _decode_kernel(enc_ptr, d_ptr, bias_ptr, out_ptr, R, AT, CT, ROWS, COLS, n_bi, n_bj,
                   n_blocks, NBIAS, scale, se_p, se_b, se_i, se_j,
                   T: tl.constexpr, RP: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr,
                   ACT: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr):
    d = load_basis(d_ptr, R, T, RP).to(enc_ptr.dtype.element_ty)
    blk = tl.program_id(0)
    step = tl.num_programs(0)
    enc = load_encoded(enc_ptr, blk, n_blocks, n_bi, n_bj, R, AT, CT, se_p, se_b, se_i, se_j,
                       RP, BI, BJ)
    while blk < n_blocks:
        # Prefetch the next block, as in _encode_kernel.
        enc_next = load_encoded(enc_ptr, blk + step, n_blocks, n_bi, n_bj, R, AT, CT, se_p,
                                se_b, se_i, se_j, RP, BI, BJ)
        b, bi, bj = block_coords(blk, n_bi, n_bj)
        y = dot(enc, d, IEEE)
        y = tile_epilogue(y, bias_ptr, bi, bj, NBIAS, 0, 0, scale, T, BI, BJ, ACT, HAS_BIAS,
                          False)
        store_plain(out_ptr, y, b, bi, bj, ROWS, COLS, T, BI, BJ)
        enc = enc_next
        blk += step


def encode(x: Tensor, basis: Tensor, tile: int) -> Tensor:
    """``stl::encode``: ``x (*b, n, k)``, ``basis (r, t*t)`` → ``(r, *b, ⌈n/t⌉, ⌈k/t⌉)``,
    partial tiles zero-padded."""
    *batch, n, k = x.shape
    rank, nt, kt = basis.shape[0], triton.cdiv(n, tile), triton.cdiv(k, tile)
    out = common.new_output((rank, *batch, nt, kt), x)
    if out.numel() == 0:
        return out
    x3 = flat_plain(x)
    rp = padded_rank(rank)
    bi, bj, warps, per_sm, maxnreg = CONFIGS["encode"][rp]
    n_blocks, n_bi, n_bj = block_grid(x3.shape[0], nt, kt, bi, bj)
    programs = program_count(n_blocks, per_sm, x.device)
    launch(
        _encode_kernel, programs, x3, dense_basis(basis), out, rank, n, k, nt, kt, n_bi, n_bj,
        n_blocks,
        *x3.stride(), out.stride(0), nt * kt,
        T=tile, RP=rp, BI=bi, BJ=bj, IEEE=x.dtype == torch.float32, num_warps=warps,
        maxnreg=maxnreg)
    return out


def decode_epilogue(encoded: Tensor, d: Tensor, bias: Tensor | None, activation: str,
                    scale: float, tile: int, rows: int, cols: int) -> Tensor:
    """``stl::decode_epilogue``: ``scale * act(decode(encoded, d) + bias)`` as
    ``(*b, rows, cols)``, the padding of the last tiles dropped.

    ``decode`` is this with no bias, ``"none"`` and scale 1.
    """
    rank, *batch, at, ct = encoded.shape
    out = common.new_output((*batch, rows, cols), encoded)
    if out.numel() == 0:
        return out
    e4 = flat_encoded(encoded)
    rp = padded_rank(rank)
    bi, bj, warps, per_sm, maxnreg = CONFIGS["decode"][rp]
    n_blocks, n_bi, n_bj = block_grid(e4.shape[1], at, ct, bi, bj)
    programs = program_count(n_blocks, per_sm, encoded.device)
    launch(
        _decode_kernel, programs, e4, dense_basis(d), optional(bias, e4), out, rank, at, ct,
        rows, cols, n_bi, n_bj, n_blocks,
        bias.shape[-1] if bias is not None else 0, float(scale), *e4.stride(),
        T=tile, RP=rp, BI=bi, BJ=bj, ACT=ACTIVATION_CODES[activation], HAS_BIAS=bias is not None,
        IEEE=encoded.dtype == torch.float32, num_warps=warps, maxnreg=maxnreg)
    return out


def decode(encoded: Tensor, basis: Tensor, tile: int, rows: int, cols: int) -> Tensor:
    """``stl::decode``: ``encoded (r, *b, a, c)``, ``basis (r, t*t)`` → ``(*b, rows, cols)``."""
    return decode_epilogue(encoded, basis, None, "none", 1.0, tile, rows, cols)
