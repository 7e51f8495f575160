"""The STL custom ops: stl::encode / stl::decode and the fused decode→…→encode ops.

References here are written independently of stl_compiler.runtime: explicit loops over tiles
for encode/decode, torch.nn.functional for the activations, slicing + re-padding for the
fused ops (with stl_compiler.tiling.to_tiles as the only shared helper).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from stl_helpers import rel_err

from stl_compiler.runtime import ops
from stl_compiler.tiling import to_tiles

f64 = torch.float64

REF_ACTIVATIONS = {
    "none": lambda v: v,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"),
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


def ref_encode(x: torch.Tensor, basis: torch.Tensor, t: int) -> torch.Tensor:
    """Loop over tiles: out[p, *b, i, j] = basis[p] · vec_row_major(x[..., tile i, tile j])."""
    *batch, n, k = x.shape
    out = torch.zeros(basis.shape[0], *batch, n // t, k // t, dtype=x.dtype)
    for i in range(n // t):
        for j in range(k // t):
            vec = x[..., i * t:(i + 1) * t, j * t:(j + 1) * t].reshape(*batch, t * t)
            out[..., i, j] = (vec @ basis.T).movedim(-1, 0)
    return out


def ref_decode(encoded: torch.Tensor, basis: torch.Tensor, t: int) -> torch.Tensor:
    """Loop over tiles: y[..., tile i, tile j] = (basis.T @ encoded[:, ..., i, j]) as t×t."""
    _, *batch, a, c = encoded.shape
    y = torch.zeros(*batch, a * t, c * t, dtype=encoded.dtype)
    for i in range(a):
        for j in range(c):
            vec = encoded[..., i, j].movedim(0, -1) @ basis
            y[..., i * t:(i + 1) * t, j * t:(j + 1) * t] = vec.reshape(*batch, t, t)
    return y


def repad_and_encode(y: torch.Tensor, ex: torch.Tensor, t: int, shape) -> torch.Tensor:
    """Zero-pad ``y`` back to ``shape[-2:]`` and encode through to_tiles."""
    y = F.pad(y, (0, shape[-1] - y.shape[-1], 0, shape[-2] - y.shape[-2]))
    return (to_tiles(y, t) @ ex.T).movedim(-1, 0)


# --- encode / decode -----------------------------------------------------------------------

@pytest.mark.parametrize("t, shape", [(2, (4, 6)), (3, (2, 6, 3)), (4, (2, 1, 8, 4))])
def test_encode_decode_layout(t, shape):
    r = 5
    x = torch.randn(shape, dtype=f64)
    basis = torch.randn(r, t * t, dtype=f64)
    xh = ops.encode(x, basis, t)
    assert xh.shape == (r, *shape[:-2], shape[-2] // t, shape[-1] // t)  # rank-major
    assert torch.allclose(xh, ref_encode(x, basis, t), atol=1e-12)
    y = ops.decode(xh, basis, t)
    assert y.shape == x.shape
    assert torch.allclose(y, ref_decode(xh, basis, t), atol=1e-12)


def test_identity_basis_round_trip():
    t = 3
    x = torch.randn(2, 6, 9)
    eye = torch.eye(t * t)
    assert torch.equal(ops.decode(ops.encode(x, eye, t), eye, t), x)


def test_encode_and_decode_are_adjoint():
    t, r = 2, 3
    x, basis = torch.randn(4, 6, dtype=f64), torch.randn(r, t * t, dtype=f64)
    y = torch.randn(r, 2, 3, dtype=f64)
    lhs = (ops.encode(x, basis, t) * y).sum()
    rhs = (x * ops.decode(y, basis, t)).sum()
    assert torch.allclose(lhs, rhs, atol=1e-12)


def test_encode_needs_tile_multiples():
    with pytest.raises(ValueError, match="multiples of the tile 2"):
        ops.encode(torch.randn(3, 4), torch.randn(3, 4), 2)


def test_encode_decode_follow_input_dtype():
    basis = torch.randn(3, 4, dtype=f64)
    xh = ops.encode(torch.randn(4, 4), basis, 2)
    assert xh.dtype == torch.float32
    assert ops.decode(xh, basis, 2).dtype == torch.float32


def test_gradcheck_encode_decode():
    t = 2
    x = torch.randn(2, 4, 6, dtype=f64, requires_grad=True)
    basis = torch.randn(3, t * t, dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.encode(a, b, t), (x, basis))
    yh = torch.randn(3, 2, 2, 3, dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.decode(a, b, t), (yh, basis))


def test_opcheck_encode_decode():
    x = torch.randn(2, 4, 6, dtype=f64, requires_grad=True)
    basis = torch.randn(3, 4, dtype=f64, requires_grad=True)
    torch.library.opcheck(ops.encode, (x, basis, 2))
    torch.library.opcheck(ops.decode, (torch.randn(3, 2, 2, 3, dtype=f64, requires_grad=True),
                                       basis, 2))


def test_decompositions_match_ops():
    x, basis = torch.randn(2, 4, 6), torch.randn(3, 4)
    decomp = ops.DECOMPOSITIONS
    xh = torch.ops.stl.encode(x, basis, 2)
    assert torch.allclose(decomp[torch.ops.stl.encode.default](x, basis, 2), xh)
    assert torch.allclose(decomp[torch.ops.stl.decode.default](xh, basis, 2),
                          torch.ops.stl.decode(xh, basis, 2))


# --- fused ops -----------------------------------------------------------------------------

def test_activation_table_is_covered():
    assert set(ops.ACTIVATIONS) == set(REF_ACTIVATIONS)


def _operands(r=3, r_next=4, t=2, batch=(2,), a=2, c=3):
    encoded = torch.randn(r, *batch, a, c, dtype=f64)
    d = torch.randn(r, t * t, dtype=f64)
    ex = torch.randn(r_next, t * t, dtype=f64)
    return encoded, d, ex


@pytest.mark.parametrize("activation", sorted(REF_ACTIVATIONS))
@pytest.mark.parametrize("with_bias", [True, False])
def test_decode_epilogue_equals_unfused(activation, with_bias):
    encoded, d, _ = _operands()
    bias = torch.randn(6, dtype=f64) if with_bias else None
    y = ops.decode_epilogue(encoded, d, bias, activation, 0.5, 2)
    pre = ref_decode(encoded, d, 2) + (bias if with_bias else 0.0)
    assert rel_err(y, REF_ACTIVATIONS[activation](pre) * 0.5) < 1e-12


@pytest.mark.parametrize("activation", sorted(REF_ACTIVATIONS))
@pytest.mark.parametrize("rows, cols, with_bias", [(4, 6, True), (3, 5, True), (3, 5, False),
                                                   (1, 6, True)])
def test_decode_act_encode_equals_unfused(activation, rows, cols, with_bias):
    t = 2
    encoded, d, ex = _operands(t=t)
    bias = torch.randn(cols, dtype=f64) if with_bias else None
    fused = ops.decode_act_encode(encoded, d, bias, ex, activation, 1.5, t, rows, cols)
    y = ref_decode(encoded, d, t)[..., :rows, :cols]
    if with_bias:
        y = y + bias
    y = REF_ACTIVATIONS[activation](y) * 1.5
    expected = repad_and_encode(y, ex, t, (4, 6))
    assert fused.shape == (ex.shape[0], *encoded.shape[1:])
    assert rel_err(fused, expected) < 1e-12


@pytest.mark.parametrize("activation", ["silu", "gelu", "relu", "none"])
@pytest.mark.parametrize("rows, cols, biases", [(4, 6, (True, True)), (3, 5, (True, False)),
                                                (3, 4, (False, True)), (2, 6, (False, False))])
def test_decode_glu_encode_equals_unfused(activation, rows, cols, biases):
    t = 2
    gate, gate_d, ex = _operands(t=t)
    up, up_d, _ = _operands(t=t)
    gate_bias = torch.randn(cols, dtype=f64) if biases[0] else None
    up_bias = torch.randn(cols, dtype=f64) if biases[1] else None
    fused = ops.decode_glu_encode(gate, gate_d, gate_bias, up, up_d, up_bias, ex, activation,
                                  0.25, t, rows, cols)
    g = ref_decode(gate, gate_d, t)[..., :rows, :cols]
    u = ref_decode(up, up_d, t)[..., :rows, :cols]
    if gate_bias is not None:
        g = g + gate_bias
    if up_bias is not None:
        u = u + up_bias
    y = REF_ACTIVATIONS[activation](g) * u * 0.25
    assert rel_err(fused, repad_and_encode(y, ex, t, (4, 6))) < 1e-12


def test_decode_encode_without_activation_is_one_rank_by_rank_matrix():
    """Paper Alg. 2: decode→encode with nothing in between is the r'×r matrix ex @ d.T."""
    t = 2
    encoded, d, ex = _operands(t=t)
    fused = ops.decode_act_encode(encoded, d, None, ex, "none", 1.0, t, 4, 6)
    expected = torch.einsum("qp,p...->q...", ex @ d.T, encoded)
    assert rel_err(fused, expected) < 1e-12


