"""The fused element-wise kernels: ``stl::decode_act_encode`` (decode → bias → activation →
encode with the next layer's ``ex``) and ``stl::decode_glu_encode`` (two decodes → gated
product → encode). The decoded tile never leaves registers; the padding past ``rows`` /
``cols`` is zeroed before the encode, as the unfused composite does. The output encoder may
have up to MAX_ENCODER_RANK rows (stacked encoders, encoded in chunks of ENCODER_CHUNK).
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
    encode_chunks,
    encoder_chunks,
    flat_encoded,
    launch,
    load_basis,
    load_encoded,
    load_encoder,
    optional,
    padded_rank,
    program_count,
    tile_epilogue,
)


@triton.jit
def _decode_act_encode_kernel(enc_ptr, d_ptr, bias_ptr, ex_ptr, out_ptr, R, R2, AT, CT,
                              n_bi, n_bj, n_blocks, NBIAS, ROWS, COLS, scale,
                              se_p, se_b, se_i, se_j, so_p, so_b,
                              T: tl.constexpr, RP: tl.constexpr, RC: tl.constexpr,
                              NRC: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr,
                              ACT: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr):
    dtype = enc_ptr.dtype.element_ty
    d = load_basis(d_ptr, R, T, RP).to(dtype)
    ex_t = load_encoder(ex_ptr, R2, dtype, T, RC, NRC)
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
        y = tile_epilogue(y, bias_ptr, bi, bj, NBIAS, ROWS, COLS, scale, T, BI, BJ, ACT,
                          HAS_BIAS, True)
        # Rounded to the activation dtype before the next encode, as the unfused ops would be.
        encode_chunks(out_ptr, y.to(dtype), ex_t, b, bi, bj, R2, AT, CT, so_p, so_b, RC, NRC,
                      BI, BJ, IEEE)
        enc = enc_next
        blk += step


@triton.jit
def _decode_glu_encode_kernel(gate_ptr, gate_d_ptr, gate_bias_ptr, up_ptr, up_d_ptr,
                              up_bias_ptr, ex_ptr, out_ptr, R, RU, R2, AT, CT, n_bi, n_bj,
                              n_blocks, NBIAS_G, NBIAS_U, ROWS, COLS, scale,
                              sg_p, sg_b, sg_i, sg_j, su_p, su_b, su_i, su_j, so_p, so_b,
                              T: tl.constexpr, RP: tl.constexpr, RPU: tl.constexpr,
                              RC: tl.constexpr, NRC: tl.constexpr, BI: tl.constexpr,
                              BJ: tl.constexpr, ACT: tl.constexpr, HAS_GATE_BIAS: tl.constexpr,
                              HAS_UP_BIAS: tl.constexpr, IEEE: tl.constexpr):
    dtype = gate_ptr.dtype.element_ty
    gate_d = load_basis(gate_d_ptr, R, T, RP).to(dtype)
    up_d = load_basis(up_d_ptr, RU, T, RPU).to(dtype)
    ex_t = load_encoder(ex_ptr, R2, dtype, T, RC, NRC)
    blk = tl.program_id(0)
    step = tl.num_programs(0)
    gate = load_encoded(gate_ptr, blk, n_blocks, n_bi, n_bj, R, AT, CT, sg_p, sg_b, sg_i, sg_j,
                        RP, BI, BJ)
    up = load_encoded(up_ptr, blk, n_blocks, n_bi, n_bj, RU, AT, CT, su_p, su_b, su_i, su_j,
                      RPU, BI, BJ)
    while blk < n_blocks:
        # Prefetch the next blocks, as in _encode_kernel.
        nxt = blk + step
        gate_next = load_encoded(gate_ptr, nxt, n_blocks, n_bi, n_bj, R, AT, CT, sg_p, sg_b,
                                 sg_i, sg_j, RP, BI, BJ)
        up_next = load_encoded(up_ptr, nxt, n_blocks, n_bi, n_bj, RU, AT, CT, su_p, su_b,
                               su_i, su_j, RPU, BI, BJ)
        b, bi, bj = block_coords(blk, n_bi, n_bj)
        g = tile_epilogue(dot(gate, gate_d, IEEE), gate_bias_ptr, bi, bj, NBIAS_G, ROWS, COLS,
                          1.0, T, BI, BJ, ACT, HAS_GATE_BIAS, False)
        # scale, and the padding mask, applied once to the product.
        u = tile_epilogue(dot(up, up_d, IEEE), up_bias_ptr, bi, bj, NBIAS_U, ROWS, COLS,
                          scale, T, BI, BJ, 0, HAS_UP_BIAS, True)
        encode_chunks(out_ptr, (g * u).to(dtype), ex_t, b, bi, bj, R2, AT, CT, so_p, so_b, RC,
                      NRC, BI, BJ, IEEE)
        gate = gate_next
        up = up_next
        blk = nxt


def _fused_config(*ranks: int) -> tuple[int, ...]:
    """The "fused" config for these input ranks and, last, the output encoder's rank (keyed
    by its chunk width)."""
    *inputs, rank2 = ranks
    return CONFIGS["fused"][max(encoder_chunks(rank2)[0], *map(padded_rank, inputs))]


def decode_act_encode(encoded: Tensor, d: Tensor, bias: Tensor | None, ex: Tensor,
                      activation: str, scale: float, tile: int, rows: int, cols: int) -> Tensor:
    """``stl::decode_act_encode``: encode ``scale*act(decode(encoded, d) + bias)`` with ``ex``.

    The decoded tile never leaves registers; entries past ``rows``/``cols`` are zeroed
    before the encode. ``ex`` may have up to MAX_ENCODER_RANK rows (encoded in chunks).
    """
    rank, *batch, at, ct = encoded.shape
    rank2 = ex.shape[0]
    out = common.new_output((rank2, *batch, at, ct), encoded)
    if out.numel() == 0:
        return out
    e4 = flat_encoded(encoded)
    bi, bj, warps, per_sm, maxnreg = _fused_config(rank, rank2)
    rc, nrc = encoder_chunks(rank2)
    n_blocks, n_bi, n_bj = block_grid(e4.shape[1], at, ct, bi, bj)
    launch(
        _decode_act_encode_kernel, program_count(n_blocks, per_sm, encoded.device), e4,
        dense_basis(d), optional(bias, e4), dense_basis(ex), out, rank, rank2, at, ct, n_bi, n_bj,
        n_blocks,
        bias.shape[-1] if bias is not None else 0, rows, cols, float(scale),
        *e4.stride(), out.stride(0), at * ct,
        T=tile, RP=padded_rank(rank), RC=rc, NRC=nrc, BI=bi, BJ=bj,
        ACT=ACTIVATION_CODES[activation], HAS_BIAS=bias is not None,
        IEEE=encoded.dtype == torch.float32, num_warps=warps, maxnreg=maxnreg)
    return out


def decode_glu_encode(gate: Tensor, gate_d: Tensor, gate_bias: Tensor | None, up: Tensor,
                      up_d: Tensor, up_bias: Tensor | None, ex: Tensor, activation: str,
                      scale: float, tile: int, rows: int, cols: int) -> Tensor:
    """``stl::decode_glu_encode``: encode ``scale * act(gate + gb) * (up + ub)`` with ``ex``
    (up to MAX_ENCODER_RANK rows)."""
    rank, *batch, at, ct = gate.shape
    rank_up, rank2 = up.shape[0], ex.shape[0]
    out = common.new_output((rank2, *batch, at, ct), gate)
    if out.numel() == 0:
        return out
    g4, u4 = flat_encoded(gate), flat_encoded(up)
    bi, bj, warps, per_sm, maxnreg = _fused_config(rank, rank_up, rank2)
    rc, nrc = encoder_chunks(rank2)
    n_blocks, n_bi, n_bj = block_grid(g4.shape[1], at, ct, bi, bj)
    launch(
        _decode_glu_encode_kernel, program_count(n_blocks, per_sm, gate.device),
        g4, dense_basis(gate_d), optional(gate_bias, g4), u4, dense_basis(up_d),
        optional(up_bias, g4),
        dense_basis(ex), out, rank, rank_up, rank2, at, ct, n_bi, n_bj, n_blocks,
        gate_bias.shape[-1] if gate_bias is not None else 0,
        up_bias.shape[-1] if up_bias is not None else 0, rows, cols, float(scale),
        *g4.stride(), *u4.stride(), out.stride(0), at * ct,
        T=tile, RP=padded_rank(rank), RPU=padded_rank(rank_up), RC=rc, NRC=nrc, BI=bi, BJ=bj,
        ACT=ACTIVATION_CODES[activation], HAS_GATE_BIAS=gate_bias is not None,
        HAS_UP_BIAS=up_bias is not None, IEEE=gate.dtype == torch.float32, num_warps=warps,
        maxnreg=maxnreg)
    return out


#: ``keep`` of stl::decode_norm_encode → the code the kernel branches on at compile time.
