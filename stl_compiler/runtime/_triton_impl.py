"""Triton kernels of the STL ops and their launchers (imported lazily: needs ``triton``).

Every kernel is one pass over memory: it reads its input once, contracts each t×t tile with
the basis on the tensor cores (``tl.dot``, fp32 accumulation) and writes its output once.
The tile ↔ vector reshapes happen in registers, so no separate permute / copy pass exists.

Layouts (see :mod:`.ops`): a plain tensor is ``(B, rows, cols)`` (any strides), an encoded
one is ``(r, B, ⌈rows/t⌉, ⌈cols/t⌉)`` (any strides; launchers write contiguous outputs).
Leading batch dims are flattened by the launchers. A block is ``BI × BJ`` tiles of one batch
entry; masks cover block remainders and partial tiles (encode reads zeros past the edge,
decode never writes the padding, the fused kernels zero it before re-encoding). Programs loop
over blocks (``CONFIGS``: a fixed number per multiprocessor) and load the next block before
working on the current one, so two blocks of reads are in flight per program.

The row-strip kernel (``stl::decode_norm_encode``: decode, bias, residual add, LayerNorm /
RMSNorm, encode) is the one exception to a single pass: a norm needs a whole row's statistics
before any of the row is written, so a program owns a strip of t rows (one tile-row) and walks
its column blocks twice: the second time it re-reads the residual sum it just wrote
(``keep="sum"``), or its inputs (docs/kernel_notes.md).

The fused kernels take an output encoder ``ex`` of up to MAX_ENCODER_RANK rows (the stacked
encoders of several sites): past MAX_RANK they encode each block in chunks of ENCODER_CHUNK
ranks (one ``tl.dot`` and store per chunk, the decoded block computed once).

The launchers work on CUDA tensors, and on CPU tensors when the module was imported under
``TRITON_INTERPRET=1`` (the CI check in ``tests/runtime/test_triton_kernels.py``).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

#: Activation name → the code the kernels branch on at compile time (names as in ops.ACTIVATIONS).
ACTIVATION_CODES = {"none": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4, "tanh": 5,
                    "sigmoid": 6}

#: Tile sides the kernels handle: t*t must be a power of two ≥ 16 for ``tl.dot``; t=8 would
#: need r up to 512 accumulators per tile, far past the register file, so only t=4.
SUPPORTED_TILES = (4,)
#: Largest rank the kernels handle (padded to 64 accumulators per tile).
MAX_RANK = 64
#: Largest rank of the *output* encoder ``ex`` of the fused kernels (decode_act_encode,
#: decode_glu_encode, decode_norm_encode): the compiler stacks the encoders of every site that
#: reads one value (Q, K, V: 3r rows). Past MAX_RANK the kernels encode in chunks of
#: ENCODER_CHUNK ranks, one ``tl.dot`` and one store per chunk, so the accumulator stays
#: ``ENCODER_CHUNK`` wide; the decoded value is computed once.
MAX_ENCODER_RANK = 4 * MAX_RANK
ENCODER_CHUNK = 32
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Whether the kernels run under Triton's interpreter, which differs from the GPU twice: it
# multiplies bf16 dot operands as their raw 16-bit patterns (``_dot`` upcasts them to fp32
# first: exact for bf16, and the dot accumulates in fp32 anyway), and it truncates fp32 → bf16
# conversions where the GPU rounds to nearest even (``_round``).
_INTERPRETED = tl.constexpr(bool(triton.knobs.runtime.interpret))

#: Launch shapes per kernel kind and padded rank: (BI, BJ, num_warps, programs per SM,
#: register cap). BI*BJ tiles are one ``tl.dot`` M dimension; BJ*t*elem_size bytes is the
#: contiguous row segment a program reads (or writes) of the plain tensor; 0 programs per SM
#: means one program per block; a register cap of 0 leaves registers to the compiler (a cap
#: trades spills for occupancy, i.e. bytes in flight). "fused" (decode_act_encode,
#: decode_glu_encode) is keyed by the largest padded rank involved, an output encoder past
#: MAX_RANK counting as its chunk width (``encoder_chunks``). Chosen by the sweeps of
#: benchmarks/gpu_check.py on an H200 (docs/kernel_notes.md).
CONFIGS: dict[str, dict[int, tuple[int, ...]]] = {
    "encode": {16: (4, 64, 4, 4, 0), 32: (4, 64, 4, 8, 0), 64: (2, 64, 4, 4, 0)},
    "decode": {16: (4, 64, 4, 0, 0), 32: (2, 64, 4, 8, 0), 64: (2, 64, 4, 4, 0)},
    "fused": {16: (1, 128, 4, 4, 0), 32: (1, 128, 4, 4, 0), 64: (1, 128, 4, 4, 0)},
    # decode_norm_encode (keyed like "fused"): BI is 1, a program owns whole strips (one
    # tile-row, every column tile) and walks a strip's BJ-tile column blocks twice. One program
    # per strip (0 per SM) won at padded ranks 16 and 32: strips are independent and long
    # (2·⌈c/BJ⌉ block steps each), the kernel is latency-bound, and capping the resident strips
    # (2–3 looping programs per SM, meant to keep the second pass's re-reads in L2) lost 15–40 %
    # in latency hiding. The register caps buy occupancy (80 regs: 6 programs of 4 warps per SM
    # instead of 4) for a few spilled bytes; rank 49 prefers small looping programs. H200 sweep,
    # docs/kernel_notes.md ("Row-strip kernel").
    "row_norm": {16: (1, 128, 4, 0, 128), 32: (1, 64, 4, 0, 80), 64: (1, 64, 2, 8, 0)},
    # decode_softmax_encode: (tiles per block, num_warps). A program takes BI strips of t
    # query rows and walks their key tiles BJ at a time, twice (online max / sum, then
    # normalize and encode): BJ fits the row's key tiles with little masked waste, BI fills
    # the rest of the block (``_softmax_block``: 257 keys = 65 tiles → BJ 16, BI 4), so short
    # rows take fewer programs and waste less than one 64-tile block per 65-tile row.
    "softmax": {16: (64, 4), 32: (64, 4), 64: (64, 4)},
}


def padded_rank(rank: int) -> int:
    """Accumulator width for ``rank`` (a power of two ≥ 16, as ``tl.dot`` needs)."""
    return max(16, triton.next_power_of_2(rank))


def encoder_chunks(rank: int) -> tuple[int, int]:
    """(chunk width, chunks) of an output encoder of ``rank`` rows: one padded chunk up to
    MAX_RANK (as every other basis), else ``⌈rank / ENCODER_CHUNK⌉`` chunks of ENCODER_CHUNK."""
    if rank <= MAX_RANK:
        return padded_rank(rank), 1
    return ENCODER_CHUNK, triton.cdiv(rank, ENCODER_CHUNK)


def supports(tile: int, *bases: Tensor, dtype: torch.dtype, encoders: tuple[Tensor, ...] = ()
             ) -> bool:
    """Whether the Triton kernels handle this tile, these bases (≤ MAX_RANK rows), these
    output encoders of the fused kernels (≤ MAX_ENCODER_RANK rows) and this dtype."""
    return (tile in SUPPORTED_TILES and dtype in SUPPORTED_DTYPES
            and all(b.shape[0] <= MAX_RANK for b in bases)
            and all(e.shape[0] <= MAX_ENCODER_RANK for e in encoders))


# ---------------------------------------------------------------------------------------------
# Device helpers


@triton.jit
def _sigmoid(v):
    # Not tl.sigmoid: that is a @jit function of triton's standard library, which stays
    # compiled-only when triton was imported before the interpreter was switched on.
    return 1.0 / (1.0 + tl.exp(-v))


@triton.jit
def _tanh(v):
    # tanh through the sigmoid: libdevice's tanh is not available in the interpreter.
    return 2.0 * _sigmoid(2.0 * v) - 1.0


@triton.jit
def _activation(v, ACT: tl.constexpr):
    """The element-wise activation ``ACT`` (an ACTIVATION_CODES value) in fp32."""
    if ACT == 1:
        v = tl.maximum(v, 0.0)
    elif ACT == 2:
        v = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
    elif ACT == 3:
        v = 0.5 * v * (1.0 + _tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)))
    elif ACT == 4:
        v = v * _sigmoid(v)
    elif ACT == 5:
        v = _tanh(v)
    elif ACT == 6:
        v = _sigmoid(v)
    return v


@triton.jit
def _round(v, dtype: tl.constexpr):
    """``v`` rounded to ``dtype`` to nearest even, as the GPU converts (and the aten composite
    rounds); under the interpreter, which truncates fp32 → bf16, the rounding is done on the
    fp32 bits first so that its truncation is exact."""
    if _INTERPRETED and dtype == tl.bfloat16:
        bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        v = bits.to(tl.float32, bitcast=True)
    return v.to(dtype)


@triton.jit
def _mul_rn(a, b):
    """``a * b`` in fp32 (``mul.rn.f32``: no flush to zero), never contracted into an FMA with
    a following add. The row-strip kernel rounds ``n * weight`` to the dtype before it adds the
    norm bias, as the composite does; with a plain ``*`` LLVM turns round(n * w) into a bf16
    multiply and fuses it with the bias add into one ``fma.rn.bf16x2``, one rounding fewer
    (1 bf16 ulp from the composite on ~1 in 4 normalized values, seen on an H200)."""
    if _INTERPRETED:
        return a * b
    else:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b],
                                         dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _sum(v, axis: tl.constexpr):
    # What tl.sum does for fp32 (tl.sum itself is a compiled-only @jit function, as tl.sigmoid);
    # the interpreter maps this combine function to numpy's sum.
    return tl.reduce(v, axis, tl.standard._sum_combine)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # fp32 operands: "ieee" keeps fp32 accuracy (tf32 would give ~3e-4 relative error).
    if _INTERPRETED:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _block_coords(blk, n_bi, n_bj):
    """(batch, block-row, block-col) of block number ``blk``; block-cols vary fastest."""
    bj = blk % n_bj
    rest = blk // n_bj
    return rest // n_bi, rest % n_bi, bj


@triton.jit
def _load_plain(ptr, blk, n_blocks, n_bi, n_bj, N, K, s_b, s_n, s_k,
                T: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr):
    """Block ``blk`` ``(BI*t, BJ*t)`` of a plain ``(B, N, K)`` tensor, zero past N, K (the
    padding of partial tiles); fully masked (no traffic) past the last block."""
    b, bi, bj = _block_coords(blk, n_bi, n_bj)
    rows = bi * (BI * T) + tl.arange(0, BI * T)
    cols = bj * (BJ * T) + tl.arange(0, BJ * T)
    mask = (rows < N)[:, None] & (cols < K)[None, :] & (blk < n_blocks)
    return tl.load(ptr + b * s_b + rows[:, None] * s_n + cols[None, :] * s_k, mask=mask,
                   other=0.0)


@triton.jit
def _to_tile_vectors(x, T: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr):
    """A plain ``(BI*t, BJ*t)`` block → ``(BI*BJ, t*t)``, one row-major tile vector per row."""
    # (BI*t, BJ*t) → (BI, t, BJ, t) → (BI, BJ, t, t) → (BI*BJ, t*t).
    return tl.reshape(tl.permute(tl.reshape(x, (BI, T, BJ, T)), (0, 2, 1, 3)), (BI * BJ, T * T))


@triton.jit
def _to_plain_block(y, T: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr):
    """Tile vectors ``(BI*BJ, t*t)`` → the plain ``(BI*t, BJ*t)`` block (inverse of the above)."""
    return tl.reshape(tl.permute(tl.reshape(y, (BI, BJ, T, T)), (0, 2, 1, 3)), (BI * T, BJ * T))


@triton.jit
def _store_plain(ptr, y, b, bi, bj, ROWS, COLS,
                 T: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr):
    """Store tile vectors ``y (BI*BJ, t*t)`` as block (bi, bj) of a contiguous
    ``(B, ROWS, COLS)`` tensor, by rows, cropped (the padding is never written)."""
    y = _to_plain_block(y, T, BI, BJ)
    rows = bi * (BI * T) + tl.arange(0, BI * T)
    cols = bj * (BJ * T) + tl.arange(0, BJ * T)
    mask = (rows < ROWS)[:, None] & (cols < COLS)[None, :]
    tl.store(ptr + b * ROWS * COLS + rows[:, None] * COLS + cols[None, :],
             _round(y, ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_basis_t(ptr, R, T: tl.constexpr, RP: tl.constexpr):
    """``basis.T`` as ``(t*t, RP)``, zero past rank R."""
    q = tl.arange(0, T * T)
    p = tl.arange(0, RP)
    return tl.load(ptr + p[None, :] * (T * T) + q[:, None], mask=p[None, :] < R, other=0.0)


@triton.jit
def _load_basis(ptr, R, T: tl.constexpr, RP: tl.constexpr):
    """``basis`` as ``(RP, t*t)``, zero past rank R."""
    q = tl.arange(0, T * T)
    p = tl.arange(0, RP)
    return tl.load(ptr + p[:, None] * (T * T) + q[None, :], mask=p[:, None] < R, other=0.0)


@triton.jit
def _load_encoded(ptr, blk, n_blocks, n_bi, n_bj, R, AT, CT, s_p, s_b, s_i, s_j,
                  RP: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr):
    """Encoded block ``blk`` as ``(BI*BJ, RP)`` (rows: tiles row-major; zero past R / edges;
    fully masked past the last block)."""
    b, bi, bj = _block_coords(blk, n_bi, n_bj)
    i = bi * BI + tl.arange(0, BI)
    j = bj * BJ + tl.arange(0, BJ)
    p = tl.arange(0, RP)
    offs = (p[None, None, :] * s_p + b * s_b + i[:, None, None] * s_i
            + j[None, :, None] * s_j)
    mask = ((i < AT)[:, None, None] & (j < CT)[None, :, None] & (p < R)[None, None, :]
            & (blk < n_blocks))
    block = tl.load(ptr + offs, mask=mask, other=0.0)
    return tl.reshape(block, (BI * BJ, RP))


@triton.jit
def _store_encoded(ptr, acc, b, bi, bj, R, AT, CT, s_p, s_b,
                   RP: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr):
    """Store ``acc (BI*BJ, RP)`` into a contiguous-in-(i, j) encoded tensor, ranks < R."""
    i = bi * BI + tl.arange(0, BI)
    j = bj * BJ + tl.arange(0, BJ)
    p = tl.arange(0, RP)
    offs = p[None, None, :] * s_p + b * s_b + i[:, None, None] * CT + j[None, :, None]
    mask = (i < AT)[:, None, None] & (j < CT)[None, :, None] & (p < R)[None, None, :]
    value = _round(tl.reshape(acc, (BI, BJ, RP)), ptr.dtype.element_ty)
    tl.store(ptr + offs, value, mask=mask)


@triton.jit
def _load_encoder(ptr, R2, dtype: tl.constexpr, T: tl.constexpr, RC: tl.constexpr,
                  NRC: tl.constexpr):
    """An output encoder ``(R2, t*t)`` as NRC chunks ``ex[c*RC : (c+1)*RC].T`` of ``(t*t, RC)``
    (a tuple; zero past R2), in ``dtype``."""
    chunks = ()
    for c in tl.static_range(NRC):
        chunks = chunks + (_load_basis_t(ptr + c * (RC * T * T), R2 - c * RC, T, RC).to(dtype),)
    return chunks


@triton.jit
def _encode_chunks(ptr, v, ex_t, b, bi, bj, R2, AT, CT, s_p, s_b, RC: tl.constexpr,
                   NRC: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr, IEEE: tl.constexpr):
    """Encode tile vectors ``v (BI*BJ, t*t)`` with the chunks ``ex_t`` of :func:`_load_encoder`
    and store block (bi, bj) of each chunk's planes (as ``_store_encoded``)."""
    for c in tl.static_range(NRC):
        _store_encoded(ptr + c * RC * s_p, _dot(v, ex_t[c], IEEE), b, bi, bj, R2 - c * RC, AT,
                       CT, s_p, s_b, RC, BI, BJ)


