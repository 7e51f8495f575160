"""The row-strip norm kernel ``stl::decode_norm_encode``: decode, bias, residual add,
LayerNorm / RMSNorm, encode with the next layers' (stacked) encoders.

A norm needs a whole row's statistics before any of the row is written, so a program owns a
strip of t rows (one tile-row) and walks its column blocks twice: the second time it re-reads
the residual sum it just wrote (``keep="sum"``), or its inputs (docs/kernel_notes.md,
"Row-strip kernel").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import common
from .common import (
    CONFIGS,
    INTERPRETED,
    dense_basis,
    dot,
    encode_chunks,
    encoder_chunks,
    flat_encoded,
    flat_plain,
    launch,
    load_basis,
    load_encoded,
    load_encoder,
    load_plain,
    optional,
    padded_rank,
    program_count,
    reduce_sum,
    round_to,
    store_plain,
    tile_epilogue,
    to_tile_vectors,
)


@triton.jit
def _mul_rn(a, b):
    """``a * b`` in fp32 (``mul.rn.f32``: no flush to zero), never contracted into an FMA with
    a following add. The row-strip kernel rounds ``n * weight`` to the dtype before it adds the
    norm bias, as the composite does; with a plain ``*`` LLVM turns round(n * w) into a bf16
    multiply and fuses it with the bias add into one ``fma.rn.bf16x2``, one rounding fewer
    (1 bf16 ulp from the composite on ~1 in 4 normalized values, seen on an H200)."""
    if INTERPRETED:
        return a * b
    else:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b],
                                         dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _load_row_inputs(enc_ptr, res_ptr, blk, n_blocks, n_bi, n_bj, R, AT, CT, ROWS, COLS,
                     se_p, se_b, se_i, se_j, sr_b, sr_n, sr_k,
                     T: tl.constexpr, RP: tl.constexpr, BJ: tl.constexpr,
                     HAS_RES: tl.constexpr):
    """Block ``blk`` (one tile-row, BJ tile-columns) of the encoded input ``(BJ, RP)`` and of
    the residual as tile vectors ``(BJ, t*t)`` (a placeholder without a residual)."""
    enc = load_encoded(enc_ptr, blk, n_blocks, n_bi, n_bj, R, AT, CT, se_p, se_b, se_i, se_j,
                       RP, 1, BJ)
    if HAS_RES:
        res = to_tile_vectors(load_plain(res_ptr, blk, n_blocks, n_bi, n_bj, ROWS, COLS, sr_b,
                                         sr_n, sr_k, T, 1, BJ), T, 1, BJ)
    else:
        res = tl.full((1, 1), 0.0, enc.dtype)
    return enc, res


@triton.jit
def _residual_sum(enc, d, res, bias_ptr, bi, bj, NBIAS, ROWS, COLS,
                  T: tl.constexpr, BJ: tl.constexpr, HAS_BIAS: tl.constexpr,
                  HAS_RES: tl.constexpr, IEEE: tl.constexpr):
    """``h = residual + (decode(enc, d) + bias)`` as tile vectors ``(BJ, t*t)``, rounded to
    the activation dtype after each step as the aten composite rounds (returned as fp32);
    zero at rows ≥ ROWS and cols ≥ COLS."""
    dtype: tl.constexpr = enc.dtype
    y = round_to(dot(enc, d, IEEE), dtype).to(tl.float32)
    h = round_to(tile_epilogue(y, bias_ptr, bi, bj, NBIAS, ROWS, COLS, 1.0, T, 1, BJ, 0, HAS_BIAS,
                               True), dtype)
    if HAS_RES:
        # The residual is zero past the edges (masked load), so the padding stays zero.
        h = round_to(res.to(tl.float32) + h.to(tl.float32), dtype)
    return h.to(tl.float32)


@triton.jit
def _row_sum(v, same_row):
    """Per-position sums ``(t*t,)`` over ``BJ`` tile vectors ``v (BJ, t*t)`` → the sum of each
    row of the strip, repeated at each of its t positions (``same_row``: 0/1, ``(t*t, t*t)``)."""
    return reduce_sum(reduce_sum(v, 0)[:, None] * same_row, 0)


@triton.jit
def _load_kept_sum(kept_ptr, blk, end, AT, n_bj, ROWS, COLS,
                   T: tl.constexpr, BJ: tl.constexpr):
    """Block ``blk`` of the ``h`` that pass 1 wrote (contiguous ``(B, ROWS, COLS)``) as tile
    vectors ``(BJ, t*t)`` in fp32, zero at the padding; fully masked from block ``end`` on."""
    h = load_plain(kept_ptr, blk, end, AT, n_bj, ROWS, COLS, ROWS * COLS, COLS, 1, T, 1, BJ)
    return to_tile_vectors(h, T, 1, BJ).to(tl.float32)


@triton.jit
def _decode_norm_encode_kernel(enc_ptr, d_ptr, bias_ptr, res_ptr, w_ptr, nb_ptr, ex_ptr,
                               kept_ptr, out_ptr, R, R2, AT, CT, ROWS, COLS, NBIAS, n_strips,
                               n_bj, eps, se_p, se_b, se_i, se_j, sr_b, sr_n, sr_k, so_p, so_b,
                               T: tl.constexpr, RP: tl.constexpr, RC: tl.constexpr,
                               NRC: tl.constexpr, BJ: tl.constexpr, RMS: tl.constexpr,
                               KEEP: tl.constexpr, HAS_BIAS: tl.constexpr,
                               HAS_RES: tl.constexpr, HAS_W: tl.constexpr,
                               HAS_NB: tl.constexpr, IEEE: tl.constexpr):
    """Row-strip fusion: one strip (t rows of one batch entry, all column tiles) at a time.

    Pass 1 decodes the strip block by block (BJ tiles), adds bias and residual, writes ``h``
    (KEEP 1) and accumulates statistics; pass 2 gets each block's ``h`` again, normalizes,
    applies weight and bias, zeroes the padding, encodes with ``ex`` (NRC chunks of RC ranks:
    the normalized block is computed once) and writes the planes (and ``n``, KEEP 2). With
    KEEP 1 pass 2 re-reads the ``h`` that pass 1 stored (1 element per element, behind a CTA
    barrier: the threads read each other's stores); otherwise it re-reads and re-decodes the
    inputs (r/16 + 1 elements, from L2 where they are still there). Everything stays in the
    ``(BJ, t*t)`` tile-vector layout of the decode dot: position q of a tile vector is row
    q // t of the strip, so a row's statistic is kept at each of its t positions.
    """
    dtype = enc_ptr.dtype.element_ty
    d = load_basis(d_ptr, R, T, RP).to(dtype)
    ex_t = load_encoder(ex_ptr, R2, dtype, T, RC, NRC)
    n_blocks = n_strips * n_bj
    q = tl.arange(0, T * T)
    tile_j = tl.arange(0, BJ)[:, None]
    same_row = ((q // T)[:, None] == (q // T)[None, :]).to(tl.float32)
    # Only the last block can be partial: a position valid there was valid in every block.
    count = tl.where(((n_bj - 1) * BJ + tile_j) * T + (q % T)[None, :] < COLS, n_bj,
                     n_bj - 1) * 1.0
    strip = tl.program_id(0)
    step = tl.num_programs(0)
    enc, res = _load_row_inputs(enc_ptr, res_ptr, strip * n_bj, n_blocks, AT, n_bj, R, AT, CT,
                                ROWS, COLS, se_p, se_b, se_i, se_j, sr_b, sr_n, sr_k, T, RP, BJ,
                                HAS_RES)
    while strip < n_strips:
        b = strip // AT
        i = strip % AT
        # Pass 1. Statistics accumulate per position, element-wise (no reduction per block):
        # the sum of squares (RMS), or Welford's running mean and sum of squared deviations
        # over the blocks (LayerNorm), merged into row statistics once per strip.
        acc_mean = tl.full((BJ, T * T), 0.0, tl.float32)
        acc_m2 = tl.full((BJ, T * T), 0.0, tl.float32)
        jb = 0
        while jb < n_bj:
            # Prefetch the next block. After the last one: with KEEP 1 nothing (masked: pass 2
            # reads h, and nothing stays live through it); otherwise block 0 again, for pass 2.
            if KEEP == 1:
                nxt = strip * n_bj + jb + 1
                end = (strip + 1) * n_bj
            else:
                nxt = strip * n_bj + (jb + 1) % n_bj
                end = n_blocks
            enc_next, res_next = _load_row_inputs(
                enc_ptr, res_ptr, nxt, end, AT, n_bj, R, AT, CT, ROWS, COLS, se_p, se_b, se_i,
                se_j, sr_b, sr_n, sr_k, T, RP, BJ, HAS_RES)
            h = _residual_sum(enc, d, res, bias_ptr, i, jb, NBIAS, ROWS, COLS, T, BJ, HAS_BIAS,
                              HAS_RES, IEEE)
            if KEEP == 1:
                store_plain(kept_ptr, h, b, i, jb, ROWS, COLS, T, 1, BJ)
            if RMS:
                acc_m2 += h * h  # the padding is zero
            else:
                valid = (jb * BJ + tile_j) * T + (q % T)[None, :] < COLS
                delta = tl.where(valid, h - acc_mean, 0.0)
                acc_mean += delta * (1.0 / (jb + 1))
                acc_m2 += delta * (h - acc_mean)
            enc = enc_next
            res = res_next
            jb += 1
        if RMS:
            shift = tl.full((T * T,), 0.0, tl.float32)
            mean = shift
            var = _row_sum(acc_m2, same_row) / COLS
        else:
            # Chan et al.'s merge of the per-position statistics, around a shift near the row
            # mean so that nothing cancels: h - shift is exact, the rest is small.
            shift = _row_sum(count * acc_mean, same_row) / COLS
            mean = _row_sum(count * (acc_mean - shift[None, :]), same_row) / COLS
            dev = acc_mean - shift[None, :] - mean[None, :]
            var = _row_sum(acc_m2 + count * dev * dev, same_row) / COLS
        rstd = tl.rsqrt(var + eps)[None, :]
        shift = shift[None, :]
        mean = mean[None, :]
        if KEEP == 1:
            # Every thread's h stores are visible to the whole program past this barrier (a
            # no-op under the interpreter, which runs a program's block ops one at a time).
            tl.debug_barrier()
            kept = _load_kept_sum(kept_ptr, strip * n_bj, (strip + 1) * n_bj, AT, n_bj, ROWS,
                                  COLS, T, BJ)
        # Pass 2: h again, normalize, weight / bias, zero the padding, encode.
        jb = 0
        while jb < n_bj:
            if KEEP == 1:
                # Prefetch the strip's next h block (none after the last).
                kept_next = _load_kept_sum(kept_ptr, strip * n_bj + jb + 1, (strip + 1) * n_bj,
                                           AT, n_bj, ROWS, COLS, T, BJ)
                h = kept
            else:
                # Prefetch the next block; after the last one, block 0 of the next strip.
                nxt = (strip + step * ((jb + 1) // n_bj)) * n_bj + (jb + 1) % n_bj
                enc_next, res_next = _load_row_inputs(
                    enc_ptr, res_ptr, nxt, n_blocks, AT, n_bj, R, AT, CT, ROWS, COLS, se_p,
                    se_b, se_i, se_j, sr_b, sr_n, sr_k, T, RP, BJ, HAS_RES)
                h = _residual_sum(enc, d, res, bias_ptr, i, jb, NBIAS, ROWS, COLS, T, BJ,
                                  HAS_BIAS, HAS_RES, IEEE)
            n = round_to(((h - shift) - mean) * rstd, dtype)
            cols = (jb * BJ + tile_j) * T + (q % T)[None, :]
            if HAS_W:
                w = tl.load(w_ptr + cols, mask=cols < COLS, other=0.0)
                n = round_to(_mul_rn(n.to(tl.float32), w.to(tl.float32)), dtype)
            if HAS_NB:
                nb = tl.load(nb_ptr + cols, mask=cols < COLS, other=0.0)
                n = round_to(n.to(tl.float32) + nb.to(tl.float32), dtype)
            # Zero the padding after the norm (the norm of a zero row is not zero).
            n = tl.where((i * T + (q // T)[None, :] < ROWS) & (cols < COLS), n, 0.0).to(dtype)
            if KEEP == 2:
                store_plain(kept_ptr, n, b, i, jb, ROWS, COLS, T, 1, BJ)
            encode_chunks(out_ptr, n, ex_t, b, i, jb, R2, AT, CT, so_p, so_b, RC, NRC, 1, BJ,
                          IEEE)
            if KEEP == 1:
                kept = kept_next
            else:
                enc = enc_next
                res = res_next
            jb += 1
        if KEEP == 1:
            # Block 0 of the next strip (looping programs; masked past the last strip).
            enc, res = _load_row_inputs(enc_ptr, res_ptr, (strip + step) * n_bj, n_blocks, AT,
                                        n_bj, R, AT, CT, ROWS, COLS, se_p, se_b, se_i, se_j,
                                        sr_b, sr_n, sr_k, T, RP, BJ, HAS_RES)
        strip += step


KEEP_CODES = {"none": 0, "sum": 1, "normed": 2}


def decode_norm_encode(encoded: Tensor, d: Tensor, bias: Tensor | None, residual: Tensor | None,
                       norm: str, weight: Tensor | None, norm_bias: Tensor | None,
                       eps: float | None, ex: Tensor, keep: str, tile: int, rows: int, cols: int
                       ) -> tuple[Tensor, Tensor]:
    """``stl::decode_norm_encode``: ``h = residual + decode(encoded, d) + bias``, ``n =
    norm(h)`` (LayerNorm or RMSNorm over the columns), returns ``(kept, encode(n, ex))`` with
    ``kept`` = ``h`` (``keep="sum"``), ``n`` (``"normed"``) or an empty tensor (``"none"``).

    ``residual`` must broadcast to the decoded shape over batch dims and have ``encoded``'s
    dtype; ``weight`` and ``norm_bias`` are 1-D of length ``cols``. Like ``bias`` they are
    rounded to the dtype first, as the composite does. ``ex`` may have up to MAX_ENCODER_RANK
    rows (stacked encoders; encoded in chunks of ENCODER_CHUNK past MAX_RANK).
    """
    rank, *batch, at, ct = encoded.shape
    rank2, dtype = ex.shape[0], encoded.dtype
    kept = common.new_output((0,) if keep == "none" else (*batch, rows, cols), encoded)
    out = common.new_output((rank2, *batch, at, ct), encoded)
    if out.numel() == 0:
        return kept, out
    e4 = flat_encoded(encoded)
    # A residual broadcast over batch dims is read with batch stride 0 where the dims merge.
    r3 = None if residual is None else flat_plain(residual.expand(*batch, rows, cols))
    rc, nrc = encoder_chunks(rank2)
    _, bj, warps, per_sm, maxnreg = CONFIGS["row_norm"][max(padded_rank(rank), rc)]
    n_strips, n_bj = e4.shape[1] * at, triton.cdiv(ct, bj)

    def vector(v: Tensor | None) -> Tensor:
        return optional(None if v is None else v.to(dtype), e4)

    # ``kept`` is empty with keep="none" (KEEP 0: never written).
    launch(
        _decode_norm_encode_kernel, program_count(n_strips, per_sm, encoded.device),
        e4, dense_basis(d), vector(bias), e4 if r3 is None else r3, vector(weight),
        vector(norm_bias), dense_basis(ex), kept, out, rank, rank2, at, ct,
        rows, cols, 0 if bias is None else bias.shape[-1], n_strips, n_bj,
        float(torch.finfo(dtype).eps if eps is None else eps),
        *e4.stride(), *((0, 0, 0) if r3 is None else r3.stride()), out.stride(0), at * ct,
        T=tile, RP=padded_rank(rank), RC=rc, NRC=nrc, BJ=bj, RMS=norm == "rms",
        KEEP=KEEP_CODES[keep], HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        HAS_W=weight is not None, HAS_NB=norm_bias is not None, IEEE=dtype == torch.float32,
        num_warps=warps, maxnreg=maxnreg)
    return kept, out