def test_unknown_activation_raises():
    encoded, d, ex = _operands()
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        ops.decode_epilogue(encoded, d, None, "swish", 1.0, 2)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        ops.decode_act_encode(encoded, d, None, ex, "swish", 1.0, 2, 4, 6)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        ops.decode_glu_encode(encoded, d, None, encoded, d, None, ex, "swish", 1.0, 2, 4, 6)


def _req(*tensors):
    return tuple(v.clone().requires_grad_(True) for v in tensors)


def test_gradcheck_decode_epilogue():
    encoded, d, _ = _operands()
    encoded, d, bias = _req(encoded, d, torch.randn(6, dtype=f64))
    for activation in ("gelu", "tanh"):
        assert torch.autograd.gradcheck(
            lambda e, dd, b, act=activation: ops.decode_epilogue(e, dd, b, act, 0.5, 2),
            (encoded, d, bias))


def test_gradcheck_decode_act_encode():
    encoded, d, ex = _operands()
    encoded, d, ex, bias = _req(encoded, d, ex, torch.randn(5, dtype=f64))
    assert torch.autograd.gradcheck(
        lambda e, dd, b, x: ops.decode_act_encode(e, dd, b, x, "silu", 0.5, 2, 3, 5),
        (encoded, d, bias, ex))
    assert torch.autograd.gradcheck(  # bias None, only some inputs requiring grad
        lambda e, x: ops.decode_act_encode(e, d.detach(), None, x, "sigmoid", 1.0, 2, 4, 6),
        (encoded, ex))


