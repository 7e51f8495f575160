"""Triton kernel of ``stl::gemm_decode``: the r small GEMMs of an STL site and their decode in
one kernel (imported lazily by :mod:`..stl_gemm`: needs ``triton``).

A program owns a block of ``BM × BN`` output tiles (``4·BM × 4·BN`` elements of Y). For each
rank plane p it computes the block of ``Yh[p] = Xh[p] @ Wh[p]`` (a K loop of ``tl.dot``, fp32
accumulation) and folds it into the decoded block at once, so the planes never reach memory:

* ``"fma"``: ``out[i, j, q] += Yh[p][i, j] * d[p, q]`` on the CUDA cores, 16 FMAs per tile
  and plane, into a ``(BM, BN, 16)`` fp32 accumulator. The plane and K loops are one loop of
  ``r · ⌈K/(t·BK)⌉`` steps, so the software pipeline runs across planes instead of refilling
  for every plane (K/t = 320 is only 5 steps of 64);
* ``"tc"``: planes are computed 16 at a time, rounded to the input dtype (as the unfused
  ``bmm`` stores them), stacked into a ``(BM·BN, 16)`` operand in registers (``tl.join``)
  and decoded with one ``tl.dot`` against 16 rows of ``d`` on the tensor cores.

The epilogue adds the bias, applies the activation and scale (``_tile_epilogue`` of the
decode kernels), turns tile vectors into the plain ``(4·BM, 4·BN)`` block and stores it
cropped to ``rows × cols`` (the encoded tile-rows of all batch entries are one axis of P = B·a
tile-rows; a tile-row's batch entry and row follow from ``a``).

The launcher works on CUDA tensors, and on CPU tensors when this package was imported under
``TRITON_INTERPRET=1`` (``tests/runtime/test_stl_gemm.py``). It launches through
``torch.library.wrap_triton``, so under torch.compile Inductor launches the kernel itself.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from . import common
from .common import ACTIVATION_CODES, INTERPRETED, dot, round_to, tile_epilogue

#: The decode kinds (module docstring) → the kernel's DECODE code.
DECODES = {"fma": 0, "tc": 1}
#: (BM, BN, BK, num_warps, num_stages, decode kind): the autotuner's candidates. BM × BN tiles
#: is one program's output block; its fp32 decode accumulator holds 16 values per tile (16K at
#: 32 × 32 tiles = 128 × 128 outputs, as a dense GEMM's 128 × 128 tile). Short K (K/4 =
#: 256–320, 4–5 steps of BK = 64) keeps few stages useful.
CONFIG_SHAPES = [
    (32, 32, 64, 8, 3, "fma"), (32, 32, 64, 8, 4, "fma"), (64, 32, 64, 8, 3, "fma"),
    (64, 32, 64, 8, 4, "fma"), (64, 32, 32, 8, 4, "fma"), (64, 16, 64, 4, 4, "fma"),
    (32, 64, 64, 8, 3, "fma"), (32, 32, 64, 4, 3, "tc"), (64, 32, 64, 8, 3, "tc"),
]
#: The config the interpreter (and an explicit ``config=None`` on CPU) uses: small blocks, so
#: tests cover several blocks and block remainders at small sizes.
INTERPRETER_CONFIG = (16, 16, 16, 4, 1, "fma")


def _config(shape: tuple) -> triton.Config:
    bm, bn, bk, warps, stages, decode = shape
    return triton.Config({"BM": bm, "BN": bn, "BK": bk, "DECODE": DECODES[decode]}, num_warps=warps,
                         num_stages=stages)


@triton.jit
def _k_step(acc, x_ptrs, w_ptrs, k0, offs_i, offs_j, offs_k, P, KT, MT, sx_k, sw_k,
            IEEE: tl.constexpr):
    x = tl.load(x_ptrs + k0 * sx_k, mask=(offs_i < P)[:, None] & (k0 + offs_k < KT)[None, :],
                other=0.0)
    w = tl.load(w_ptrs + k0 * sw_k, mask=(k0 + offs_k < KT)[:, None] & (offs_j < MT)[None, :],
                other=0.0)
    return acc + dot(x, w, IEEE)


@triton.jit
def _plane_gemm(xh_ptr, wh_ptr, p, offs_i, offs_j, P, KT, MT, sx_p, sx_i, sx_k, sw_p, sw_k,
                sw_j, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                IEEE: tl.constexpr):
    """The ``(BM, BN)`` block of ``Xh[p] @ Wh[p]`` (rows ``offs_i``, cols ``offs_j``), fp32."""
    offs_k = tl.arange(0, BK)
    x_ptrs = xh_ptr + p * sx_p + offs_i[:, None] * sx_i + offs_k[None, :] * sx_k
    w_ptrs = wh_ptr + p * sw_p + offs_k[:, None] * sw_k + offs_j[None, :] * sw_j
    acc = tl.full((BM, BN), 0.0, tl.float32)
    if INTERPRETED:  # the interpreter's scalar arguments cannot bound a range()
        k0 = 0
        while k0 < KT:
            acc = _k_step(acc, x_ptrs, w_ptrs, k0, offs_i, offs_j, offs_k, P, KT, MT, sx_k,
                          sw_k, IEEE)
            k0 += BK
    else:  # a for loop, which the compiler software-pipelines (num_stages)
        for k0 in range(0, KT, BK):
            acc = _k_step(acc, x_ptrs, w_ptrs, k0, offs_i, offs_j, offs_k, P, KT, MT, sx_k,
                          sw_k, IEEE)
    return acc


@triton.jit
def _fma_step(acc, out3, step, n_k, x_ptrs, w_ptrs, d_ptr, offs_i, offs_j, offs_k, P, KT, MT,
              sx_p, sx_k, sw_p, sw_k, T: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
              BK: tl.constexpr, IEEE: tl.constexpr):
    """Step ``step`` of the flat (plane, K) loop; after a plane's last K step its block is
    decoded into ``out3`` on the CUDA cores and ``acc`` restarts."""
    p = step // n_k
    k0 = (step - p * n_k) * BK
    acc = _k_step(acc, x_ptrs + p * sx_p, w_ptrs + p * sw_p, k0, offs_i, offs_j, offs_k, P, KT,
                  MT, sx_k, sw_k, IEEE)
    if step - p * n_k == n_k - 1:
        d_p = tl.load(d_ptr + p * (T * T) + tl.arange(0, T * T)).to(tl.float32)
        out3 += acc[:, :, None] * d_p[None, None, :]
        acc = tl.full((BM, BN), 0.0, tl.float32)
    return acc, out3


@triton.jit
def _stack16(v):
    """16 ``(BM, BN)`` planes → ``(BM, BN, 16)`` with plane index ``c`` at position ``c``.
    Each ``tl.join`` adds a minor dim; joining plane c with c + 2^k puts bit k of the plane
    index in that dim, so the last join holds bit 0 and the row-major order is the index."""
    a = (tl.join(v[0], v[8]), tl.join(v[1], v[9]), tl.join(v[2], v[10]), tl.join(v[3], v[11]),
         tl.join(v[4], v[12]), tl.join(v[5], v[13]), tl.join(v[6], v[14]), tl.join(v[7], v[15]))
    b = (tl.join(a[0], a[4]), tl.join(a[1], a[5]), tl.join(a[2], a[6]), tl.join(a[3], a[7]))
    c = (tl.join(b[0], b[2]), tl.join(b[1], b[3]))
    return tl.join(c[0], c[1])


@triton.jit
def _gemm_decode_kernel(xh_ptr, wh_ptr, d_ptr, bias_ptr, out_ptr,
                        P, A, KT, MT, ROWS, COLS, NBIAS, scale,
                        sx_p, sx_i, sx_k, sw_p, sw_k, sw_j,
                        R: tl.constexpr, T: tl.constexpr, ACT: tl.constexpr,
                        HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, GROUP_M: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                        DECODE: tl.constexpr):
    dtype = xh_ptr.dtype.element_ty
    # Grouped block order: GROUP_M block-rows share each Wh column panel while it is in L2.
    pid = tl.program_id(0)
    n_m = (P + BM - 1) // BM  # not tl.cdiv: a compiled-only @jit helper, as tl.sigmoid
    n_n = (MT + BN - 1) // BN
    width = GROUP_M * n_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.where(n_m - first_m < GROUP_M, n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    offs_i = pid_m * BM + tl.arange(0, BM)
    offs_j = pid_n * BN + tl.arange(0, BN)
    q = tl.arange(0, T * T)

    if DECODE == 1:
        out = tl.full((BM * BN, T * T), 0.0, tl.float32)
        for g in tl.static_range((R + 15) // 16):
            planes = ()
            for c in tl.static_range(16):
                if g * 16 + c < R:
                    yh = _plane_gemm(xh_ptr, wh_ptr, g * 16 + c, offs_i, offs_j, P, KT, MT,
                                     sx_p, sx_i, sx_k, sw_p, sw_k, sw_j, BM, BN, BK, IEEE)
                    planes = planes + (round_to(yh, dtype),)
                else:
                    planes = planes + (tl.full((BM, BN), 0.0, dtype),)
            rows_d = g * 16 + tl.arange(0, 16)
            d_g = tl.load(d_ptr + rows_d[:, None] * (T * T) + q[None, :],
                          mask=(rows_d < R)[:, None], other=0.0).to(dtype)
            out += dot(tl.reshape(_stack16(planes), (BM * BN, 16)), d_g, IEEE)
    else:
        out3 = tl.full((BM, BN, T * T), 0.0, tl.float32)
        offs_k = tl.arange(0, BK)
        x_ptrs = xh_ptr + offs_i[:, None] * sx_i + offs_k[None, :] * sx_k
        w_ptrs = wh_ptr + offs_k[:, None] * sw_k + offs_j[None, :] * sw_j
        n_k = (KT + BK - 1) // BK
        acc = tl.full((BM, BN), 0.0, tl.float32)
        if INTERPRETED:  # the interpreter's scalar arguments cannot bound a range()
            step = 0
            while step < R * n_k:
                acc, out3 = _fma_step(acc, out3, step, n_k, x_ptrs, w_ptrs, d_ptr, offs_i,
                                      offs_j, offs_k, P, KT, MT, sx_p, sx_k, sw_p, sw_k, T,
                                      BM, BN, BK, IEEE)
                step += 1
        else:
            for step in range(0, R * n_k):
                acc, out3 = _fma_step(acc, out3, step, n_k, x_ptrs, w_ptrs, d_ptr, offs_i,
                                      offs_j, offs_k, P, KT, MT, sx_p, sx_k, sw_p, sw_k, T,
                                      BM, BN, BK, IEEE)
        out = tl.reshape(out3, (BM * BN, T * T))

    # bias, activation, scale on tile vectors; block rows are global tile-rows here, so the
    # row mask (off) is left to the store.
    y = tile_epilogue(out, bias_ptr, pid_m, pid_n, NBIAS, 0, 0, scale, T, BM, BN, ACT,
                       HAS_BIAS, False)
    y = tl.reshape(tl.permute(tl.reshape(y, (BM, BN, T, T)), (0, 2, 1, 3)), (BM * T, BN * T))
    # Tile-row i of the flat P axis is tile-row i % A of batch entry i // A.
    sub = tl.arange(0, T)
    row_in_b = (offs_i % A)[:, None] * T + sub[None, :]
    row_ok = tl.reshape((offs_i < P)[:, None] & (row_in_b < ROWS), (BM * T,))
    row_off = tl.reshape((offs_i // A)[:, None] * ROWS * COLS + row_in_b * COLS, (BM * T,))
    cols = tl.reshape(offs_j[:, None] * T + sub[None, :], (BN * T,))
    tl.store(out_ptr + row_off[:, None] + cols[None, :], round_to(y, out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (cols < COLS)[None, :])


@functools.cache
def _autotuned(decode: str | None):
    """The kernel autotuned over the configs of one decode kind (None: all of them), keyed by
    the shape class and the rank."""
    shapes = [s for s in CONFIG_SHAPES if decode is None or s[-1] == decode]
    return triton.autotune([_config(s) for s in shapes],
                           key=["KT", "MT", "R", "ACT", "HAS_BIAS"])(_gemm_decode_kernel)


def gemm_decode(xh: Tensor, wh: Tensor, d: Tensor, bias: Tensor | None, activation: str,
                scale: float, tile: int, rows: int, cols: int,
                config: tuple | None = None, decode: str | None = None) -> Tensor:
    """``stl::gemm_decode`` on the device: ``xh (r, *b, a, K/t)``, ``wh (r, K/t, M/t)`` →
    ``scale * act(decode(xh @ wh, d) + bias)`` cropped to ``(*b, rows, cols)``.

    ``config``: an explicit ``CONFIG_SHAPES``-style tuple instead of the autotuner (the
    interpreter always takes one); ``decode``: autotune only over that decode kind.
    Arguments are checked by the caller (:mod:`.stl_gemm`).
    """
    rank, *batch, a, kt = xh.shape
    mt = wh.shape[-1]
    out = common.new_output((*batch, rows, cols), xh)
    if out.numel() == 0:
        return out
    x3 = xh.reshape(rank, -1, kt)  # a view for the contiguous encode output
    p_rows = x3.shape[1]
    d = d.contiguous()
    args = (x3, wh, d, common.optional(bias, d), out, p_rows, a, kt, mt, rows, cols,
            0 if bias is None else bias.shape[0], float(scale), *x3.stride(), *wh.stride())
    meta = dict(R=rank, T=tile, ACT=ACTIVATION_CODES[activation], HAS_BIAS=bias is not None,
                IEEE=xh.dtype == torch.float32, GROUP_M=8)
    if config is None and INTERPRETED:
        config = INTERPRETER_CONFIG
    if config is None:
        kernel = _autotuned(decode)
        grid = lambda m: (triton.cdiv(p_rows, m["BM"]) * triton.cdiv(mt, m["BN"]),)  # noqa: E731
        wrap_triton(kernel)[grid](*args, **meta)
    else:
        bm, bn, bk, warps, stages, kind = config
        grid = (triton.cdiv(p_rows, bm) * triton.cdiv(mt, bn),)
        wrap_triton(_gemm_decode_kernel)[grid](*args, **meta, BM=bm, BN=bn, BK=bk,
                                               DECODE=DECODES[kind], num_warps=warps,
                                               num_stages=stages)
    return out


def best_config(decode: str | None = None) -> dict:
    """The autotuner's choice per key so far (for the benchmark's record)."""
    return {str(k): str(v) for k, v in _autotuned(decode).cache.items()}
