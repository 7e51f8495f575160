"""Which calls of the STL ops run on the Triton kernels: the one guard of the CUDA path.

The ops of :mod:`.ops` are ``torch.library.triton_op``s with one body for every device: the
op's own checks, then the Triton launcher :func:`launcher` returns, or the op's aten
composite when it returns None. Eagerly the body is the op's implementation; under
torch.compile it is traced, so Inductor's generated code launches the kernels itself (or
compiles the composite), with no call back into Python; torch.export keeps the ``stl::`` op
(its fake implementation), and :data:`.ops.DECOMPOSITIONS` lowers it to aten for exporters.

The kernels take (``launcher``): CUDA tensors (all of a call's tensors on one device), triton
importable, t = 4, fp16 / bf16 / fp32, bases of at most ``MAX_RANK`` rows of t*t entries and
of the rank the encoded operand has, output encoders ``ex`` (often the stacked encoders of
several sites) of at most ``MAX_ENCODER_RANK`` rows, tensors below 2³¹ elements (32-bit
indexing), and per op: 1-D biases of at most the padded width, a GLU's ``up`` of the gate's
dtype and tile grid, a norm weight / bias 1-D of length ``cols``, a boolean attention mask or
an additive one of the scores' dtype. Anything else runs the aten composite, which also raises
the usual errors instead of a kernel reading out of bounds. Every decision reads shapes,
dtypes and devices only, so it is fixed per traced shape and needs no host sync.

Nothing here fails without triton or a GPU: :func:`kernels` is None then, and CPU tensors
always take the composites (unless the kernels were imported under ``TRITON_INTERPRET=1``,
which runs them on CPU tensors: the CI check of ``tests/runtime/test_triton_kernels.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType
from typing import NamedTuple

import torch
from torch import Tensor


@functools.cache
def kernels() -> ModuleType | None:
    """The Triton kernel package (:mod:`.triton`), or None when triton cannot be imported."""
    try:
        from . import triton as impl
    except ImportError:
        return None
    return impl


def record_kernels() -> None:
    """Name each op's kernels to torch (``torch.library.triton_op`` finds only the kernels its
    body launches by name), so that a compile cache entry of a graph calling the op is keyed by
    their source. Called by :mod:`.ops` once its ops are defined."""
    impl = kernels()
    if impl is None:
        return
    from torch._library import triton as triton_library

    for op, found in impl.KERNELS.items():
        triton_library.triton_ops_to_kernels[f"stl::{op}"] = list(found)


def _bias_ok(bias: Tensor | None, operand: Tensor, tile: int) -> bool:
    """The kernels add a 1-D bias of at most the padded width (zero past its end)."""
    return bias is None or (bias.dim() == 1 and bias.shape[0] <= operand.shape[-1] * tile)


def _row_vector_ok(v: Tensor | None, cols: int) -> bool:
    """The row-strip kernel reads a norm weight / bias as 1-D of exactly ``cols`` entries."""
    return v is None or (v.dim() == 1 and v.shape[0] == cols)


def _expansion(encoded: Tensor, *ranks: int) -> float:
    """Largest tensor a kernel on ``encoded`` touches, in multiples of ``encoded``: a decoded
    value has t*t / r elements per encoded one, an output encoding r' / r."""
    return max(1, *(r / max(1, encoded.shape[0]) for r in ranks))


class _Operands(NamedTuple):
    """What the guard checks of one call: the tile, the ``(basis, rank it must have)`` pairs,
    the output encoder, the elements of the largest tensor touched, and whether the op's
    other operands are ones its kernel takes."""

    tile: int
    bases: list[tuple[Tensor, int | None]]
    encoder: Tensor | None
    elements: float
    takes: bool


def _encode(x, basis, tile):
    return _Operands(tile, [(basis, None)], None, x.numel() * max(1, basis.shape[0] / tile**2),
                     True)


def _decode(encoded, basis, tile, rows, cols):
    return _Operands(tile, [(basis, encoded.shape[0])], None,
                     encoded.numel() * _expansion(encoded, tile**2), True)


def _decode_epilogue(encoded, d, bias, activation, scale, tile, rows, cols):
    return _Operands(tile, [(d, encoded.shape[0])], None,
                     encoded.numel() * _expansion(encoded, tile**2), _bias_ok(bias, encoded, tile))


def _decode_act_encode(encoded, d, bias, ex, activation, scale, tile, rows, cols):
    return _Operands(tile, [(d, encoded.shape[0])], ex,
                     encoded.numel() * _expansion(encoded, ex.shape[0]),
                     _bias_ok(bias, encoded, tile))


def _decode_glu_encode(gate, gate_d, gate_bias, up, up_d, up_bias, ex, activation, scale, tile,
                       rows, cols):
    elements = max(gate.numel(), up.numel(), gate.numel() * _expansion(gate, ex.shape[0]))
    takes = (up.dtype == gate.dtype and up.shape[1:] == gate.shape[1:]
             and _bias_ok(gate_bias, gate, tile) and _bias_ok(up_bias, gate, tile))
    return _Operands(tile, [(gate_d, gate.shape[0]), (up_d, up.shape[0])], ex, elements, takes)


def _decode_norm_encode(encoded, d, bias, residual, norm, weight, norm_bias, eps, ex, keep, tile,
                        rows, cols):
    elements = encoded.numel() * _expansion(encoded, tile**2, ex.shape[0])
    takes = (_bias_ok(bias, encoded, tile) and _row_vector_ok(weight, cols)
             and _row_vector_ok(norm_bias, cols))
    return _Operands(tile, [(d, encoded.shape[0])], ex, elements, takes)


def _decode_softmax_encode(encoded, d, scale, mask, causal, ex, tile, rows, cols):
    elements = encoded.numel() * _expansion(encoded, tile**2, ex.shape[0])
    # A boolean mask, or an additive one of the scores' dtype (another dtype would promote the
    # scores, as the composite does).
    takes = mask is None or mask.dtype in (torch.bool, encoded.dtype)
    return _Operands(tile, [(d, encoded.shape[0])], ex, elements, takes)


_OPERANDS = {
    "encode": _encode,
    "decode": _decode,
    "decode_epilogue": _decode_epilogue,
    "decode_act_encode": _decode_act_encode,
    "decode_glu_encode": _decode_glu_encode,
    "decode_norm_encode": _decode_norm_encode,
    "decode_softmax_encode": _decode_softmax_encode,
}


def launcher(op: str, *args) -> Callable | None:
    """The Triton launcher of ``stl::<op>`` if the kernels take these arguments (the op's
    schema order; the first is the operand that sets device and dtype), else None."""
    impl = kernels()
    if impl is None:
        return None
    operand = args[0]
    if any(a.device != operand.device for a in args if isinstance(a, Tensor)):
        return None
    call = _OPERANDS[op](*args)
    tile, encoders = call.tile, () if call.encoder is None else (call.encoder,)
    if not (call.takes and operand.device.type == impl.KERNEL_DEVICE and call.elements < 2**31
            and impl.supports(tile, *(b for b, _ in call.bases), dtype=operand.dtype,
                              encoders=encoders)):
        return None
    for basis, rank in (*call.bases, *((e, None) for e in encoders)):
        if basis.dim() != 2 or basis.shape[1] != tile * tile or (
                rank is not None and basis.shape[0] != rank):
            return None
    return getattr(impl, op)