def test_gradcheck_decode_glu_encode():
    gate, gate_d, ex = _operands()
    up, up_d, _ = _operands()
    args = _req(gate, gate_d, torch.randn(5, dtype=f64), up, up_d, torch.randn(5, dtype=f64), ex)

    def f(g, gd, gb, u, ud, ub, x):
        return ops.decode_glu_encode(g, gd, gb, u, ud, ub, x, "silu", 0.5, 2, 3, 5)

    assert torch.autograd.gradcheck(f, args)


# The AOT-dispatch check (slow: it traces with torch.compile machinery) runs for encode/decode
# above; the fused ops get schema, autograd-registration and fake-tensor checks.
FAST_OPCHECKS = ("test_schema", "test_autograd_registration", "test_faketensor")


def test_opcheck_fused_ops():
    encoded, d, ex = _operands()
    encoded, d, ex, bias = _req(encoded, d, ex, torch.randn(5, dtype=f64))
    checks = {"test_utils": FAST_OPCHECKS}
    torch.library.opcheck(ops.decode_epilogue, (encoded, d, bias, "gelu", 0.5, 2), **checks)
    torch.library.opcheck(ops.decode_act_encode, (encoded, d, bias, ex, "silu", 0.5, 2, 3, 5),
                          **checks)
    torch.library.opcheck(ops.decode_glu_encode,
                          (encoded, d, None, encoded.detach().clone(), d, bias, ex, "silu", 1.0,
                           2, 3, 5), **checks)


def test_fused_decompositions_match_ops():
    encoded, d, ex = _operands()
    bias = torch.randn(5, dtype=f64)
    decomp = ops.DECOMPOSITIONS
    assert torch.equal(decomp[torch.ops.stl.decode_act_encode.default](
        encoded, d, bias, ex, "gelu", 1.0, 2, 3, 5),
        ops.decode_act_encode(encoded, d, bias, ex, "gelu", 1.0, 2, 3, 5))
    assert torch.equal(decomp[torch.ops.stl.decode_epilogue.default](
        encoded, d, None, "relu", 2.0, 2), ops.decode_epilogue(encoded, d, None, "relu", 2.0, 2))
    assert torch.equal(decomp[torch.ops.stl.decode_glu_encode.default](
        encoded, d, bias, encoded, d, None, ex, "silu", 1.0, 2, 3, 5),
        ops.decode_glu_encode(encoded, d, bias, encoded, d, None, ex, "silu", 1.0, 2, 3, 5))
