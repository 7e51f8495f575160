"""The row-strip softmax kernel ``stl::decode_softmax_encode``: decode(QKᵀ) → scale → masks →
softmax over keys → encode for the AV site, a strip of t query rows at a time (softmax
normalizes within a row). The scores and probabilities never reach memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import common
from .common import (
    CONFIGS,
    dense_basis,
    dot,
    encode_chunks,
    encoder_chunks,
    flat_encoded,
    launch,
    load_basis,
    load_encoded,
    load_encoder,
    padded_rank,
    reduce_sum,
    round_to,
)


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _per_row(v, combine: tl.constexpr, T: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr):
    """Reduce ``(BI*BJ, t*t)`` tile vectors (BI strips of BJ tiles) to one value per row of
    each strip, spread back over the block: position q of a tile vector is row q // t."""
    v = tl.reshape(v, (BI, BJ, T, T))
    if combine == 0:
        rows = reduce_sum(reduce_sum(v, 3), 1)
    else:
        rows = tl.reduce(tl.reduce(v, 3, _max_combine), 1, _max_combine)
    return tl.reshape(tl.broadcast_to(rows[:, None, :, None], (BI, BJ, T, T)),
                      (BI * BJ, T * T))


@triton.jit
def _block_rows_cols(bi, jb, T: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr):
    """Row and column of every entry of the ``(BI*BJ, t*t)`` tile vectors of block (bi, jb)."""
    q = tl.arange(0, T * T)
    tile = tl.arange(0, BI * BJ)
    rows = (bi * BI + tile // BJ)[:, None] * T + (q // T)[None, :]
    cols = (jb * BJ + tile % BJ)[:, None] * T + (q % T)[None, :]
    return rows, cols


@triton.jit
def _masked_scores(enc_ptr, blk, n_blocks, n_bi, n_bj, R, AT, CT, se_p, se_b, se_i, se_j, d,
                   mask_ptr, b, bi, jb, scale, ROWS, COLS, NB2, sm_b1, sm_b2, sm_n, sm_k,
                   T: tl.constexpr, RP: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr,
                   MASK: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr):
    """Loads encoded block ``blk`` = (b, bi, jb) and returns its scores as fp32 ``(BI*BJ, t*t)``
    tile vectors, rounded as the unfused ops round (decode, then the scale, then an additive
    mask, in the dtype); -inf where a mask drops a key and past the last key column."""
    enc = load_encoded(enc_ptr, blk, n_blocks, n_bi, n_bj, R, AT, CT, se_p, se_b, se_i, se_j,
                       RP, BI, BJ)
    dtype = enc.dtype
    s = round_to(dot(enc, d, IEEE), dtype).to(tl.float32)
    s = round_to(s * scale, dtype).to(tl.float32)
    rows, cols = _block_rows_cols(bi, jb, T, BI, BJ)
    valid = (rows < ROWS) & (cols < COLS)
    if MASK != 0:
        offs = (b // NB2) * sm_b1 + (b % NB2) * sm_b2 + rows * sm_n + cols * sm_k
        m = tl.load(mask_ptr + offs, mask=valid, other=0)
        if MASK == 1:
            s = tl.where(m != 0, float("-inf"), s)
        else:
            s = round_to(s + m.to(tl.float32), dtype).to(tl.float32)
    if CAUSAL:
        s = tl.where(cols > rows, float("-inf"), s)
    return tl.where(cols < COLS, s, float("-inf"))


@triton.jit
def _decode_softmax_encode_kernel(enc_ptr, d_ptr, mask_ptr, ex_ptr, out_ptr, R, R2, AT, CT,
                                  ROWS, COLS, n_bi, n_bj, scale, NB2, sm_b1, sm_b2, sm_n,
                                  sm_k, se_p, se_b, se_i, se_j, so_p, so_b,
                                  T: tl.constexpr, RP: tl.constexpr, RC: tl.constexpr,
                                  NRC: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr,
                                  MASK: tl.constexpr, CAUSAL: tl.constexpr,
                                  IEEE: tl.constexpr):
    """One program per BI strips (t query rows each, of one batch entry, all key tiles). Pass
    1 keeps a running max and sum of exponentials per tile-vector position over the key blocks
    (online softmax, element-wise), merged into row statistics once; pass 2 re-decodes each
    block, normalizes, zeroes the padding and encodes with ``ex``. Several strips per program
    make the loads of short rows (few key tiles) long contiguous runs."""
    dtype = enc_ptr.dtype.element_ty
    d = load_basis(d_ptr, R, T, RP).to(dtype)
    ex_t = load_encoder(ex_ptr, R2, dtype, T, RC, NRC)
    group = tl.program_id(0)  # (batch entry, block of BI strips)
    b = group // n_bi
    bi = group % n_bi
    n_blocks = tl.num_programs(0) * n_bj
    run_max = tl.full((BI * BJ, T * T), float("-inf"), tl.float32)
    run_sum = tl.full((BI * BJ, T * T), 0.0, tl.float32)
    jb = 0
    while jb < n_bj:
        s = _masked_scores(enc_ptr, group * n_bj + jb, n_blocks, n_bi, n_bj, R, AT, CT, se_p,
                           se_b, se_i, se_j, d, mask_ptr, b, bi, jb, scale, ROWS, COLS, NB2,
                           sm_b1, sm_b2, sm_n, sm_k, T, RP, BI, BJ, MASK, CAUSAL, IEEE)
        new_max = tl.maximum(run_max, s)
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)  # all -inf so far: no NaN
        run_sum = run_sum * tl.exp(run_max - safe) + tl.exp(s - safe)
        run_max = new_max
        jb += 1
    row_max = _per_row(run_max, 1, T, BI, BJ)
    safe = tl.where(row_max == float("-inf"), 0.0, row_max)
    row_sum = _per_row(run_sum * tl.exp(run_max - safe), 0, T, BI, BJ)
    # A fully masked row has sum 0 and exp(s - 0) = 0 everywhere: probabilities 0, as
    # ``aten._safe_softmax`` (SDPA) gives, not 0/0.
    row_sum = tl.where(row_sum == 0.0, 1.0, row_sum)
    jb = 0
    while jb < n_bj:
        s = _masked_scores(enc_ptr, group * n_bj + jb, n_blocks, n_bi, n_bj, R, AT, CT, se_p,
                           se_b, se_i, se_j, d, mask_ptr, b, bi, jb, scale, ROWS, COLS, NB2,
                           sm_b1, sm_b2, sm_n, sm_k, T, RP, BI, BJ, MASK, CAUSAL, IEEE)
        p = round_to(tl.exp(s - safe) / row_sum, dtype)
        rows, cols = _block_rows_cols(bi, jb, T, BI, BJ)
        p = tl.where((rows < ROWS) & (cols < COLS), p, 0.0).to(dtype)
        encode_chunks(out_ptr, p, ex_t, b, bi, jb, R2, AT, CT, so_p, so_b, RC, NRC, BI, BJ,
                      IEEE)
        jb += 1


def _softmax_block(key_tiles: int, strips: int, tiles: int) -> tuple[int, int]:
    """(BJ, BI) of the softmax strip kernel for rows of ``key_tiles`` tiles: the widest BJ
    (16 ≤ BJ ≤ ``tiles``) that wastes at most a quarter of the row on masked tiles (the
    narrowest waste otherwise), and BI = tiles / BJ strips per program (not more than
    there are; only shape comparisons, which torch.compile turns into guards)."""
    widths = [w for w in (64, 32, 16) if w <= tiles]
    waste = {w: triton.cdiv(key_tiles, w) * w - key_tiles for w in widths}
    fitting = [w for w in widths if 4 * waste[w] <= triton.cdiv(key_tiles, w) * w]
    bj = fitting[0] if fitting else min(widths, key=waste.__getitem__)
    bi = tiles // bj  # a power of two, halved while half of it still covers the strips
    while bi > 1 and bi // 2 >= strips:
        bi //= 2
    return bj, bi


def decode_softmax_encode(encoded: Tensor, d: Tensor, scale: float, mask: Tensor | None,
                          causal: bool, ex: Tensor, tile: int, rows: int, cols: int) -> Tensor:
    """``stl::decode_softmax_encode``: encode ``softmax(scale * decode(encoded, d) + mask)``
    with ``ex`` strip by strip; the scores and probabilities never reach memory. A mask is read
    through its strides (broadcast dims cost nothing) for up to two batch dims."""
    rank, *batch, at, ct = encoded.shape
    rank2 = ex.shape[0]
    out = common.new_output((rank2, *batch, at, ct), encoded)
    if out.numel() == 0:
        return out
    e4 = flat_encoded(encoded)
    kind, strides, nb2 = 0, (0, 0, 0, 0), 1
    if mask is not None:
        kind = 1 if mask.dtype == torch.bool else 2
        target = (*batch, rows, cols)
        if len(batch) > 2:  # merged into one batch dim: a copy only when they cannot merge
            mask = mask.expand(target).reshape(-1, rows, cols)
            target = tuple(mask.shape)
        # The mask's own strides, 0 along the dims it broadcasts over: no expanded view (nor a
        # dtype view of booleans), which torch.compile's functionalization would have to
        # regenerate were the kernel's writes unknown.
        offset = len(target) - mask.dim()
        stride = [0 if k < offset or mask.shape[k - offset] == 1 else mask.stride(k - offset)
                  for k in range(len(target))]
        lead = [(1, 0)] * (4 - len(target)) + list(zip(target[:-2], stride[:-2]))
        nb2 = lead[1][0]
        strides = (lead[0][1], lead[1][1], stride[-2], stride[-1])
    rc, nrc = encoder_chunks(rank2)
    tiles, warps = CONFIGS["softmax"][max(padded_rank(rank), rc)]
    bj, bi = _softmax_block(ct, at, tiles)
    n_bi = triton.cdiv(at, bi)
    launch(
        _decode_softmax_encode_kernel, e4.shape[1] * n_bi, e4, dense_basis(d),
        e4 if mask is None else mask, dense_basis(ex), out, rank, rank2, at, ct, rows, cols,
        n_bi, triton.cdiv(ct, bj), float(scale), nb2, *strides, *e4.stride(),
        out.stride(0), at * ct,
        T=tile, RP=padded_rank(rank), RC=rc, NRC=nrc, BI=bi, BJ=bj, MASK=kind,
        CAUSAL=bool(causal), IEEE=encoded.dtype == torch.float32, num_warps=warps)
    return out
