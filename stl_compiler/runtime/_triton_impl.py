"""Triton kernels of the STL ops and their launchers (imported lazily: needs ``triton``).

Every kernel is one pass over memory: it reads its input once, contracts each t×t tile with
the basis on the tensor cores (``tl.dot``, fp32 accumulation) and writes its output once.
The tile ↔ vector reshapes happen in registers, so no separate permute / copy pass exists.

Layouts (see :mod:`.ops`): a plain tensor is ``(B, rows, cols)`` (any strides), an encoded
one is ``(r, B, rows/t, cols/t)`` (any strides; launchers write contiguous outputs). Leading
batch dims are flattened by the launchers. A program owns ``BI × BJ`` tiles of one batch
entry; masks cover the block remainders, so rows/cols only need to be multiples of t.

The launchers work on CUDA tensors, and on CPU tensors when the module was imported under
``TRITON_INTERPRET=1`` (the CI check in ``tests/runtime/test_triton_kernels.py``).
"""

from __future__ import annotations

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
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Triton's interpreter multiplies bf16 dot operands as their raw 16-bit patterns; under it the
# operands are upcast to fp32 first (exact for bf16, and the dot accumulates in fp32 anyway).
_UPCAST_DOT = tl.constexpr(bool(triton.knobs.runtime.interpret))

#: Block shape per kernel kind and padded rank: (BI tile-rows, BJ tile-cols, num_warps).
#: BI*BJ tiles are one ``tl.dot`` M dimension; BJ*t*elem_size is the contiguous row segment
#: each program reads (or writes) of the plain tensor. Tuned on the device (docs/kernel_notes.md).
CONFIGS: dict[str, dict[int, tuple[int, int, int]]] = {
    "encode": {16: (8, 32, 4), 32: (8, 32, 4), 64: (4, 32, 4)},
    "decode": {16: (8, 32, 4), 32: (8, 32, 4), 64: (4, 32, 4)},
    "fused": {16: (4, 32, 4), 32: (4, 32, 4), 64: (2, 32, 4)},
}


def padded_rank(rank: int) -> int:
    """Accumulator width for ``rank`` (a power of two ≥ 16, as ``tl.dot`` needs)."""
    return max(16, triton.next_power_of_2(rank))


def supports(tile: int, *bases: Tensor, dtype: torch.dtype) -> bool:
    """Whether the Triton kernels handle this tile, these bases and this dtype."""
    return (tile in SUPPORTED_TILES and dtype in SUPPORTED_DTYPES
            and all(b.shape[0] <= MAX_RANK for b in bases))


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
def _dot(a, b, IEEE: tl.constexpr):
    # fp32 operands: "ieee" keeps fp32 accuracy (tf32 would give ~3e-4 relative error).
    if _UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _program_coords(n_bi, n_bj):
    """(batch, block-row, block-col) of this program; block-cols vary fastest."""
    pid = tl.program_id(0)
    bj = pid % n_bj
    rest = pid // n_bj
    return rest // n_bi, rest % n_bi, bj


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
def _load_encoded(ptr, b, bi, bj, R, AT, CT, s_p, s_b, s_i, s_j,
                  RP: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr):
    """Encoded block ``(BI*BJ, RP)`` of batch b (rows: tiles row-major; zero past R / edges)."""
    i = bi * BI + tl.arange(0, BI)
    j = bj * BJ + tl.arange(0, BJ)
    p = tl.arange(0, RP)
    offs = (p[None, None, :] * s_p + b * s_b + i[:, None, None] * s_i
            + j[None, :, None] * s_j)
    mask = (i < AT)[:, None, None] & (j < CT)[None, :, None] & (p < R)[None, None, :]
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
    value = tl.reshape(acc, (BI, BJ, RP)).to(ptr.dtype.element_ty)
    tl.store(ptr + offs, value, mask=mask)


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
def _encode_kernel(x_ptr, basis_ptr, out_ptr, R, NT, KT, n_bi, n_bj,
                   sx_b, sx_n, sx_k, so_p, so_b,
                   T: tl.constexpr, RP: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr,
                   IEEE: tl.constexpr):
    b, bi, bj = _program_coords(n_bi, n_bj)
    rows = bi * (BI * T) + tl.arange(0, BI * T)
    cols = bj * (BJ * T) + tl.arange(0, BJ * T)
    mask = (rows < NT * T)[:, None] & (cols < KT * T)[None, :]
    x = tl.load(x_ptr + b * sx_b + rows[:, None] * sx_n + cols[None, :] * sx_k, mask=mask,
                other=0.0)
    # (BI*t, BJ*t) → (BI, t, BJ, t) → (BI, BJ, t, t) → one row-major tile vector per row.
    tiles = tl.reshape(tl.permute(tl.reshape(x, (BI, T, BJ, T)), (0, 2, 1, 3)),
                       (BI * BJ, T * T))
    acc = _dot(tiles, _load_basis_t(basis_ptr, R, T, RP).to(x.dtype), IEEE)
    _store_encoded(out_ptr, acc, b, bi, bj, R, NT, KT, so_p, so_b, RP, BI, BJ)