@triton.jit
def _tile_epilogue(y, bias_ptr, bi, bj, NBIAS, ROWS, COLS, scale,
                   T: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr, ACT: tl.constexpr,
                   HAS_BIAS: tl.constexpr, MASK: tl.constexpr):
    """``scale * act(y + bias)`` on decoded tile vectors ``y (BI*BJ, t*t)`` (fp32).

    With MASK, entries at rows ≥ ROWS or cols ≥ COLS are zeroed (the padding the next encode
    must see as zeros, as the unfused composite does).
    """
    y = tl.reshape(y, (BI, BJ, T * T))
    q = tl.arange(0, T * T)
    cols = (bj * BJ + tl.arange(0, BJ))[None, :, None] * T + (q % T)[None, None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=cols < NBIAS, other=0.0).to(tl.float32)
    y = _activation(y, ACT) * scale
    if MASK:
        rows = (bi * BI + tl.arange(0, BI))[:, None, None] * T + (q // T)[None, None, :]
        y = tl.where((rows < ROWS) & (cols < COLS), y, 0.0)
    return tl.reshape(y, (BI * BJ, T * T))


# ---------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _encode_kernel(x_ptr, basis_ptr, out_ptr, R, N, K, NT, KT, n_bi, n_bj, n_blocks,
                   sx_b, sx_n, sx_k, so_p, so_b,
                   T: tl.constexpr, RP: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr,
                   IEEE: tl.constexpr):
    basis_t = _load_basis_t(basis_ptr, R, T, RP).to(x_ptr.dtype.element_ty)
    blk = tl.program_id(0)
    step = tl.num_programs(0)
    x = _load_plain(x_ptr, blk, n_blocks, n_bi, n_bj, N, K, sx_b, sx_n, sx_k, T, BI, BJ)
    while blk < n_blocks:
        # The next block's load is issued before this block's math and stores: two blocks of
        # reads in flight per program (the kernel is bound by memory latency × bytes in flight).
        x_next = _load_plain(x_ptr, blk + step, n_blocks, n_bi, n_bj, N, K, sx_b, sx_n, sx_k, T,
                             BI, BJ)
        acc = _dot(_to_tile_vectors(x, T, BI, BJ), basis_t, IEEE)
        b, bi, bj = _block_coords(blk, n_bi, n_bj)
        _store_encoded(out_ptr, acc, b, bi, bj, R, NT, KT, so_p, so_b, RP, BI, BJ)
        x = x_next
        blk += step


