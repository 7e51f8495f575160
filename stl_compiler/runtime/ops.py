"""The STL custom ops: ``stl::encode`` and ``stl::decode``.

Layout (docs/math.md): for ``x (*b, n, k)`` with n, k multiples of the tile t, the encoded
tensor is *rank-major*, ``(r, *b, n/t, k/t)``, so that ``r`` small GEMMs are one batched
matmul: ``encode(x, ex) @ encode(w, ew)`` (or a pre-encoded weight ``(r, k/t, m/t)``) gives the
encoded product ``(r, *b, n/t, m/t)``, and ``decode(yh, d)`` returns ``(*b, n, m)``.

Each op has a fake (meta) implementation for torch.export / Inductor, an autograd formula
(encode and decode are each other's adjoints), and a plain-aten decomposition in
:data:`DECOMPOSITIONS` that exporters apply so ONNX and TensorRT see standard ops.
CUDA kernels (Triton) register themselves for the same ops in :mod:`.triton_kernels`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..tiling import from_tiles, to_tiles


def encode_aten(x: Tensor, basis: Tensor, tile: int) -> Tensor:
    """``(*b, n, k)`` → ``(r, *b, n/t, k/t)``: every tile vector times ``basis.T``."""
    encoded = to_tiles(x, tile) @ basis.to(x.dtype).t()
    return encoded.movedim(-1, 0)


def decode_aten(encoded: Tensor, basis: Tensor, tile: int) -> Tensor:
    """``(r, *b, a, c)`` → ``(*b, a*t, c*t)``: every encoded vector times ``basis``."""
    tiles = encoded.movedim(0, -1) @ basis.to(encoded.dtype)
    return from_tiles(tiles, tile)


def _check_divisible(x: Tensor, tile: int, what: str) -> None:
    if x.shape[-1] % tile or x.shape[-2] % tile:
        raise ValueError(f"stl::{what} needs the last two dims to be multiples of the tile "
                         f"{tile}, got {tuple(x.shape)}; pad first (stl_matmul does)")


@torch.library.custom_op("stl::encode", mutates_args=())
def encode(x: Tensor, basis: Tensor, tile: int) -> Tensor:
    """Encode the t×t tiles of ``x (*b, n, k)`` with ``basis (r, t*t)`` → ``(r, *b, n/t, k/t)``."""
    _check_divisible(x, tile, "encode")
    return encode_aten(x, basis, tile).contiguous()


@torch.library.custom_op("stl::decode", mutates_args=())
def decode(encoded: Tensor, basis: Tensor, tile: int) -> Tensor:
    """Decode ``encoded (r, *b, a, c)`` with ``basis (r, t*t)`` → ``(*b, a*t, c*t)``."""
    return decode_aten(encoded, basis, tile).contiguous()


@encode.register_fake
def _encode_fake(x: Tensor, basis: Tensor, tile: int) -> Tensor:
    *batch, n, k = x.shape
    return x.new_empty((basis.shape[0], *batch, n // tile, k // tile))


@decode.register_fake
def _decode_fake(encoded: Tensor, basis: Tensor, tile: int) -> Tensor:
    _, *batch, a, c = encoded.shape
    return encoded.new_empty((*batch, a * tile, c * tile))


def _basis_grad(encoded_side: Tensor, plain_side: Tensor, tile: int) -> Tensor:
    """``sum over tiles of encoded[p, tile] * vec(plain tile)[q]``, shape ``(r, t*t)``."""
    rank = encoded_side.shape[0]
    tiles = to_tiles(plain_side, tile).reshape(-1, tile * tile)
    return encoded_side.reshape(rank, -1) @ tiles


def _save_operands(ctx, inputs, output) -> None:
    operand, basis, tile = inputs
    ctx.tile = tile
    ctx.save_for_backward(operand, basis)


def _encode_backward(ctx, grad: Tensor):
    x, basis = ctx.saved_tensors
    grad_x = decode(grad, basis, ctx.tile) if ctx.needs_input_grad[0] else None
    grad_basis = _basis_grad(grad, x, ctx.tile).to(basis.dtype) if ctx.needs_input_grad[1] else None
    return grad_x, grad_basis, None


def _decode_backward(ctx, grad: Tensor):
    encoded, basis = ctx.saved_tensors
    grad_encoded = encode(grad, basis, ctx.tile) if ctx.needs_input_grad[0] else None
    grad_basis = (_basis_grad(encoded, grad, ctx.tile).to(basis.dtype)
                  if ctx.needs_input_grad[1] else None)
    return grad_encoded, grad_basis, None


encode.register_autograd(_encode_backward, setup_context=_save_operands)
decode.register_autograd(_decode_backward, setup_context=_save_operands)

#: Plain-aten decompositions of the STL ops, for ``ExportedProgram.run_decompositions``.
DECOMPOSITIONS = {
    torch.ops.stl.encode.default: encode_aten,
    torch.ops.stl.decode.default: decode_aten,
}


# ---------------------------------------------------------------------------------------------
# Fused ops: decode → bias → element-wise activation → (mask padding) → encode.
# The decoded tensor exists only inside the op (in registers in the CUDA kernel).

ACTIVATIONS = {
    "none": lambda v: v,
    "relu": torch.relu,
    "gelu": lambda v: torch.nn.functional.gelu(v),
    "gelu_tanh": lambda v: torch.nn.functional.gelu(v, approximate="tanh"),
    "silu": torch.nn.functional.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; supported: {sorted(ACTIVATIONS)}")


def _decode_affine(encoded: Tensor, d: Tensor, bias: Tensor | None, tile: int) -> Tensor:
    y = decode_aten(encoded, d, tile)
    if bias is not None:
        y = y + torch.nn.functional.pad(bias.to(y.dtype), (0, y.shape[-1] - bias.shape[-1]))
    return y


def _mask_padding(y: Tensor, rows: int, cols: int) -> Tensor:
    """Zero the padded rows/cols: the next encode must see zeros there, as unfused it would."""
    if rows == y.shape[-2] and cols == y.shape[-1]:
        return y
    keep_rows = torch.arange(y.shape[-2], device=y.device) < rows
    keep_cols = torch.arange(y.shape[-1], device=y.device) < cols
    return y * (keep_rows[:, None] & keep_cols[None, :]).to(y.dtype)


def decode_epilogue_aten(encoded: Tensor, d: Tensor, bias: Tensor | None, activation: str,
                         scale: float, tile: int) -> Tensor:
    """``scale * act(decode(encoded, d) + bias)`` (bias zero-padded to the padded width)."""
    check_activation(activation)
    return ACTIVATIONS[activation](_decode_affine(encoded, d, bias, tile)) * scale


def decode_act_encode_aten(encoded: Tensor, d: Tensor, bias: Tensor | None, ex: Tensor,
                           activation: str, scale: float, tile: int, rows: int, cols: int
                           ) -> Tensor:
    """Encode ``scale * act(decode(encoded, d) + bias)`` with ``ex``, padding zeroed."""
    y = decode_epilogue_aten(encoded, d, bias, activation, scale, tile)
    return encode_aten(_mask_padding(y, rows, cols), ex, tile)


def decode_glu_encode_aten(gate: Tensor, gate_d: Tensor, gate_bias: Tensor | None, up: Tensor,
                           up_d: Tensor, up_bias: Tensor | None, ex: Tensor, activation: str,
                           scale: float, tile: int, rows: int, cols: int) -> Tensor:
    """Gated unit (SwiGLU with ``activation="silu"``): encode ``scale*act(gate)*up``."""
    check_activation(activation)
    g = ACTIVATIONS[activation](_decode_affine(gate, gate_d, gate_bias, tile))
    y = g * _decode_affine(up, up_d, up_bias, tile) * scale
    return encode_aten(_mask_padding(y, rows, cols), ex, tile)


@torch.library.custom_op("stl::decode_epilogue", mutates_args=())
def decode_epilogue(encoded: Tensor, d: Tensor, bias: Tensor | None, activation: str,
                    scale: float, tile: int) -> Tensor:
    """Decode with a fused epilogue: ``scale * act(decode(encoded, d) + bias)``."""
    return decode_epilogue_aten(encoded, d, bias, activation, scale, tile).contiguous()


@torch.library.custom_op("stl::decode_act_encode", mutates_args=())
def decode_act_encode(encoded: Tensor, d: Tensor, bias: Tensor | None, ex: Tensor,
                      activation: str, scale: float, tile: int, rows: int, cols: int) -> Tensor:
    """One layer's decode, bias, activation, and the next layer's encode, in one op."""
    return decode_act_encode_aten(encoded, d, bias, ex, activation, scale, tile, rows,
                                  cols).contiguous()


@torch.library.custom_op("stl::decode_glu_encode", mutates_args=())
def decode_glu_encode(gate: Tensor, gate_d: Tensor, gate_bias: Tensor | None, up: Tensor,
                      up_d: Tensor, up_bias: Tensor | None, ex: Tensor, activation: str,
                      scale: float, tile: int, rows: int, cols: int) -> Tensor:
    """Two layers' decodes, the gated product, and the next layer's encode, in one op."""
    return decode_glu_encode_aten(gate, gate_d, gate_bias, up, up_d, up_bias, ex, activation,
                                  scale, tile, rows, cols).contiguous()


@decode_epilogue.register_fake
def _decode_epilogue_fake(encoded, d, bias, activation, scale, tile):
    return _decode_fake(encoded, d, tile)


@decode_act_encode.register_fake
def _decode_act_encode_fake(encoded, d, bias, ex, activation, scale, tile, rows, cols):
    return encoded.new_empty((ex.shape[0], *encoded.shape[1:]))


@decode_glu_encode.register_fake
def _decode_glu_encode_fake(gate, gate_d, gate_bias, up, up_d, up_bias, ex, activation, scale,
                            tile, rows, cols):
    return gate.new_empty((ex.shape[0], *gate.shape[1:]))


def _register_recompute_autograd(op, composite) -> None:
    """Autograd for a fused op: rebuild its aten composite in backward and differentiate it.

    The forward keeps no decoded activation; backward recomputes it (as activation
    checkpointing would), so training memory stays that of the encoded tensors.
    """

    def setup_context(ctx, inputs, output):
        ctx.is_tensor = [isinstance(v, Tensor) for v in inputs]
        ctx.constants = [None if t else v for v, t in zip(inputs, ctx.is_tensor)]
        ctx.save_for_backward(*[v for v in inputs if isinstance(v, Tensor)])

    def backward(ctx, grad):
        saved = iter(ctx.saved_tensors)
        args = [next(saved).detach().requires_grad_(need) if is_tensor else constant
                for is_tensor, constant, need in
                zip(ctx.is_tensor, ctx.constants, ctx.needs_input_grad)]
        wanted = [a for a, need in zip(args, ctx.needs_input_grad)
                  if need and isinstance(a, Tensor)]
        with torch.enable_grad():
            out = composite(*args)
        grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True) if wanted else ())
        return tuple(next(grads) if need and isinstance(a, Tensor) else None
                     for a, need in zip(args, ctx.needs_input_grad))

    op.register_autograd(backward, setup_context=setup_context)


_register_recompute_autograd(decode_epilogue, decode_epilogue_aten)
_register_recompute_autograd(decode_act_encode, decode_act_encode_aten)
_register_recompute_autograd(decode_glu_encode, decode_glu_encode_aten)

DECOMPOSITIONS.update({
    torch.ops.stl.decode_epilogue.default: decode_epilogue_aten,
    torch.ops.stl.decode_act_encode.default: decode_act_encode_aten,
    torch.ops.stl.decode_glu_encode.default: decode_glu_encode_aten,
})


def reencode(encoded: Tensor, d: Tensor, ex: Tensor, scale: float = 1.0) -> Tensor:
    """``encode(scale * decode(encoded, d), ex)`` without decoding (paper Alg. 2).

    Decode then encode of the same tile is the ``(r, r_next)`` matrix ``d @ ex.T``; valid
    only when no padded row/col must be re-zeroed in between. Plain aten ops: export and
    Inductor see a small matmul, which constant-folds for fixed bases.
    """
    matrix = (d @ ex.t()).to(encoded.dtype) * scale
    return torch.tensordot(matrix, encoded, dims=([0], [0]))
