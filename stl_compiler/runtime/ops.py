"""The STL custom ops: ``stl::encode`` and ``stl::decode``.

Layout (docs/math.md): for ``x (*b, n, k)`` the encoded tensor is *rank-major*,
``(r, *b, ⌈n/t⌉, ⌈k/t⌉)`` (encode zero-pads partial tiles itself), so that the ``r`` small
GEMMs are one batched matmul: ``encode(x, ex) @ encode(w, ew)`` (or a pre-encoded weight)
gives the encoded product ``(r, *b, ⌈n/t⌉, ⌈m/t⌉)``, and ``decode(yh, d, t, n, m)`` returns
``(*b, n, m)``, dropping the padding. Keeping pad and crop inside the ops keeps the graph free
of slicing, whose symbolic sizes would otherwise specialize dynamic shapes.

Each op is a ``torch.library.triton_op``: one body for every device, which runs the Triton
kernels where :func:`.triton_kernels.launcher` takes the call (CUDA) and the op's aten
composite otherwise (CPU, unsupported shapes). torch.compile traces the body, so Inductor
launches the kernels (or compiles the composite) without calling back into Python. Each op
also has a fake (meta) implementation for torch.export, an autograd formula (encode and
decode are each other's adjoints), and a plain-aten decomposition in :data:`DECOMPOSITIONS`
that exporters apply so ONNX and TensorRT see standard ops.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..tiling import from_tiles, pad_last2, round_up, to_tiles
from . import triton_kernels


def _pad_to_tiles(x: Tensor, tile: int) -> Tensor:
    return pad_last2(x, round_up(x.shape[-2], tile), round_up(x.shape[-1], tile))


def encode_aten(x: Tensor, basis: Tensor, tile: int) -> Tensor:
    """``(*b, n, k)`` → ``(r, *b, ⌈n/t⌉, ⌈k/t⌉)``: every zero-padded tile vector times
    ``basis.T``."""
    encoded = to_tiles(_pad_to_tiles(x, tile), tile) @ basis.to(x.dtype).t()
    return encoded.movedim(-1, 0)


def decode_full_aten(encoded: Tensor, basis: Tensor, tile: int) -> Tensor:
    """``(r, *b, a, c)`` → ``(*b, a*t, c*t)``, padding included."""
    tiles = encoded.movedim(0, -1) @ basis.to(encoded.dtype)
    return from_tiles(tiles, tile)


def decode_aten(encoded: Tensor, basis: Tensor, tile: int, rows: int, cols: int) -> Tensor:
    """``(r, *b, a, c)`` → ``(*b, rows, cols)``: decode, then drop the padding."""
    return decode_full_aten(encoded, basis, tile)[..., :rows, :cols]


def _check_crop(encoded: Tensor, tile: int, rows: int, cols: int) -> None:
    a, c = encoded.shape[-2], encoded.shape[-1]
    if not ((a - 1) * tile < rows <= a * tile and (c - 1) * tile < cols <= c * tile):
        raise ValueError(f"stl::decode: {rows}x{cols} does not fit {a}x{c} tiles of {tile} "
                         f"(each dim must need exactly that many tiles)")


def _run(op: str, composite, *args):
    """The body of ``stl::<op>`` after its checks: its Triton launcher where
    :func:`.triton_kernels.launcher` takes the call, else its aten composite (outputs made
    contiguous, as the kernels write them)."""
    launch = triton_kernels.launcher(op, *args)
    if launch is not None:
        return launch(*args)
    out = composite(*args)
    return tuple(o.contiguous() for o in out) if isinstance(out, tuple) else out.contiguous()


@torch.library.triton_op("stl::encode", mutates_args=())
def encode(x: Tensor, basis: Tensor, tile: int) -> Tensor:
    """Encode the t×t tiles of ``x (*b, n, k)`` (zero-padded) with ``basis (r, t*t)``
    → ``(r, *b, ⌈n/t⌉, ⌈k/t⌉)``."""
    return _run("encode", encode_aten, x, basis, tile)


@torch.library.triton_op("stl::decode", mutates_args=())
def decode(encoded: Tensor, basis: Tensor, tile: int, rows: int, cols: int) -> Tensor:
    """Decode ``encoded (r, *b, a, c)`` with ``basis (r, t*t)`` → ``(*b, rows, cols)``."""
    _check_crop(encoded, tile, rows, cols)
    return _run("decode", decode_aten, encoded, basis, tile, rows, cols)


@encode.register_fake
def _encode_fake(x: Tensor, basis: Tensor, tile: int) -> Tensor:
    *batch, n, k = x.shape
    return x.new_empty((basis.shape[0], *batch, (n + tile - 1) // tile, (k + tile - 1) // tile))


@decode.register_fake
def _decode_fake(encoded: Tensor, basis: Tensor, tile: int, rows: int, cols: int) -> Tensor:
    return encoded.new_empty((*encoded.shape[1:-2], rows, cols))


def _basis_grad(encoded_side: Tensor, plain_side: Tensor, tile: int) -> Tensor:
    """``sum over tiles of encoded[p, tile] * vec(plain tile)[q]``, shape ``(r, t*t)``.

    The two sides may differ in dtype (autocast: a bf16 product against a float32 gradient,
    when backward runs outside the autocast region): the product is formed in the wider one.
    """
    rank = encoded_side.shape[0]
    dtype = torch.promote_types(encoded_side.dtype, plain_side.dtype)
    tiles = to_tiles(_pad_to_tiles(plain_side.to(dtype), tile), tile).reshape(-1, tile * tile)
    return encoded_side.to(dtype).reshape(rank, -1) @ tiles


def _save_operands(ctx, inputs, output) -> None:
    operand, basis, tile = inputs[:3]
    ctx.tile = tile
    ctx.save_for_backward(operand, basis)


def _encode_backward(ctx, grad: Tensor):
    x, basis = ctx.saved_tensors
    rows, cols = x.shape[-2], x.shape[-1]
    grad_x = decode(grad, basis, ctx.tile, rows, cols) if ctx.needs_input_grad[0] else None
    grad_basis = _basis_grad(grad, x, ctx.tile).to(basis.dtype) if ctx.needs_input_grad[1] else None
    return grad_x, grad_basis, None


def _decode_backward(ctx, grad: Tensor):
    encoded, basis = ctx.saved_tensors
    grad_encoded = encode(grad, basis, ctx.tile) if ctx.needs_input_grad[0] else None
    grad_basis = (_basis_grad(encoded, grad, ctx.tile).to(basis.dtype)
                  if ctx.needs_input_grad[1] else None)
    return grad_encoded, grad_basis, None, None, None


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
    y = decode_full_aten(encoded, d, tile)
    if bias is not None:
        y = y + torch.nn.functional.pad(bias.to(y.dtype), (0, y.shape[-1] - bias.shape[-1]))
    return y


def _mask_padding(y: Tensor, rows: int, cols: int) -> Tensor:
    """Zero the padded rows/cols: the next encode must see zeros there, as unfused it would."""
    if type(rows) is int and type(cols) is int and (rows, cols) == tuple(y.shape[-2:]):
        return y
    keep_rows = torch.arange(y.shape[-2], device=y.device) < rows
    keep_cols = torch.arange(y.shape[-1], device=y.device) < cols
    return y * (keep_rows[:, None] & keep_cols[None, :]).to(y.dtype)


def _epilogue(encoded: Tensor, d: Tensor, bias: Tensor | None, activation: str, scale: float,
              tile: int) -> Tensor:
    """``scale * act(decode(encoded, d) + bias)`` over the padded extent."""
    check_activation(activation)
    return ACTIVATIONS[activation](_decode_affine(encoded, d, bias, tile)) * scale


def decode_epilogue_aten(encoded: Tensor, d: Tensor, bias: Tensor | None, activation: str,
                         scale: float, tile: int, rows: int, cols: int) -> Tensor:
    """``scale * act(decode(encoded, d) + bias)`` cropped to ``(*b, rows, cols)``."""
    return _epilogue(encoded, d, bias, activation, scale, tile)[..., :rows, :cols]


def decode_act_encode_aten(encoded: Tensor, d: Tensor, bias: Tensor | None, ex: Tensor,
                           activation: str, scale: float, tile: int, rows: int, cols: int
                           ) -> Tensor:
    """Encode ``scale * act(decode(encoded, d) + bias)`` with ``ex``, padding zeroed."""
    y = _epilogue(encoded, d, bias, activation, scale, tile)
    return encode_aten(_mask_padding(y, rows, cols), ex, tile)


def decode_glu_encode_aten(gate: Tensor, gate_d: Tensor, gate_bias: Tensor | None, up: Tensor,
                           up_d: Tensor, up_bias: Tensor | None, ex: Tensor, activation: str,
                           scale: float, tile: int, rows: int, cols: int) -> Tensor:
    """Gated unit (SwiGLU with ``activation="silu"``): encode ``scale*act(gate)*up``."""
    check_activation(activation)
    g = ACTIVATIONS[activation](_decode_affine(gate, gate_d, gate_bias, tile))
    y = g * _decode_affine(up, up_d, up_bias, tile) * scale
    return encode_aten(_mask_padding(y, rows, cols), ex, tile)


@torch.library.triton_op("stl::decode_epilogue", mutates_args=())
def decode_epilogue(encoded: Tensor, d: Tensor, bias: Tensor | None, activation: str,
                    scale: float, tile: int, rows: int, cols: int) -> Tensor:
    """Decode with a fused epilogue: ``scale * act(decode(encoded, d) + bias)``, cropped."""
    check_activation(activation)
    _check_crop(encoded, tile, rows, cols)
    return _run("decode_epilogue", decode_epilogue_aten, encoded, d, bias, activation, scale,
                tile, rows, cols)


@torch.library.triton_op("stl::decode_act_encode", mutates_args=())
def decode_act_encode(encoded: Tensor, d: Tensor, bias: Tensor | None, ex: Tensor,
                      activation: str, scale: float, tile: int, rows: int, cols: int) -> Tensor:
    """One layer's decode, bias, activation, and the next layer's encode, in one op."""
    check_activation(activation)
    return _run("decode_act_encode", decode_act_encode_aten, encoded, d, bias, ex, activation,
                scale, tile, rows, cols)


@torch.library.triton_op("stl::decode_glu_encode", mutates_args=())
def decode_glu_encode(gate: Tensor, gate_d: Tensor, gate_bias: Tensor | None, up: Tensor,
                      up_d: Tensor, up_bias: Tensor | None, ex: Tensor, activation: str,
                      scale: float, tile: int, rows: int, cols: int) -> Tensor:
    """Two layers' decodes, the gated product, and the next layer's encode, in one op."""
    check_activation(activation)
    return _run("decode_glu_encode", decode_glu_encode_aten, gate, gate_d, gate_bias, up, up_d,
                up_bias, ex, activation, scale, tile, rows, cols)


@decode_epilogue.register_fake
def _decode_epilogue_fake(encoded, d, bias, activation, scale, tile, rows, cols):
    return _decode_fake(encoded, d, tile, rows, cols)


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

    def backward(ctx, *grads):
        saved = iter(ctx.saved_tensors)
        args = [next(saved).detach().requires_grad_(need) if is_tensor else constant
                for is_tensor, constant, need in
                zip(ctx.is_tensor, ctx.constants, ctx.needs_input_grad)]
        wanted = [a for a, need in zip(args, ctx.needs_input_grad)
                  if need and isinstance(a, Tensor)]
        with torch.enable_grad():
            outs = composite(*args)
        # Outputs that do not depend on the inputs (an empty ``keep``) or got no gradient drop out.
        pairs = [(o, g) for o, g in zip(outs if isinstance(outs, tuple) else (outs,), grads)
                 if g is not None and o.requires_grad]
        found = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                         allow_unused=True) if pairs else [None] * len(wanted))
        return tuple(next(found) if need and isinstance(a, Tensor) else None
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


# ---------------------------------------------------------------------------------------------
# Algebraic fusion (paper Alg. 2): decode then encode of the same tile is one (r, r') matrix.


def reencode_aten(encoded: Tensor, d: Tensor, bias: Tensor | None, ex: Tensor, scale: float,
                  tile: int, rows: int, cols: int) -> Tensor:
    """``encode(scale * (decode(encoded, d) + bias), ex)`` with padding re-zeroed, computed
    without decoding: ``(d @ ex.T)`` on the rank dim plus the encoded bias (one ``(r', c)``
    table). Only the last row and column tile strips, where padding must be re-zeroed, are
    decoded and re-encoded exactly: 1/a of the tensor, never the whole activation.
    """
    t, rank_out = tile, ex.shape[0]
    a, c = encoded.shape[-2], encoded.shape[-1]
    matrix = (d.to(encoded.dtype) @ ex.to(encoded.dtype).t()) * scale
    out = torch.tensordot(matrix, encoded, dims=([0], [0]))
    if bias is not None:
        bias_tiles = torch.nn.functional.pad(bias.to(encoded.dtype), (0, c * t - bias.shape[0]))
        code = ex.to(encoded.dtype).reshape(rank_out, t, t).sum(1) @ bias_tiles.reshape(c, t).t()
        out = out + scale * code.reshape(rank_out, *[1] * (out.dim() - 2), c)
    if not (type(rows) is int and type(a) is int and rows == a * t):
        strip = decode_act_encode_aten(encoded[..., -1:, :], d, bias, ex, "none", scale, t,
                                       rows - (a - 1) * t, cols)
        out = torch.cat([out[..., :-1, :], strip], dim=-2)
    if not (type(cols) is int and type(c) is int and cols == c * t):
        last = None if bias is None else bias[(c - 1) * t:]
        strip = decode_act_encode_aten(encoded[..., :, -1:], d, last, ex, "none", scale, t,
                                       rows, cols - (c - 1) * t)
        out = torch.cat([out[..., :, :-1], strip], dim=-1)
    return out


@torch.library.triton_op("stl::reencode", mutates_args=())
def reencode(encoded: Tensor, d: Tensor, bias: Tensor | None, ex: Tensor, scale: float,
             tile: int, rows: int, cols: int) -> Tensor:
    """Algebraically fused decode → (bias, scale) → encode; see :func:`reencode_aten`. No
    Triton kernel: on every device the composite (a small matmul over the rank dim), which
    torch.compile traces and compiles like the rest of the graph."""
    _check_crop(encoded, tile, rows, cols)
    return reencode_aten(encoded, d, bias, ex, scale, tile, rows, cols).contiguous()


@reencode.register_fake
def _reencode_fake(encoded, d, bias, ex, scale, tile, rows, cols):
    return encoded.new_empty((ex.shape[0], *encoded.shape[1:]))


_register_recompute_autograd(reencode, reencode_aten)
DECOMPOSITIONS[torch.ops.stl.reencode.default] = reencode_aten


# ---------------------------------------------------------------------------------------------
# Row-strip fusion: decode → bias → residual add → LayerNorm / RMSNorm → encode. The norm mixes
# the columns of a row but never rows, so a strip of t rows is decoded, normalized and encoded
# on its own; only the tensor the rest of the graph still reads (``keep``) is written.

NORMS = ("layer", "rms")
KEEPS = ("sum", "normed", "none")


def _check_row_norm(norm: str, keep: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; supported: {NORMS}")
    if keep not in KEEPS:
        raise ValueError(f"unknown keep {keep!r}; supported: {KEEPS}")


def row_norm(h: Tensor, norm: str, weight: Tensor | None, bias: Tensor | None,
             eps: float | None) -> Tensor:
    """LayerNorm or RMSNorm over the last dim, computed in (at least) float32 and rounded to
    ``h.dtype`` before the affine weight and bias (as HF's ``LlamaRMSNorm`` does;
    ``nn.LayerNorm`` rounds once after them: one rounding apart in 16-bit dtypes)."""
    h32 = h.to(torch.promote_types(h.dtype, torch.float32))
    eps = torch.finfo(h.dtype).eps if eps is None else eps
    if norm == "layer":
        h32 = h32 - h32.mean(-1, keepdim=True)
    n = (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    if weight is not None:
        n = n * weight.to(h.dtype)
    if bias is not None:
        n = n + bias.to(h.dtype)
    return n


def check_decode_norm_encode(encoded: Tensor, residual: Tensor | None, norm: str, keep: str,
                             tile: int, rows: int, cols: int) -> None:
    """The argument checks of ``stl::decode_norm_encode`` (shared with its CUDA kernel): known
    norm and keep, a crop that fits the tiles, and a residual of the encoded dtype that
    broadcasts to the decoded ``(*b, rows, cols)`` over batch dims only."""
    _check_row_norm(norm, keep)
    _check_crop(encoded, tile, rows, cols)
    if residual is None:
        return
    shape = (*encoded.shape[1:-2], rows, cols)
    fits = (residual.dim() <= len(shape) and tuple(residual.shape[-2:]) == tuple(shape[-2:])
            and all(r in (1, s) for r, s in zip(residual.shape[::-1], shape[::-1])))
    if not fits:
        raise ValueError(f"stl::decode_norm_encode: a residual of shape {tuple(residual.shape)} "
                         f"does not broadcast to the decoded {tuple(shape)} over batch dims")
    if residual.dtype != encoded.dtype:
        raise ValueError(f"stl::decode_norm_encode: the residual is {residual.dtype} but the "
                         f"encoded tensor is {encoded.dtype}; cast one of them first")


def decode_norm_encode_aten(encoded: Tensor, d: Tensor, bias: Tensor | None,
                            residual: Tensor | None, norm: str, weight: Tensor | None,
                            norm_bias: Tensor | None, eps: float | None, ex: Tensor, keep: str,
                            tile: int, rows: int, cols: int) -> tuple[Tensor, Tensor]:
    """``h = residual + decode(encoded, d) + bias`` (the residual broadcast over batch dims),
    ``n = norm(h)``; returns ``(kept, encode(n, ex))`` where ``kept`` is ``h``
    (``keep="sum"``), ``n`` (``"normed"``) or an empty tensor."""
    _check_row_norm(norm, keep)
    h = decode_epilogue_aten(encoded, d, bias, "none", 1.0, tile, rows, cols)
    if residual is not None:
        h = residual + h
    n = row_norm(h, norm, weight, norm_bias, eps)
    kept = {"sum": h, "normed": n}.get(keep, h.new_empty(0))
    return kept, encode_aten(n, ex, tile)


@torch.library.triton_op("stl::decode_norm_encode", mutates_args=())
def decode_norm_encode(encoded: Tensor, d: Tensor, bias: Tensor | None, residual: Tensor | None,
                       norm: str, weight: Tensor | None, norm_bias: Tensor | None,
                       eps: float | None, ex: Tensor, keep: str, tile: int, rows: int, cols: int
                       ) -> tuple[Tensor, Tensor]:
    """One layer's decode, bias and residual add, a LayerNorm/RMSNorm, and the next layers'
    encode, in one op; see :func:`decode_norm_encode_aten`."""
    check_decode_norm_encode(encoded, residual, norm, keep, tile, rows, cols)
    return _run("decode_norm_encode", decode_norm_encode_aten, encoded, d, bias, residual, norm,
                weight, norm_bias, eps, ex, keep, tile, rows, cols)


@decode_norm_encode.register_fake
def _decode_norm_encode_fake(encoded, d, bias, residual, norm, weight, norm_bias, eps, ex, keep,
                             tile, rows, cols):
    _check_row_norm(norm, keep)
    kept_shape = (0,) if keep == "none" else (*encoded.shape[1:-2], rows, cols)
    return encoded.new_empty(kept_shape), encoded.new_empty((ex.shape[0], *encoded.shape[1:]))


_register_recompute_autograd(decode_norm_encode, decode_norm_encode_aten)
DECOMPOSITIONS[torch.ops.stl.decode_norm_encode.default] = decode_norm_encode_aten


# Attention: decode(QKᵀ) → scale → mask → softmax → encode for AV, one strip of t query rows
# at a time (softmax normalizes along the key dim, within a row).


def causal_mask(rows: int, cols: int, device: torch.device | None = None) -> Tensor:
    """The keys a query row may not see: ``~ones(rows, cols, dtype=bool).tril()``, True
    above the diagonal (``masked_fill(scores, causal_mask(...), -inf)``).

    The one definition of the causal mask: ``decompose_sdpa`` writes it into graphs,
    ``stl::decode_softmax_encode(causal=True)`` applies it, and
    :func:`stl_compiler.passes.detect_causal.is_causal_mask` matches the aten ops it traces
    to (:func:`causal_mask_ops`)."""
    return ~torch.ones(rows, cols, dtype=torch.bool, device=device).tril()


@functools.cache
def causal_mask_ops() -> tuple[torch._ops.OpOverload, ...]:
    """The aten ops :func:`causal_mask` traces to, first to last (``ones``, ``tril``,
    ``bitwise_not``), for matchers of the mask in captured graphs."""
    from torch.fx.experimental.proxy_tensor import make_fx

    graph = make_fx(lambda: causal_mask(2, 3))().graph
    return tuple(node.target for node in graph.nodes if node.op == "call_function")


def _masked_scores(encoded: Tensor, d: Tensor, scale: float, mask: Tensor | None, causal: bool,
                   tile: int, rows: int, cols: int) -> Tensor:
    s = decode_aten(encoded, d, tile, rows, cols) * scale
    if causal:
        s = s.masked_fill(causal_mask(rows, cols, s.device), float("-inf"))
    if mask is not None:
        s = s.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    return s


def decode_softmax_encode_aten(encoded: Tensor, d: Tensor, scale: float, mask: Tensor | None,
                               causal: bool, ex: Tensor, tile: int, rows: int, cols: int
                               ) -> Tensor:
    """``encode(softmax(scale * decode(encoded, d) + mask, -1), ex)``: ``mask`` is a boolean
    tensor (True: masked out, as ``masked_fill``) or an additive one, broadcast to the scores;
    ``causal`` masks keys after the query (``ones(rows, cols).tril()`` kept). A fully masked
    query row (every score -inf: left padding) gets probabilities 0, as in
    ``scaled_dot_product_attention`` (``aten._safe_softmax``), where a plain softmax gives NaN
    (which the next encode would spread over the whole tile row)."""
    s = _masked_scores(encoded, d, scale, mask, causal, tile, rows, cols)
    return encode_aten(torch.ops.aten._safe_softmax.default(s, -1), ex, tile)


@torch.library.triton_op("stl::decode_softmax_encode", mutates_args=())
def decode_softmax_encode(encoded: Tensor, d: Tensor, scale: float, mask: Tensor | None,
                          causal: bool, ex: Tensor, tile: int, rows: int, cols: int) -> Tensor:
    """Attention scores' decode, scale, mask and softmax, and the AV site's encode, in one op;
    see :func:`decode_softmax_encode_aten`."""
    _check_crop(encoded, tile, rows, cols)
    return _run("decode_softmax_encode", decode_softmax_encode_aten, encoded, d, scale, mask,
                causal, ex, tile, rows, cols)


@decode_softmax_encode.register_fake
def _decode_softmax_encode_fake(encoded, d, scale, mask, causal, ex, tile, rows, cols):
    return encoded.new_empty((ex.shape[0], *encoded.shape[1:]))


_register_recompute_autograd(decode_softmax_encode, decode_softmax_encode_aten)
DECOMPOSITIONS[torch.ops.stl.decode_softmax_encode.default] = decode_softmax_encode_aten

# Every op is defined: name their Triton kernels to torch's compile caches.
triton_kernels.record_kernels()