@triton.jit
def _decode_kernel(enc_ptr, d_ptr, bias_ptr, out_ptr, R, AT, CT, ROWS, COLS, n_bi, n_bj,
                   n_blocks, NBIAS, scale, se_p, se_b, se_i, se_j,
                   T: tl.constexpr, RP: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr,
                   ACT: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr):
    d = _load_basis(d_ptr, R, T, RP).to(enc_ptr.dtype.element_ty)
    blk = tl.program_id(0)
    step = tl.num_programs(0)
    enc = _load_encoded(enc_ptr, blk, n_blocks, n_bi, n_bj, R, AT, CT, se_p, se_b, se_i, se_j,
                        RP, BI, BJ)
    while blk < n_blocks:
        # Prefetch the next block, as in _encode_kernel.
        enc_next = _load_encoded(enc_ptr, blk + step, n_blocks, n_bi, n_bj, R, AT, CT, se_p,
                                 se_b, se_i, se_j, RP, BI, BJ)
        b, bi, bj = _block_coords(blk, n_bi, n_bj)
        y = _dot(enc, d, IEEE)
        y = _tile_epilogue(y, bias_ptr, bi, bj, NBIAS, 0, 0, scale, T, BI, BJ, ACT, HAS_BIAS,
                           False)
        _store_plain(out_ptr, y, b, bi, bj, ROWS, COLS, T, BI, BJ)
        enc = enc_next
        blk += step


