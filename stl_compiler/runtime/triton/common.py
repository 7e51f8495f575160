"""What every STL Triton kernel family shares: support limits, launch configs, the ``@triton.jit``
device helpers (tile ↔ vector reshapes in registers, basis / encoded loads and stores, the
element-wise epilogue, rounding) and the launch helpers.

Layouts (see :mod:`..ops`): a plain tensor is ``(B, rows, cols)`` (any strides), an encoded
one is ``(r, B, ⌈rows/t⌉, ⌈cols/t⌉)`` (any strides; launchers write contiguous outputs).
Leading batch dims are flattened by the launchers. A block is ``BI × BJ`` tiles of one batch
entry; masks cover block remainders and partial tiles (encode reads zeros past the edge,
decode never writes the padding, the fused kernels zero it before re-encoding). Programs loop
over blocks (``CONFIGS``: a fixed number per multiprocessor) and load the next block before
working on the current one, so two blocks of reads are in flight per program.

Every kernel is launched through :func:`launch`, i.e. ``torch.library.wrap_triton``: called
from the body of a ``torch.library.triton_op`` under torch.compile, the launch is traced into
the graph and Inductor's generated code calls the kernel itself (docs/kernel_notes.md, "How
the CUDA ops reach Inductor"). Launchers therefore compute grids and arguments from shapes
only (SymInts under tracing), never from tensor values, and allocate only with ``torch.empty``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

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

#: The device type whose tensors the kernels take: CUDA, or CPU when this module was imported
#: under ``TRITON_INTERPRET=1`` (Triton's interpreter; the CI check of the kernels).
KERNEL_DEVICE = "cpu" if triton.knobs.runtime.interpret else "cuda"

# Whether the kernels run under Triton's interpreter, which differs from the GPU twice: it
# multiplies bf16 dot operands as their raw 16-bit patterns (``dot`` upcasts them to fp32
# first: exact for bf16, and the dot accumulates in fp32 anyway), and it truncates fp32 → bf16
# conversions where the GPU rounds to nearest even (``round_to``).
INTERPRETED = tl.constexpr(bool(triton.knobs.runtime.interpret))

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
def sigmoid(v):
    # Not tl.sigmoid: that is a @jit function of triton's standard library, which stays
    # compiled-only when triton was imported before the interpreter was switched on.
    return 1.0 / (1.0 + tl.exp(-v))


@triton.jit
def tanh(v):
    # tanh through the sigmoid: libdevice's tanh is not available in the interpreter.
    return 2.0 * sigmoid(2.0 * v) - 1.0


@triton.jit
def apply_activation(v, ACT: tl.constexpr):
    """The element-wise activation ``ACT`` (an ACTIVATION_CODES value) in fp32."""
    if ACT == 1:
        v = tl.maximum(v, 0.0)
    elif ACT == 2:
        v = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
    elif ACT == 3:
        v = 0.5 * v * (1.0 + tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)))
    elif ACT == 4:
        v = v * sigmoid(v)
    elif ACT == 5:
        v = tanh(v)
    elif ACT == 6:
        v = sigmoid(v)
    return v


@triton.jit
def round_to(v, dtype: tl.constexpr):
    """``v`` rounded to ``dtype`` to nearest even, as the GPU converts (and the aten composite
    rounds); under the interpreter, which truncates fp32 → bf16, the rounding is done on the
    fp32 bits first so that its truncation is exact."""
    if INTERPRETED and dtype == tl.bfloat16:
        bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        v = bits.to(tl.float32, bitcast=True)
    return v.to(dtype)



@triton.jit
def reduce_sum(v, axis: tl.constexpr):
    # What tl.sum does for fp32 (tl.sum itself is a compiled-only @jit function, as tl.sigmoid);
    # the interpreter maps this combine function to numpy's sum.
    return tl.reduce(v, axis, tl.standard._sum_combine)


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    # fp32 operands: "ieee" keeps fp32 accuracy (tf32 would give ~3e-4 relative error).
    if INTERPRETED:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def block_coords(blk, n_bi, n_bj):
    """(batch, block-row, block-col) of block number ``blk``; block-cols vary fastest."""
    bj = blk % n_bj
    rest = blk // n_bj
    return rest // n_bi, rest % n_bi, bj


@triton.jit
def load_plain(ptr, blk, n_blocks, n_bi, n_bj, N, K, s_b, s_n, s_k,
               T: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr):
    """Block ``blk`` ``(BI*t, BJ*t)`` of a plain ``(B, N, K)`` tensor, zero past N, K (the
    padding of partial tiles); fully masked (no traffic) past the last block."""
    b, bi, bj = block_coords(blk, n_bi, n_bj)
    rows = bi * (BI * T) + tl.arange(0, BI * T)
    cols = bj * (BJ * T) + tl.arange(0, BJ * T)
    mask = (rows < N)[:, None] & (cols < K)[None, :] & (blk < n_blocks)
    return tl.load(ptr + b * s_b + rows[:, None] * s_n + cols[None, :] * s_k, mask=mask,
                   other=0.0)


@triton.jit
def to_tile_vectors(x, T: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr):
    """A plain ``(BI*t, BJ*t)`` block → ``(BI*BJ, t*t)``, one row-major tile vector per row."""
    # (BI*t, BJ*t) → (BI, t, BJ, t) → (BI, BJ, t, t) → (BI*BJ, t*t).
    return tl.reshape(tl.permute(tl.reshape(x, (BI, T, BJ, T)), (0, 2, 1, 3)), (BI * BJ, T * T))


@triton.jit
def to_plain_block(y, T: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr):
    """Tile vectors ``(BI*BJ, t*t)`` → the plain ``(BI*t, BJ*t)`` block (inverse of the above)."""
    return tl.reshape(tl.permute(tl.reshape(y, (BI, BJ, T, T)), (0, 2, 1, 3)), (BI * T, BJ * T))


@triton.jit
def store_plain(ptr, y, b, bi, bj, ROWS, COLS,
                T: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr):
    """Store tile vectors ``y (BI*BJ, t*t)`` as block (bi, bj) of a contiguous
    ``(B, ROWS, COLS)`` tensor, by rows, cropped (the padding is never written)."""
    y = to_plain_block(y, T, BI, BJ)
    rows = bi * (BI * T) + tl.arange(0, BI * T)
    cols = bj * (BJ * T) + tl.arange(0, BJ * T)
    mask = (rows < ROWS)[:, None] & (cols < COLS)[None, :]
    tl.store(ptr + b * ROWS * COLS + rows[:, None] * COLS + cols[None, :],
             round_to(y, ptr.dtype.element_ty), mask=mask)


@triton.jit
def load_basis_t(ptr, R, T: tl.constexpr, RP: tl.constexpr):
    """``basis.T`` as ``(t*t, RP)``, zero past rank R."""
    q = tl.arange(0, T * T)
    p = tl.arange(0, RP)
    return tl.load(ptr + p[None, :] * (T * T) + q[:, None], mask=p[None, :] < R, other=0.0)


@triton.jit
def load_basis(ptr, R, T: tl.constexpr, RP: tl.constexpr):
    """``basis`` as ``(RP, t*t)``, zero past rank R."""
    q = tl.arange(0, T * T)
    p = tl.arange(0, RP)
    return tl.load(ptr + p[:, None] * (T * T) + q[None, :], mask=p[:, None] < R, other=0.0)


@triton.jit
def load_encoded(ptr, blk, n_blocks, n_bi, n_bj, R, AT, CT, s_p, s_b, s_i, s_j,
                 RP: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr):
    """Encoded block ``blk`` as ``(BI*BJ, RP)`` (rows: tiles row-major; zero past R / edges;
    fully masked past the last block)."""
    b, bi, bj = block_coords(blk, n_bi, n_bj)
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
def store_encoded(ptr, acc, b, bi, bj, R, AT, CT, s_p, s_b,
                  RP: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr):
    """Store ``acc (BI*BJ, RP)`` into a contiguous-in-(i, j) encoded tensor, ranks < R."""
    i = bi * BI + tl.arange(0, BI)
    j = bj * BJ + tl.arange(0, BJ)
    p = tl.arange(0, RP)
    offs = p[None, None, :] * s_p + b * s_b + i[:, None, None] * CT + j[None, :, None]
    mask = (i < AT)[:, None, None] & (j < CT)[None, :, None] & (p < R)[None, None, :]
    value = round_to(tl.reshape(acc, (BI, BJ, RP)), ptr.dtype.element_ty)
    tl.store(ptr + offs, value, mask=mask)


@triton.jit
def load_encoder(ptr, R2, dtype: tl.constexpr, T: tl.constexpr, RC: tl.constexpr,
                 NRC: tl.constexpr):
    """An output encoder ``(R2, t*t)`` as NRC chunks ``ex[c*RC : (c+1)*RC].T`` of ``(t*t, RC)``
    (a tuple; zero past R2), in ``dtype``."""
    chunks = ()
    for c in tl.static_range(NRC):
        chunks = chunks + (load_basis_t(ptr + c * (RC * T * T), R2 - c * RC, T, RC).to(dtype),)
    return chunks


@triton.jit
def encode_chunks(ptr, v, ex_t, b, bi, bj, R2, AT, CT, s_p, s_b, RC: tl.constexpr,
                  NRC: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr, IEEE: tl.constexpr):
    """Encode tile vectors ``v (BI*BJ, t*t)`` with the chunks ``ex_t`` of :func:`load_encoder`
    and store block (bi, bj) of each chunk's planes (as ``store_encoded``)."""
    for c in tl.static_range(NRC):
        store_encoded(ptr + c * RC * s_p, dot(v, ex_t[c], IEEE), b, bi, bj, R2 - c * RC, AT,
                      CT, s_p, s_b, RC, BI, BJ)


