"""``stl::gemm_decode``: an STL site's r small GEMMs and its decode epilogue as one op.

An STL linear site is ``encode(X) → bmm(Xh, Wh) → decode_epilogue``. Between the last two
the r encoded planes ``Yh (r, *b, a, M/t)`` go through memory: ``r/t²`` elements per output
element written and read again (1.5 each at t = 4, r = 24), about as much time as the GEMM
FLOPs save at hidden sizes near 1k. ``gemm_decode(xh, wh, d, bias, activation, scale, tile,
rows, cols)`` computes ``decode_epilogue(xh @ wh, ...)`` without materializing ``Yh`` on CUDA
(one Triton kernel, :mod:`.triton.gemm_decode`); everywhere else, and for anything the kernel
does not cover, it is the composite ``bmm → decode_epilogue`` of today's path.

Like the ops of :mod:`.ops` it is a ``torch.library.triton_op`` (one body for every device; under
torch.compile Inductor launches the kernel from its generated code) with a fake
implementation, an autograd formula (backward recomputes the composite and differentiates it,
as the other fused ops do) and a plain-aten decomposition in ``ops.DECOMPOSITIONS`` for the
exporters. :func:`stl_compiler.passes.fuse_gemm_decode` puts
it in graphs where it measured faster.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch
from torch import Tensor

from . import ops

#: Largest rank the kernel takes (its plane loop is unrolled for the tensor-core decode).
MAX_RANK = 64


def check_gemm_decode(xh: Tensor, wh: Tensor, d: Tensor, activation: str, tile: int,
                      rows: int, cols: int) -> None:
    """Shapes of ``stl::gemm_decode``: ``xh (r, *b, a, kt)``, ``wh (r, kt, mt)``,
    ``d (r, t*t)``, and a crop ``rows × cols`` that needs exactly ``a × mt`` tiles."""
    ops.check_activation(activation)
    if xh.dim() < 3 or wh.dim() != 3:
        raise ValueError(f"stl::gemm_decode: xh must be (r, *b, a, K/t) and wh (r, K/t, M/t), "
                         f"got xh {tuple(xh.shape)} and wh {tuple(wh.shape)}")
    if wh.shape[0] != xh.shape[0] or wh.shape[1] != xh.shape[-1]:
        raise ValueError(f"stl::gemm_decode: wh {tuple(wh.shape)} does not match xh "
                         f"{tuple(xh.shape)}: need the same rank (dim 0) and wh.shape[1] == "
                         f"xh.shape[-1] (K/t)")
    if d.dim() != 2 or d.shape[0] != xh.shape[0] or d.shape[1] != tile * tile:
        raise ValueError(f"stl::gemm_decode: d must be (rank, tile*tile) = "
                         f"({xh.shape[0]}, {tile * tile}), got {tuple(d.shape)}")
    a, mt = xh.shape[-2], wh.shape[-1]
    if not ((a - 1) * tile < rows <= a * tile and (mt - 1) * tile < cols <= mt * tile):
        raise ValueError(f"stl::gemm_decode: {rows}x{cols} does not fit {a}x{mt} tiles of "
                         f"{tile} (each dim must need exactly that many tiles)")


def gemm_decode_aten(xh: Tensor, wh: Tensor, d: Tensor, bias: Tensor | None, activation: str,
                     scale: float, tile: int, rows: int, cols: int) -> Tensor:
    """The composite: ``bmm`` of the r planes, then ``decode_epilogue`` (today's path, op
    for op: the fused op's CPU result equals the unfused graph's)."""
    rank, kt = xh.shape[0], xh.shape[-1]
    yh = torch.bmm(xh.reshape(rank, -1, kt), wh)
    yh = yh.reshape(*xh.shape[:-1], wh.shape[-1])
    return ops.decode_epilogue_aten(yh, d, bias, activation, scale, tile, rows, cols)


@functools.cache
def kernel_module() -> ModuleType | None:
    """The Triton kernel module, or None when triton cannot be imported."""
    try:
        from .triton import gemm_decode as impl
    except ImportError:
        return None
    return impl


def kernel_supports(impl: ModuleType, xh: Tensor, wh: Tensor, d: Tensor, bias: Tensor | None,
                    tile: int) -> bool:
    """Whether kernel module ``impl`` takes these operands (else the composite runs): tensors
    on its device type (CUDA; CPU for the interpreted copy of the tests), t = 4, rank ≤
    MAX_RANK, fp16 / bf16 / fp32 with ``wh`` and ``d`` of any float dtype, one device, a 1-D
    bias of at most the padded width, and every tensor below 2³¹ elements (32-bit offsets).
    Reads shapes, dtypes and devices only: fixed per traced shape, no host sync."""
    tensors = (xh, wh, d, *(() if bias is None else (bias,)))
    out_elements = xh[0].numel() // max(1, xh.shape[-1]) * wh.shape[-1] * tile * tile
    return (xh.device.type == impl.common.KERNEL_DEVICE
            and len({t.device for t in tensors}) == 1
            and tile == 4 and xh.shape[0] <= MAX_RANK
            and xh.dtype in impl.common.SUPPORTED_DTYPES and wh.dtype == xh.dtype
            and max(xh.numel(), wh.numel(), out_elements) < 2**31
            and (bias is None or (bias.dim() == 1 and bias.shape[0] <= wh.shape[-1] * tile)))


@torch.library.triton_op("stl::gemm_decode", mutates_args=())
def gemm_decode(xh: Tensor, wh: Tensor, d: Tensor, bias: Tensor | None, activation: str,
                scale: float, tile: int, rows: int, cols: int) -> Tensor:
    """``scale * act(decode(xh @ wh, d) + bias)`` cropped to ``(*b, rows, cols)``, for
    ``xh (r, *b, a, K/t)`` and ``wh (r, K/t, M/t)``; see :func:`gemm_decode_aten`."""
    check_gemm_decode(xh, wh, d, activation, tile, rows, cols)
    impl = kernel_module()
    if impl is not None and kernel_supports(impl, xh, wh, d, bias, tile):
        return impl.gemm_decode(xh, wh, d, bias, activation, scale, tile, rows, cols)
    return gemm_decode_aten(xh, wh, d, bias, activation, scale, tile, rows, cols).contiguous()


@gemm_decode.register_fake
def _gemm_decode_fake(xh, wh, d, bias, activation, scale, tile, rows, cols):
    return xh.new_empty((*xh.shape[1:-2], rows, cols))


ops._register_recompute_autograd(gemm_decode, gemm_decode_aten)
ops.DECOMPOSITIONS[torch.ops.stl.gemm_decode.default] = gemm_decode_aten


def _record_kernel() -> None:
    """Name the op's kernel to torch (``triton_op`` finds kernels by name in its body), so a
    compile cache entry of a graph calling the op is keyed by the kernel's source."""
    impl = kernel_module()
    if impl is not None:
        from torch._library import triton as triton_library

        triton_library.triton_ops_to_kernels["stl::gemm_decode"] = [impl._gemm_decode_kernel]


_record_kernel()