@triton.jit
def _decode_act_encode_kernel(enc_ptr, d_ptr, bias_ptr, ex_ptr, out_ptr, R, R2, AT, CT,
                              n_bi, n_bj, n_blocks, NBIAS, ROWS, COLS, scale,
                              se_p, se_b, se_i, se_j, so_p, so_b,
                              T: tl.constexpr, RP: tl.constexpr, RC: tl.constexpr,
                              NRC: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr,
                              ACT: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr):
    dtype = enc_ptr.dtype.element_ty
    d = _load_basis(d_ptr, R, T, RP).to(dtype)
    ex_t = _load_encoder(ex_ptr, R2, dtype, T, RC, NRC)
    blk = tl.program_id(0)
    step = tl.num_programs(0)
    enc = _load_encoded(enc_ptr, blk, n_blocks, n_bi, n_bj, R, AT, CT, se_p, se_b, se_i, se_j,
                        RP, BI, BJ)
    while blk < n_blocks:
        # Prefetch the next block, as in _encode_kernel.
        enc_next = _load_encoded(enc_ptr, blk + step, n_blocks, n_bi, n_bj, R, AT, CT, se_p,
                                 se_b, se_i, se_j, RP, BI, BJ)
        b, bi, bj = _block_coords(blk, n_bi, n_bj)
        y = _dot(enc, d, IEEE)
        y = _tile_epilogue(y, bias_ptr, bi, bj, NBIAS, ROWS, COLS, scale, T, BI, BJ, ACT,
                           HAS_BIAS, True)
        # Rounded to the activation dtype before the next encode, as the unfused ops would be.
        _encode_chunks(out_ptr, y.to(dtype), ex_t, b, bi, bj, R2, AT, CT, so_p, so_b, RC, NRC,
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
    gate_d = _load_basis(gate_d_ptr, R, T, RP).to(dtype)
    up_d = _load_basis(up_d_ptr, RU, T, RPU).to(dtype)
    ex_t = _load_encoder(ex_ptr, R2, dtype, T, RC, NRC)
    blk = tl.program_id(0)
    step = tl.num_programs(0)
    gate = _load_encoded(gate_ptr, blk, n_blocks, n_bi, n_bj, R, AT, CT, sg_p, sg_b, sg_i, sg_j,
                         RP, BI, BJ)
    up = _load_encoded(up_ptr, blk, n_blocks, n_bi, n_bj, RU, AT, CT, su_p, su_b, su_i, su_j,
                       RPU, BI, BJ)
    while blk < n_blocks:
        # Prefetch the next blocks, as in _encode_kernel.
        nxt = blk + step
        gate_next = _load_encoded(gate_ptr, nxt, n_blocks, n_bi, n_bj, R, AT, CT, sg_p, sg_b,
                                  sg_i, sg_j, RP, BI, BJ)
        up_next = _load_encoded(up_ptr, nxt, n_blocks, n_bi, n_bj, RU, AT, CT, su_p, su_b,
                                su_i, su_j, RPU, BI, BJ)
        b, bi, bj = _block_coords(blk, n_bi, n_bj)
        g = _tile_epilogue(_dot(gate, gate_d, IEEE), gate_bias_ptr, bi, bj, NBIAS_G, ROWS, COLS,
                           1.0, T, BI, BJ, ACT, HAS_GATE_BIAS, False)
        # scale, and the padding mask, applied once to the product.
        u = _tile_epilogue(_dot(up, up_d, IEEE), up_bias_ptr, bi, bj, NBIAS_U, ROWS, COLS,
                           scale, T, BI, BJ, 0, HAS_UP_BIAS, True)
        _encode_chunks(out_ptr, (g * u).to(dtype), ex_t, b, bi, bj, R2, AT, CT, so_p, so_b, RC,
                       NRC, BI, BJ, IEEE)
        gate = gate_next
        up = up_next
        blk = nxt


@triton.jit
def _load_row_inputs(enc_ptr, res_ptr, blk, n_blocks, n_bi, n_bj, R, AT, CT, ROWS, COLS,
                     se_p, se_b, se_i, se_j, sr_b, sr_n, sr_k,
                     T: tl.constexpr, RP: tl.constexpr, BJ: tl.constexpr,
                     HAS_RES: tl.constexpr):
    """Block ``blk`` (one tile-row, BJ tile-columns) of the encoded input ``(BJ, RP)`` and of
    the residual as tile vectors ``(BJ, t*t)`` (a placeholder without a residual)."""
    enc = _load_encoded(enc_ptr, blk, n_blocks, n_bi, n_bj, R, AT, CT, se_p, se_b, se_i, se_j,
                        RP, 1, BJ)
    if HAS_RES:
        res = _to_tile_vectors(_load_plain(res_ptr, blk, n_blocks, n_bi, n_bj, ROWS, COLS, sr_b,
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
    y = _round(_dot(enc, d, IEEE), dtype).to(tl.float32)
    h = _round(_tile_epilogue(y, bias_ptr, bi, bj, NBIAS, ROWS, COLS, 1.0, T, 1, BJ, 0, HAS_BIAS,
                              True), dtype)
    if HAS_RES:
        # The residual is zero past the edges (masked load), so the padding stays zero.
        h = _round(res.to(tl.float32) + h.to(tl.float32), dtype)
    return h.to(tl.float32)


@triton.jit
def _row_sum(v, same_row):
    """Per-position sums ``(t*t,)`` over ``BJ`` tile vectors ``v (BJ, t*t)`` → the sum of each
    row of the strip, repeated at each of its t positions (``same_row``: 0/1, ``(t*t, t*t)``)."""
    return _sum(_sum(v, 0)[:, None] * same_row, 0)


@triton.jit
def _load_kept_sum(kept_ptr, blk, end, AT, n_bj, ROWS, COLS,
                   T: tl.constexpr, BJ: tl.constexpr):
    """Block ``blk`` of the ``h`` that pass 1 wrote (contiguous ``(B, ROWS, COLS)``) as tile
    vectors ``(BJ, t*t)`` in fp32, zero at the padding; fully masked from block ``end`` on."""
    h = _load_plain(kept_ptr, blk, end, AT, n_bj, ROWS, COLS, ROWS * COLS, COLS, 1, T, 1, BJ)
    return _to_tile_vectors(h, T, 1, BJ).to(tl.float32)


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
    d = _load_basis(d_ptr, R, T, RP).to(dtype)
    ex_t = _load_encoder(ex_ptr, R2, dtype, T, RC, NRC)
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
                _store_plain(kept_ptr, h, b, i, jb, ROWS, COLS, T, 1, BJ)
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
            n = _round(((h - shift) - mean) * rstd, dtype)
            cols = (jb * BJ + tile_j) * T + (q % T)[None, :]
            if HAS_W:
                w = tl.load(w_ptr + cols, mask=cols < COLS, other=0.0)
                n = _round(_mul_rn(n.to(tl.float32), w.to(tl.float32)), dtype)
            if HAS_NB:
                nb = tl.load(nb_ptr + cols, mask=cols < COLS, other=0.0)
                n = _round(n.to(tl.float32) + nb.to(tl.float32), dtype)
            # Zero the padding after the norm (the norm of a zero row is not zero).
            n = tl.where((i * T + (q // T)[None, :] < ROWS) & (cols < COLS), n, 0.0).to(dtype)
            if KEEP == 2:
                _store_plain(kept_ptr, n, b, i, jb, ROWS, COLS, T, 1, BJ)
            _encode_chunks(out_ptr, n, ex_t, b, i, jb, R2, AT, CT, so_p, so_b, RC, NRC, 1, BJ,
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


# ---------------------------------------------------------------------------------------------
# Row-strip softmax: decode(QKᵀ) → scale → masks → softmax over keys → encode for AV.


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _per_row(v, combine: tl.constexpr, T: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr):
    """Reduce ``(BI*BJ, t*t)`` tile vectors (BI strips of BJ tiles) to one value per row of
    each strip, spread back over the block: position q of a tile vector is row q // t."""
    v = tl.reshape(v, (BI, BJ, T, T))
    if combine == 0:
        rows = _sum(_sum(v, 3), 1)
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
    enc = _load_encoded(enc_ptr, blk, n_blocks, n_bi, n_bj, R, AT, CT, se_p, se_b, se_i, se_j,
                        RP, BI, BJ)
    dtype = enc.dtype
    s = _round(_dot(enc, d, IEEE), dtype).to(tl.float32)
    s = _round(s * scale, dtype).to(tl.float32)
    rows, cols = _block_rows_cols(bi, jb, T, BI, BJ)
    valid = (rows < ROWS) & (cols < COLS)
    if MASK != 0:
        offs = (b // NB2) * sm_b1 + (b % NB2) * sm_b2 + rows * sm_n + cols * sm_k
        m = tl.load(mask_ptr + offs, mask=valid, other=0)
        if MASK == 1:
            s = tl.where(m != 0, float("-inf"), s)
        else:
            s = _round(s + m.to(tl.float32), dtype).to(tl.float32)
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
    d = _load_basis(d_ptr, R, T, RP).to(dtype)
    ex_t = _load_encoder(ex_ptr, R2, dtype, T, RC, NRC)
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
    # A fully masked row has sum 0: 0/0 gives NaN, as torch.softmax does.
    row_sum = _per_row(run_sum * tl.exp(run_max - safe), 0, T, BI, BJ)
    jb = 0
    while jb < n_bj:
        s = _masked_scores(enc_ptr, group * n_bj + jb, n_blocks, n_bi, n_bj, R, AT, CT, se_p,
                           se_b, se_i, se_j, d, mask_ptr, b, bi, jb, scale, ROWS, COLS, NB2,
                           sm_b1, sm_b2, sm_n, sm_k, T, RP, BI, BJ, MASK, CAUSAL, IEEE)
        p = _round(tl.exp(s - safe) / row_sum, dtype)
        rows, cols = _block_rows_cols(bi, jb, T, BI, BJ)
        p = tl.where((rows < ROWS) & (cols < COLS), p, 0.0).to(dtype)
        _encode_chunks(out_ptr, p, ex_t, b, bi, jb, R2, AT, CT, so_p, so_b, RC, NRC, BI, BJ,
                       IEEE)
        jb += 1


# ---------------------------------------------------------------------------------------------
# Launchers


def _new_output(shape: tuple[int, ...], like: Tensor) -> Tensor:
    """The output buffer of a launcher (one place, so tests can poison it)."""
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def _flat_plain(x: Tensor) -> Tensor:
    """``(*b, n, k)`` → ``(B, n, k)``; a view whenever the batch dims can merge."""
    return x.reshape(-1, x.shape[-2], x.shape[-1])


def _flat_encoded(e: Tensor) -> Tensor:
    """``(r, *b, a, c)`` → ``(r, B, a, c)``; a view whenever the batch dims can merge."""
    return e.reshape(e.shape[0], -1, e.shape[-2], e.shape[-1])


def _basis(basis: Tensor) -> Tensor:
    # The kernels read the basis as a dense (r, t*t) row-major matrix.
    return basis.contiguous()


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    # The interpreter runs programs one after another: any count works, and a small one makes
    # every program loop over several blocks, as on a GPU.
    return 2


def _blocks(batch: int, rows: int, cols: int, bi: int, bj: int) -> tuple[int, int, int]:
    """(blocks, block-rows, block-cols) covering ``batch`` tensors of ``rows × cols`` tiles."""
    n_bi, n_bj = triton.cdiv(rows, bi), triton.cdiv(cols, bj)
    return batch * n_bi * n_bj, n_bi, n_bj


def _programs(n_blocks: int, per_sm: int, device: torch.device) -> int:
    """Programs of a looping kernel: one per block, or ``per_sm`` per multiprocessor, each
    taking every ``programs``-th block."""
    return n_blocks if per_sm == 0 else min(n_blocks, per_sm * _sm_count(device))


def encode(x: Tensor, basis: Tensor, tile: int) -> Tensor:
    """``stl::encode``: ``x (*b, n, k)``, ``basis (r, t*t)`` → ``(r, *b, ⌈n/t⌉, ⌈k/t⌉)``,
    partial tiles zero-padded."""
    *batch, n, k = x.shape
    rank, nt, kt = basis.shape[0], triton.cdiv(n, tile), triton.cdiv(k, tile)
    out = _new_output((rank, *batch, nt, kt), x)
    if out.numel() == 0:
        return out
    x3 = _flat_plain(x)
    rp = padded_rank(rank)
    bi, bj, warps, per_sm, maxnreg = CONFIGS["encode"][rp]
    n_blocks, n_bi, n_bj = _blocks(x3.shape[0], nt, kt, bi, bj)
    programs = _programs(n_blocks, per_sm, x.device)
    _encode_kernel[(programs,)](
        x3, _basis(basis), out, rank, n, k, nt, kt, n_bi, n_bj, n_blocks,
        *x3.stride(), out.stride(0), nt * kt,
        T=tile, RP=rp, BI=bi, BJ=bj, IEEE=x.dtype == torch.float32, num_warps=warps,
        maxnreg=maxnreg or None)
    return out


def decode_epilogue(encoded: Tensor, d: Tensor, bias: Tensor | None, activation: str,
                    scale: float, tile: int, rows: int, cols: int) -> Tensor:
    """``stl::decode_epilogue``: ``scale * act(decode(encoded, d) + bias)`` as
    ``(*b, rows, cols)``, the padding of the last tiles dropped.

    ``decode`` is this with no bias, ``"none"`` and scale 1.
    """
    rank, *batch, at, ct = encoded.shape
    out = _new_output((*batch, rows, cols), encoded)
    if out.numel() == 0:
        return out
    e4 = _flat_encoded(encoded)
    rp = padded_rank(rank)
    bi, bj, warps, per_sm, maxnreg = CONFIGS["decode"][rp]
    n_blocks, n_bi, n_bj = _blocks(e4.shape[1], at, ct, bi, bj)
    programs = _programs(n_blocks, per_sm, encoded.device)
    bias_arg = bias.contiguous() if bias is not None else out
    _decode_kernel[(programs,)](
        e4, _basis(d), bias_arg, out, rank, at, ct, rows, cols, n_bi, n_bj, n_blocks,
        bias.shape[-1] if bias is not None else 0, float(scale), *e4.stride(),
        T=tile, RP=rp, BI=bi, BJ=bj, ACT=ACTIVATION_CODES[activation], HAS_BIAS=bias is not None,
        IEEE=encoded.dtype == torch.float32, num_warps=warps, maxnreg=maxnreg or None)
    return out


def decode(encoded: Tensor, basis: Tensor, tile: int, rows: int, cols: int) -> Tensor:
    """``stl::decode``: ``encoded (r, *b, a, c)``, ``basis (r, t*t)`` → ``(*b, rows, cols)``."""
    return decode_epilogue(encoded, basis, None, "none", 1.0, tile, rows, cols)


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
    out = _new_output((rank2, *batch, at, ct), encoded)
    if out.numel() == 0:
        return out
    e4 = _flat_encoded(encoded)
    bi, bj, warps, per_sm, maxnreg = _fused_config(rank, rank2)
    rc, nrc = encoder_chunks(rank2)
    n_blocks, n_bi, n_bj = _blocks(e4.shape[1], at, ct, bi, bj)
    bias_arg = bias.contiguous() if bias is not None else out
    _decode_act_encode_kernel[(_programs(n_blocks, per_sm, encoded.device),)](
        e4, _basis(d), bias_arg, _basis(ex), out, rank, rank2, at, ct, n_bi, n_bj, n_blocks,
        bias.shape[-1] if bias is not None else 0, rows, cols, float(scale),
        *e4.stride(), out.stride(0), at * ct,
        T=tile, RP=padded_rank(rank), RC=rc, NRC=nrc, BI=bi, BJ=bj,
        ACT=ACTIVATION_CODES[activation], HAS_BIAS=bias is not None,
        IEEE=encoded.dtype == torch.float32, num_warps=warps, maxnreg=maxnreg or None)
    return out


def decode_glu_encode(gate: Tensor, gate_d: Tensor, gate_bias: Tensor | None, up: Tensor,
                      up_d: Tensor, up_bias: Tensor | None, ex: Tensor, activation: str,
                      scale: float, tile: int, rows: int, cols: int) -> Tensor:
    """``stl::decode_glu_encode``: encode ``scale * act(gate + gb) * (up + ub)`` with ``ex``
    (up to MAX_ENCODER_RANK rows)."""
    rank, *batch, at, ct = gate.shape
    rank_up, rank2 = up.shape[0], ex.shape[0]
    out = _new_output((rank2, *batch, at, ct), gate)
    if out.numel() == 0:
        return out
    g4, u4 = _flat_encoded(gate), _flat_encoded(up)
    bi, bj, warps, per_sm, maxnreg = _fused_config(rank, rank_up, rank2)
    rc, nrc = encoder_chunks(rank2)
    n_blocks, n_bi, n_bj = _blocks(g4.shape[1], at, ct, bi, bj)
    _decode_glu_encode_kernel[(_programs(n_blocks, per_sm, gate.device),)](
        g4, _basis(gate_d), gate_bias.contiguous() if gate_bias is not None else out,
        u4, _basis(up_d), up_bias.contiguous() if up_bias is not None else out,
        _basis(ex), out, rank, rank_up, rank2, at, ct, n_bi, n_bj, n_blocks,
        gate_bias.shape[-1] if gate_bias is not None else 0,
        up_bias.shape[-1] if up_bias is not None else 0, rows, cols, float(scale),
        *g4.stride(), *u4.stride(), out.stride(0), at * ct,
        T=tile, RP=padded_rank(rank), RPU=padded_rank(rank_up), RC=rc, NRC=nrc, BI=bi, BJ=bj,
        ACT=ACTIVATION_CODES[activation], HAS_GATE_BIAS=gate_bias is not None,
        HAS_UP_BIAS=up_bias is not None, IEEE=gate.dtype == torch.float32, num_warps=warps,
        maxnreg=maxnreg or None)
    return out


#: ``keep`` of stl::decode_norm_encode → the code the kernel branches on at compile time.
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
    kept = _new_output((0,) if keep == "none" else (*batch, rows, cols), encoded)
    out = _new_output((rank2, *batch, at, ct), encoded)
    if out.numel() == 0:
        return kept, out
    e4 = _flat_encoded(encoded)
    # A residual broadcast over batch dims is read with batch stride 0 where the dims merge.
    r3 = None if residual is None else _flat_plain(residual.expand(*batch, rows, cols))
    rc, nrc = encoder_chunks(rank2)
    _, bj, warps, per_sm, maxnreg = CONFIGS["row_norm"][max(padded_rank(rank), rc)]
    n_strips, n_bj = e4.shape[1] * at, triton.cdiv(ct, bj)

    def vector(v: Tensor | None) -> Tensor:
        return out if v is None else v.to(dtype).contiguous()

    _decode_norm_encode_kernel[(_programs(n_strips, per_sm, encoded.device),)](
        e4, _basis(d), vector(bias), out if r3 is None else r3, vector(weight),
        vector(norm_bias), _basis(ex), out if keep == "none" else kept, out, rank, rank2, at, ct,
        rows, cols, 0 if bias is None else bias.shape[-1], n_strips, n_bj,
        float(torch.finfo(dtype).eps if eps is None else eps),
        *e4.stride(), *((0, 0, 0) if r3 is None else r3.stride()), out.stride(0), at * ct,
        T=tile, RP=padded_rank(rank), RC=rc, NRC=nrc, BJ=bj, RMS=norm == "rms",
        KEEP=KEEP_CODES[keep], HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        HAS_W=weight is not None, HAS_NB=norm_bias is not None, IEEE=dtype == torch.float32,
        num_warps=warps, maxnreg=maxnreg or None)
    return kept, out


def _softmax_block(key_tiles: int, strips: int, tiles: int) -> tuple[int, int]:
    """(BJ, BI) of the softmax strip kernel for rows of ``key_tiles`` tiles: the widest BJ
    (16 ≤ BJ ≤ ``tiles``) that wastes at most a quarter of the row on masked tiles (the
    narrowest waste otherwise), and BI = tiles / BJ strips per program (not more than
    there are)."""
    widths = [w for w in (64, 32, 16) if w <= tiles]
    waste = {w: triton.cdiv(key_tiles, w) * w - key_tiles for w in widths}
    fitting = [w for w in widths if 4 * waste[w] <= triton.cdiv(key_tiles, w) * w]
    bj = fitting[0] if fitting else min(widths, key=waste.__getitem__)
    return bj, max(1, min(tiles // bj, triton.next_power_of_2(strips)))


def decode_softmax_encode(encoded: Tensor, d: Tensor, scale: float, mask: Tensor | None,
                          causal: bool, ex: Tensor, tile: int, rows: int, cols: int) -> Tensor:
    """``stl::decode_softmax_encode``: encode ``softmax(scale * decode(encoded, d) + mask)``
    with ``ex`` strip by strip; the scores and probabilities never reach memory. A mask is read
    through its strides (broadcast dims cost nothing) for up to two batch dims."""
    rank, *batch, at, ct = encoded.shape
    rank2 = ex.shape[0]
    out = _new_output((rank2, *batch, at, ct), encoded)
    if out.numel() == 0:
        return out
    e4 = _flat_encoded(encoded)
    kind, strides, nb2 = 0, (0, 0, 0, 0), 1
    if mask is not None:
        kind = 1 if mask.dtype == torch.bool else 2
        full = mask.expand(*batch, rows, cols)
        if len(batch) > 2:
            full = full.reshape(-1, rows, cols)  # a copy only when the dims cannot merge
        lead = [(full.shape[k], full.stride(k)) for k in range(full.dim() - 2)]
        lead = [(1, 0)] * (2 - len(lead)) + lead
        nb2 = lead[1][0]
        strides = (lead[0][1], lead[1][1], full.stride(-2), full.stride(-1))
        # Booleans as bytes: the same memory, a pointer type the interpreter reads too.
        mask = full.view(torch.uint8) if kind == 1 else full
    rc, nrc = encoder_chunks(rank2)
    tiles, warps = CONFIGS["softmax"][max(padded_rank(rank), rc)]
    bj, bi = _softmax_block(ct, at, tiles)
    n_bi = triton.cdiv(at, bi)
    _decode_softmax_encode_kernel[(e4.shape[1] * n_bi,)](
        e4, _basis(d), mask if mask is not None else out, _basis(ex), out, rank, rank2, at, ct,
        rows, cols, n_bi, triton.cdiv(ct, bj), float(scale), nb2, *strides, *e4.stride(),
        out.stride(0), at * ct,
        T=tile, RP=padded_rank(rank), RC=rc, NRC=nrc, BI=bi, BJ=bj, MASK=kind,
        CAUSAL=bool(causal), IEEE=encoded.dtype == torch.float32, num_warps=warps)
    return out