@triton.jit
def _decode_kernel(enc_ptr, d_ptr, bias_ptr, out_ptr, R, AT, CT, n_bi, n_bj, NBIAS, scale,
                   se_p, se_b, se_i, se_j, so_b,
                   T: tl.constexpr, RP: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr,
                   ACT: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr):
    b, bi, bj = _program_coords(n_bi, n_bj)
    enc = _load_encoded(enc_ptr, b, bi, bj, R, AT, CT, se_p, se_b, se_i, se_j, RP, BI, BJ)
    y = _dot(enc, _load_basis(d_ptr, R, T, RP).to(enc.dtype), IEEE)
    y = _tile_epilogue(y, bias_ptr, bi, bj, NBIAS, 0, 0, scale, T, BI, BJ, ACT, HAS_BIAS, False)
    # Tile vectors → (BI, BJ, t, t) → (BI, t, BJ, t) → the (BI*t, BJ*t) block, stored by rows.
    y = tl.reshape(tl.permute(tl.reshape(y, (BI, BJ, T, T)), (0, 2, 1, 3)), (BI * T, BJ * T))
    rows = bi * (BI * T) + tl.arange(0, BI * T)
    cols = bj * (BJ * T) + tl.arange(0, BJ * T)
    mask = (rows < AT * T)[:, None] & (cols < CT * T)[None, :]
    tl.store(out_ptr + b * so_b + rows[:, None] * (CT * T) + cols[None, :],
             y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _decode_act_encode_kernel(enc_ptr, d_ptr, bias_ptr, ex_ptr, out_ptr, R, R2, AT, CT,
                              n_bi, n_bj, NBIAS, ROWS, COLS, scale,
                              se_p, se_b, se_i, se_j, so_p, so_b,
                              T: tl.constexpr, RP: tl.constexpr, RP2: tl.constexpr,
                              BI: tl.constexpr, BJ: tl.constexpr, ACT: tl.constexpr,
                              HAS_BIAS: tl.constexpr, IEEE: tl.constexpr):
    b, bi, bj = _program_coords(n_bi, n_bj)
    enc = _load_encoded(enc_ptr, b, bi, bj, R, AT, CT, se_p, se_b, se_i, se_j, RP, BI, BJ)
    dtype = enc.dtype
    y = _dot(enc, _load_basis(d_ptr, R, T, RP).to(dtype), IEEE)
    y = _tile_epilogue(y, bias_ptr, bi, bj, NBIAS, ROWS, COLS, scale, T, BI, BJ, ACT,
                       HAS_BIAS, True)
    # Rounded to the activation dtype before the next encode, as the unfused ops would be.
    acc = _dot(y.to(dtype), _load_basis_t(ex_ptr, R2, T, RP2).to(dtype), IEEE)
    _store_encoded(out_ptr, acc, b, bi, bj, R2, AT, CT, so_p, so_b, RP2, BI, BJ)


@triton.jit
def _decode_glu_encode_kernel(gate_ptr, gate_d_ptr, gate_bias_ptr, up_ptr, up_d_ptr,
                              up_bias_ptr, ex_ptr, out_ptr, R, RU, R2, AT, CT, n_bi, n_bj,
                              NBIAS_G, NBIAS_U, ROWS, COLS, scale,
                              sg_p, sg_b, sg_i, sg_j, su_p, su_b, su_i, su_j, so_p, so_b,
                              T: tl.constexpr, RP: tl.constexpr, RPU: tl.constexpr,
                              RP2: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr,
                              ACT: tl.constexpr, HAS_GATE_BIAS: tl.constexpr,
                              HAS_UP_BIAS: tl.constexpr, IEEE: tl.constexpr):
    b, bi, bj = _program_coords(n_bi, n_bj)
    gate = _load_encoded(gate_ptr, b, bi, bj, R, AT, CT, sg_p, sg_b, sg_i, sg_j, RP, BI, BJ)
    dtype = gate.dtype
    g = _dot(gate, _load_basis(gate_d_ptr, R, T, RP).to(dtype), IEEE)
    g = _tile_epilogue(g, gate_bias_ptr, bi, bj, NBIAS_G, ROWS, COLS, 1.0, T, BI, BJ, ACT,
                       HAS_GATE_BIAS, False)
    up = _load_encoded(up_ptr, b, bi, bj, RU, AT, CT, su_p, su_b, su_i, su_j, RPU, BI, BJ)
    u = _dot(up, _load_basis(up_d_ptr, RU, T, RPU).to(dtype), IEEE)
    # scale, and the padding mask, applied once to the product.
    u = _tile_epilogue(u, up_bias_ptr, bi, bj, NBIAS_U, ROWS, COLS, scale, T, BI, BJ, 0,
                       HAS_UP_BIAS, True)
    acc = _dot((g * u).to(dtype), _load_basis_t(ex_ptr, R2, T, RP2).to(dtype), IEEE)
    _store_encoded(out_ptr, acc, b, bi, bj, R2, AT, CT, so_p, so_b, RP2, BI, BJ)


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


def _grid(batch: int, rows: int, cols: int, bi: int, bj: int) -> tuple[tuple[int], int, int]:
    n_bi, n_bj = triton.cdiv(rows, bi), triton.cdiv(cols, bj)
    return (batch * n_bi * n_bj,), n_bi, n_bj


def encode(x: Tensor, basis: Tensor, tile: int) -> Tensor:
    """``stl::encode``: ``x (*b, n, k)``, ``basis (r, t*t)`` → ``(r, *b, n/t, k/t)``."""
    *batch, n, k = x.shape
    rank, nt, kt = basis.shape[0], n // tile, k // tile
    out = _new_output((rank, *batch, nt, kt), x)
    if out.numel() == 0:
        return out
    x3 = _flat_plain(x)
    rp = padded_rank(rank)
    bi, bj, warps = CONFIGS["encode"][rp]
    grid, n_bi, n_bj = _grid(x3.shape[0], nt, kt, bi, bj)
    _encode_kernel[grid](x3, _basis(basis), out, rank, nt, kt, n_bi, n_bj,
                         *x3.stride(), out.stride(0), nt * kt,
                         T=tile, RP=rp, BI=bi, BJ=bj, IEEE=x.dtype == torch.float32,
                         num_warps=warps)
    return out


def decode_epilogue(encoded: Tensor, d: Tensor, bias: Tensor | None, activation: str,
                    scale: float, tile: int) -> Tensor:
    """``stl::decode_epilogue``: ``scale * act(decode(encoded, d) + bias)``, ``(*b, a*t, c*t)``.

    ``decode`` is this with no bias, ``"none"`` and scale 1.
    """
    rank, *batch, at, ct = encoded.shape
    out = _new_output((*batch, at * tile, ct * tile), encoded)
    if out.numel() == 0:
        return out
    e4 = _flat_encoded(encoded)
    rp = padded_rank(rank)
    bi, bj, warps = CONFIGS["decode"][rp]
    grid, n_bi, n_bj = _grid(e4.shape[1], at, ct, bi, bj)
    bias_arg = bias.contiguous() if bias is not None else out
    _decode_kernel[grid](e4, _basis(d), bias_arg, out, rank, at, ct, n_bi, n_bj,
                         bias.shape[-1] if bias is not None else 0, float(scale),
                         *e4.stride(), at * ct * tile * tile,
                         T=tile, RP=rp, BI=bi, BJ=bj, ACT=ACTIVATION_CODES[activation],
                         HAS_BIAS=bias is not None, IEEE=encoded.dtype == torch.float32,
                         num_warps=warps)
    return out


def decode(encoded: Tensor, basis: Tensor, tile: int) -> Tensor:
    """``stl::decode``: ``encoded (r, *b, a, c)``, ``basis (r, t*t)`` → ``(*b, a*t, c*t)``."""
    return decode_epilogue(encoded, basis, None, "none", 1.0, tile)


def _fused_config(*ranks: int) -> tuple[int, int, int]:
    return CONFIGS["fused"][max(padded_rank(r) for r in ranks)]


def decode_act_encode(encoded: Tensor, d: Tensor, bias: Tensor | None, ex: Tensor,
                      activation: str, scale: float, tile: int, rows: int, cols: int) -> Tensor:
    """``stl::decode_act_encode``: encode ``scale*act(decode(encoded, d) + bias)`` with ``ex``.

    The decoded tile never leaves registers; entries past ``rows``/``cols`` are zeroed
    before the encode.
    """
    rank, *batch, at, ct = encoded.shape
    rank2 = ex.shape[0]
    out = _new_output((rank2, *batch, at, ct), encoded)
    if out.numel() == 0:
        return out
    e4 = _flat_encoded(encoded)
    bi, bj, warps = _fused_config(rank, rank2)
    grid, n_bi, n_bj = _grid(e4.shape[1], at, ct, bi, bj)
    bias_arg = bias.contiguous() if bias is not None else out
    _decode_act_encode_kernel[grid](
        e4, _basis(d), bias_arg, _basis(ex), out, rank, rank2, at, ct, n_bi, n_bj,
        bias.shape[-1] if bias is not None else 0, rows, cols, float(scale),
        *e4.stride(), out.stride(0), at * ct,
        T=tile, RP=padded_rank(rank), RP2=padded_rank(rank2), BI=bi, BJ=bj,
        ACT=ACTIVATION_CODES[activation], HAS_BIAS=bias is not None,
        IEEE=encoded.dtype == torch.float32, num_warps=warps)
    return out


def decode_glu_encode(gate: Tensor, gate_d: Tensor, gate_bias: Tensor | None, up: Tensor,
                      up_d: Tensor, up_bias: Tensor | None, ex: Tensor, activation: str,
                      scale: float, tile: int, rows: int, cols: int) -> Tensor:
    """``stl::decode_glu_encode``: encode ``scale * act(gate + gb) * (up + ub)`` with ``ex``."""
    rank, *batch, at, ct = gate.shape
    rank_up, rank2 = up.shape[0], ex.shape[0]
    out = _new_output((rank2, *batch, at, ct), gate)
    if out.numel() == 0:
        return out
    g4, u4 = _flat_encoded(gate), _flat_encoded(up)
    bi, bj, warps = _fused_config(rank, rank_up, rank2)
    grid, n_bi, n_bj = _grid(g4.shape[1], at, ct, bi, bj)
    _decode_glu_encode_kernel[grid](
        g4, _basis(gate_d), gate_bias.contiguous() if gate_bias is not None else out,
        u4, _basis(up_d), up_bias.contiguous() if up_bias is not None else out,
        _basis(ex), out, rank, rank_up, rank2, at, ct, n_bi, n_bj,
        gate_bias.shape[-1] if gate_bias is not None else 0,
        up_bias.shape[-1] if up_bias is not None else 0, rows, cols, float(scale),
        *g4.stride(), *u4.stride(), out.stride(0), at * ct,
        T=tile, RP=padded_rank(rank), RPU=padded_rank(rank_up), RP2=padded_rank(rank2),
        BI=bi, BJ=bj, ACT=ACTIVATION_CODES[activation], HAS_GATE_BIAS=gate_bias is not None,
        HAS_UP_BIAS=up_bias is not None, IEEE=gate.dtype == torch.float32, num_warps=warps)
    return out
