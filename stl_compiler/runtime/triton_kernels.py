"""CUDA implementations of the STL custom ops, through the Triton kernels of :mod:`._triton_impl`.

Importing this module registers a CUDA kernel for each op of :mod:`.ops` (``stl::encode``,
``stl::decode``, ``stl::decode_epilogue``, ``stl::decode_act_encode``,
``stl::decode_glu_encode``, ``stl::decode_norm_encode``, ``stl::decode_softmax_encode``) with
``register_kernel(..., "cuda")``; ``stl::reencode`` keeps its aten composite on CUDA.
Op names, schemas, fake implementations, autograd formulas and aten decompositions stay those
of :mod:`.ops`, so eager mode, torch.compile (Inductor calls the op, which dispatches here),
torch.export and autograd all keep working; only the CUDA computation changes.

Nothing here imports ``triton`` until the first CUDA call: the package imports on machines
without triton or without a GPU, and CPU tensors keep the aten composites. A CUDA call that
the kernels do not cover (triton missing, a tile other than 4, another dtype, a basis of
more than 64 rows; the output encoder ``ex`` of ``stl::decode_act_encode``,
``stl::decode_glu_encode`` and ``stl::decode_norm_encode``, often the stacked encoders of
several sites, may have up to 256) falls back to the aten composite too, as does any operand
the kernel does not take as given (for ``stl::decode_norm_encode``: a residual on another
device, a norm weight or bias that is not 1-D of length ``cols``; a residual broadcast over
batch dims is read with stride 0, not copied).
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch
from torch import Tensor

from . import ops


@functools.cache
def kernels() -> ModuleType | None:
    """The Triton kernel module, or None when triton cannot be imported."""
    try:
        from . import _triton_impl
    except ImportError:
        return None
    return _triton_impl


def _impl(operand: Tensor, tile: int, *bases: tuple[Tensor, int | None], elements: float,
          encoder: Tensor | None = None) -> ModuleType | None:
    """The kernel module if it handles ``operand`` with these ``(basis, expected rank)`` pairs
    and the output ``encoder`` of a fused kernel (any rank up to ``MAX_ENCODER_RANK``).

    ``elements`` is the size of the largest tensor the kernel touches: the kernels index in
    32 bits. Anything else (wrong basis shape or device included) goes to the aten composite,
    which raises the usual errors instead of a kernel reading out of bounds.
    """
    impl = kernels()
    encoders = () if encoder is None else (encoder,)
    if (impl is None or elements >= 2**31
            or not impl.supports(tile, *(b for b, _ in bases), dtype=operand.dtype,
                                 encoders=encoders)):
        return None
    for basis, rank in (*bases, *((e, None) for e in encoders)):
        if (basis.dim() != 2 or basis.shape[1] != tile * tile or basis.device != operand.device
                or (rank is not None and basis.shape[0] != rank)):
            return None
    return impl


def _bias_ok(bias: Tensor | None, operand: Tensor, tile: int) -> bool:
    """The kernels add a 1-D bias of at most the padded width (zero past its end)."""
    return bias is None or (bias.dim() == 1 and bias.shape[0] <= operand.shape[-1] * tile
                            and bias.device == operand.device)


@ops.encode.register_kernel("cuda")
def _encode_cuda(x: Tensor, basis: Tensor, tile: int) -> Tensor:
    impl = _impl(x, tile, (basis, None),
                 elements=x.numel() * max(1, basis.shape[0] / tile**2))
    if impl is None:
        return ops.encode_aten(x, basis, tile).contiguous()
    return impl.encode(x, basis, tile)


@ops.decode.register_kernel("cuda")
def _decode_cuda(encoded: Tensor, basis: Tensor, tile: int, rows: int, cols: int) -> Tensor:
    ops._check_crop(encoded, tile, rows, cols)
    impl = _impl(encoded, tile, (basis, encoded.shape[0]),
                 elements=encoded.numel() * max(1, tile**2 / max(1, encoded.shape[0])))
    if impl is None:
        return ops.decode_aten(encoded, basis, tile, rows, cols).contiguous()
    return impl.decode(encoded, basis, tile, rows, cols)


@ops.decode_epilogue.register_kernel("cuda")
def _decode_epilogue_cuda(encoded: Tensor, d: Tensor, bias: Tensor | None, activation: str,
                          scale: float, tile: int, rows: int, cols: int) -> Tensor:
    ops.check_activation(activation)
    ops._check_crop(encoded, tile, rows, cols)
    impl = _impl(encoded, tile, (d, encoded.shape[0]),
                 elements=encoded.numel() * max(1, tile**2 / max(1, encoded.shape[0])))
    if impl is None or not _bias_ok(bias, encoded, tile):
        return ops.decode_epilogue_aten(encoded, d, bias, activation, scale, tile, rows,
                                        cols).contiguous()
    return impl.decode_epilogue(encoded, d, bias, activation, scale, tile, rows, cols)


@ops.decode_act_encode.register_kernel("cuda")
def _decode_act_encode_cuda(encoded: Tensor, d: Tensor, bias: Tensor | None, ex: Tensor,
                            activation: str, scale: float, tile: int, rows: int, cols: int
                            ) -> Tensor:
    ops.check_activation(activation)
    impl = _impl(encoded, tile, (d, encoded.shape[0]), encoder=ex,
                 elements=encoded.numel() * max(1, ex.shape[0] / max(1, encoded.shape[0])))
    if impl is None or not _bias_ok(bias, encoded, tile):
        return ops.decode_act_encode_aten(encoded, d, bias, ex, activation, scale, tile, rows,
                                          cols).contiguous()
    return impl.decode_act_encode(encoded, d, bias, ex, activation, scale, tile, rows, cols)


@ops.decode_glu_encode.register_kernel("cuda")
def _decode_glu_encode_cuda(gate: Tensor, gate_d: Tensor, gate_bias: Tensor | None, up: Tensor,
                            up_d: Tensor, up_bias: Tensor | None, ex: Tensor, activation: str,
                            scale: float, tile: int, rows: int, cols: int) -> Tensor:
    ops.check_activation(activation)
    impl = _impl(gate, tile, (gate_d, gate.shape[0]), (up_d, up.shape[0]), encoder=ex,
                 elements=max(gate.numel(), up.numel(),
                              gate.numel() * ex.shape[0] / max(1, gate.shape[0])))
    if (impl is None or up.dtype != gate.dtype or up.shape[1:] != gate.shape[1:]
            or not _bias_ok(gate_bias, gate, tile) or not _bias_ok(up_bias, gate, tile)):
        return ops.decode_glu_encode_aten(gate, gate_d, gate_bias, up, up_d, up_bias, ex,
                                          activation, scale, tile, rows, cols).contiguous()
    return impl.decode_glu_encode(gate, gate_d, gate_bias, up, up_d, up_bias, ex, activation,
                                  scale, tile, rows, cols)


def _row_vector_ok(v: Tensor | None, operand: Tensor, cols: int) -> bool:
    """The row-strip kernel reads a norm weight / bias as 1-D of exactly ``cols`` entries."""
    return v is None or (v.dim() == 1 and v.shape[0] == cols and v.device == operand.device)


@ops.decode_norm_encode.register_kernel("cuda")
def _decode_norm_encode_cuda(encoded: Tensor, d: Tensor, bias: Tensor | None,
                             residual: Tensor | None, norm: str, weight: Tensor | None,
                             norm_bias: Tensor | None, eps: float | None, ex: Tensor, keep: str,
                             tile: int, rows: int, cols: int) -> tuple[Tensor, Tensor]:
    # The op's own checks (a registered kernel replaces the op's body on CUDA).
    ops.check_decode_norm_encode(encoded, residual, norm, keep, tile, rows, cols)
    rank = encoded.shape[0]
    impl = _impl(encoded, tile, (d, rank), encoder=ex,
                 elements=encoded.numel() * max(1, tile**2 / max(1, rank),
                                                ex.shape[0] / max(1, rank)))
    if (impl is None or not _bias_ok(bias, encoded, tile)
            or (residual is not None and residual.device != encoded.device)
            or not _row_vector_ok(weight, encoded, cols)
            or not _row_vector_ok(norm_bias, encoded, cols)):
        kept, out = ops.decode_norm_encode_aten(encoded, d, bias, residual, norm, weight,
                                                norm_bias, eps, ex, keep, tile, rows, cols)
        return kept.contiguous(), out.contiguous()
    return impl.decode_norm_encode(encoded, d, bias, residual, norm, weight, norm_bias, eps, ex,
                                   keep, tile, rows, cols)


@ops.decode_softmax_encode.register_kernel("cuda")
def _decode_softmax_encode_cuda(encoded: Tensor, d: Tensor, scale: float, mask: Tensor | None,
                                causal: bool, ex: Tensor, tile: int, rows: int, cols: int
                                ) -> Tensor:
    ops._check_crop(encoded, tile, rows, cols)
    rank = encoded.shape[0]
    impl = _impl(encoded, tile, (d, rank), encoder=ex,
                 elements=encoded.numel() * max(1, tile**2 / max(1, rank),
                                                ex.shape[0] / max(1, rank)))
    # The kernel reads a boolean mask, or an additive one of the scores' dtype (another
    # dtype would promote the scores, as the composite does), on the same device.
    if impl is None or (mask is not None and (
            mask.device != encoded.device
            or mask.dtype not in (torch.bool, encoded.dtype))):
        return ops.decode_softmax_encode_aten(encoded, d, scale, mask, causal, ex, tile, rows,
                                              cols).contiguous()
    return impl.decode_softmax_encode(encoded, d, scale, mask, causal, ex, tile, rows, cols)