@triton.jit
def tile_epilogue(y, bias_ptr, bi, bj, NBIAS, ROWS, COLS, scale,
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
    y = apply_activation(y, ACT) * scale
    if MASK:
        rows = (bi * BI + tl.arange(0, BI))[:, None, None] * T + (q // T)[None, None, :]
        y = tl.where((rows < ROWS) & (cols < COLS), y, 0.0)
    return tl.reshape(y, (BI * BJ, T * T))


# ---------------------------------------------------------------------------------------------
# Launchers


def new_output(shape: tuple[int, ...], like: Tensor) -> Tensor:
    """The output buffer of a launcher (one place, so tests can poison it)."""
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def optional(v: Tensor | None, placeholder: Tensor) -> Tensor:
    """The pointer argument of an optional operand: ``v`` made contiguous, or, when it is absent
    (its ``HAS_*`` flag off, so the kernel never reads it), ``placeholder``, an input of the same
    launch. Never the output: under torch.compile a buffer passed as two pointers of which one
    may be written is two buffers after functionalization."""
    return placeholder if v is None else v.contiguous()


def flat_plain(x: Tensor) -> Tensor:
    """``(*b, n, k)`` → ``(B, n, k)``; a view whenever the batch dims can merge."""
    return x.reshape(-1, x.shape[-2], x.shape[-1])


def flat_encoded(e: Tensor) -> Tensor:
    """``(r, *b, a, c)`` → ``(r, B, a, c)``; a view whenever the batch dims can merge."""
    return e.reshape(e.shape[0], -1, e.shape[-2], e.shape[-1])


def dense_basis(basis: Tensor) -> Tensor:
    # The kernels read the basis as a dense (r, t*t) row-major matrix.
    return basis.contiguous()


@functools.cache
def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    # The interpreter runs programs one after another: any count works, and a small one makes
    # every program loop over several blocks, as on a GPU.
    return 2


def block_grid(batch: int, rows: int, cols: int, bi: int, bj: int) -> tuple[int, int, int]:
    """(blocks, block-rows, block-cols) covering ``batch`` tensors of ``rows × cols`` tiles."""
    n_bi, n_bj = triton.cdiv(rows, bi), triton.cdiv(cols, bj)
    return batch * n_bi * n_bj, n_bi, n_bj


def program_count(n_blocks: int, per_sm: int, device: torch.device) -> int:
    """Programs of a looping kernel: one per block, or ``per_sm`` per multiprocessor, each
    taking every ``programs``-th block (``sym_min``: no guard on a symbolic block count)."""
    return n_blocks if per_sm == 0 else torch.sym_min(n_blocks, per_sm * sm_count(device))


def launch(kernel, programs: int, *args, num_warps: int, maxnreg: int = 0,
           **constexprs) -> None:
    """Launch ``kernel`` on ``programs`` programs through ``torch.library.wrap_triton``.

    Inside a ``triton_op`` traced by torch.compile, ``wrap_triton`` records the launch in the
    graph (Inductor then launches the kernel from its generated code); called eagerly it is the
    kernel itself. The register cap ``maxnreg`` (``CONFIGS``) only applies to eager launches:
    Inductor's configs for user kernels carry ``num_warps`` / ``num_stages`` only.
    """
    runner = wrap_triton(kernel)
    if maxnreg and runner is kernel:
        constexprs["maxnreg"] = maxnreg
    runner[(programs,)](*args, num_warps=num_warps, **constexprs)
