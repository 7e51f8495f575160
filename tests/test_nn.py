"""STLLinear: exactness against nn.Linear, row groupings, autograd, state_dict, errors."""

from __future__ import annotations

import pytest
import torch
from stl_helpers import rel_err
from torch import nn
from torch.func import functional_call

from stl_compiler import STLLinear, bases, dense_flops, stl_flops
from stl_compiler.nn import STLMatmul
from stl_compiler.tiling import row_separable

K, M = 10, 7  # not multiples of 2, 3 or 4
INPUT_SHAPES = [(K,), (5, K), (2, 5, K), (2, 3, 5, K)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
# "batch" grouping takes only row-separable bases: naive yes, strassen no (raises, below)
@pytest.mark.parametrize("name, row_grouping", [
    ("strassen2", "tokens"), ("strassen4", "tokens"), ("naive3", "tokens"), ("naive3", "batch"),
    ("naive4", "batch"), ("row_separable4", "batch")])
def test_from_linear_exact_matches_linear(name, row_grouping, bias, dtype):
    basis = {"strassen2": bases.strassen(2), "strassen4": bases.strassen(4),
             "naive3": bases.naive(3), "naive4": bases.naive(4),
             "row_separable4": row_separable(4, 64)}[name]
    linear = nn.Linear(K, M, bias=bias, dtype=dtype)
    if bias:
        nn.init.normal_(linear.bias)
    layer = STLLinear.from_linear(linear, basis, row_grouping=row_grouping)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for shape in INPUT_SHAPES:
        x = torch.randn(shape, dtype=dtype)
        y, expected = layer(x), linear(x)
        assert y.dtype == dtype
        assert rel_err(y, expected) < tol, shape


def test_parameter_shapes():
    layer = STLLinear.from_linear(nn.Linear(K, M), bases.random(4, 6))
    assert layer.weight_encoded.shape == (6, 3, 2)  # (rank, ceil(K/t), ceil(M/t))
    assert layer.ex.shape == layer.d.shape == (6, 16)
    assert layer.bias.shape == (M,)
    names = {name for name, _ in layer.named_parameters()}
    assert names == {"weight_encoded", "ex", "d", "bias"}
    assert STLLinear(K, M, 4, 6, bias=False).bias is None


def test_from_linear_encodes_with_ew():
    basis = bases.random(2, 3, seed=5)
    linear = nn.Linear(4, 6, dtype=torch.float64)
    layer = STLLinear.from_linear(linear, basis)
    wt = linear.weight.detach().t()  # (K, M), the STL right operand
    for p in range(3):
        for i in range(2):
            for j in range(3):
                tile = wt[2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(-1)
                assert torch.allclose(layer.weight_encoded[p, i, j], basis.ew[p] @ tile)
    assert torch.equal(layer.ex.detach(), basis.ex) and torch.equal(layer.d.detach(), basis.d)


# --- row grouping (inexact basis) ----------------------------------------------------------

def _inexact_layer(row_grouping):
    linear = nn.Linear(8, 8, dtype=torch.float64)
    # "batch" grouping takes only row-separable bases; row_separable(4, 8) is inexact too
    basis = bases.random(4, 6, seed=0) if row_grouping == "tokens" else row_separable(4, 8)
    return STLLinear.from_linear(linear, basis, row_grouping=row_grouping)


@pytest.mark.parametrize("shape", [(5, 9, 8), (2, 3, 9, 8)])
def test_batch_grouping_is_position_local(shape):
    layer = _inexact_layer("batch")
    x = torch.randn(shape, dtype=torch.float64)
    y = layer(x)
    i = 1
    x2 = x.clone()
    x2[..., i + 1:, :] += torch.randn_like(x2[..., i + 1:, :])  # the future
    x2[..., :i, :] += torch.randn_like(x2[..., :i, :])          # the past
    y2 = layer(x2)
    assert torch.equal(y2[..., i, :], y[..., i, :])
    assert not torch.allclose(y2[..., i + 1, :], y[..., i + 1, :])
    # Sequences stay independent: perturbing another sequence at the same position (same
    # tile) leaves this one bit-for-bit unchanged (row-separable basis).
    x3 = x.clone()
    x3.view(-1, shape[-2], shape[-1])[1, i] += 1.0
    y3 = layer(x3).view(-1, shape[-2], shape[-1])
    assert torch.equal(y3[0, i], y.view(-1, shape[-2], shape[-1])[0, i])
    assert not torch.allclose(y3[1, i], y.view(-1, shape[-2], shape[-1])[1, i])


def test_tokens_grouping_leaks_within_a_tile():
    layer = _inexact_layer("tokens")
    x = torch.randn(3, 9, 8, dtype=torch.float64)
    y = layer(x)
    x2 = x.clone()
    x2[:, 2] += 1.0  # position 2 shares the tile of positions 0..3
    y2 = layer(x2)
    for i in (0, 1, 3):
        assert rel_err(y2[:, i], y[:, i]) > 1e-3, i  # the caveat: a future token leaks
    assert torch.equal(y2[:, 4:], y[:, 4:])            # other tiles are untouched
    # Sequences stay independent in "tokens" grouping.
    x3 = x.clone()
    x3[1] += 1.0
    y3 = layer(x3)
    assert torch.equal(y3[0], y[0]) and torch.equal(y3[2], y[2])


# --- autograd ------------------------------------------------------------------------------

@pytest.mark.parametrize("row_grouping", ["tokens", "batch"])
def test_gradcheck_stl_linear(row_grouping):
    basis = bases.random(2, 3) if row_grouping == "tokens" else row_separable(2, 4)
    layer = STLLinear.from_linear(nn.Linear(5, 3, dtype=torch.float64), basis,
                                  row_grouping=row_grouping)
    names = ["weight_encoded", "ex", "d", "bias"]
    params = tuple(getattr(layer, n).detach().clone().requires_grad_(True) for n in names)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)

    def f(x, *p):
        return functional_call(layer, dict(zip(names, p)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params))


def test_gradients_reach_every_parameter():
    layer = STLLinear.from_linear(nn.Linear(6, 5), bases.random(2, 4))
    x = torch.randn(3, 6, requires_grad=True)
    layer(x).square().sum().backward()
    for tensor in (x, layer.weight_encoded, layer.ex, layer.d, layer.bias):
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0


def test_train_basis_false_freezes_ex_and_d():
    layer = STLLinear.from_linear(nn.Linear(6, 5), bases.random(2, 4), train_basis=False)
    assert not layer.ex.requires_grad and not layer.d.requires_grad
    layer(torch.randn(3, 6)).sum().backward()
    assert layer.ex.grad is None and layer.d.grad is None
    assert layer.weight_encoded.grad is not None and layer.bias.grad is not None


# --- state_dict, repr ----------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_round_trip(bias):
    layer = STLLinear.from_linear(nn.Linear(K, M, bias=bias), row_separable(4, 8),
                                  row_grouping="batch")
    state = layer.state_dict()
    assert set(state) == {"weight_encoded", "ex", "d"} | ({"bias"} if bias else set())
    fresh = STLLinear(K, M, 4, 8, bias=bias, row_grouping="batch")
    fresh.load_state_dict(state)
    x = torch.randn(2, 5, K)
    assert torch.equal(fresh(x), layer(x))


def test_keep_reference_is_non_persistent_and_shares_storage():
    linear = nn.Linear(8, 4)
    layer = STLLinear.from_linear(linear, bases.strassen(2), keep_reference=True)
    assert layer.reference_weight.data_ptr() == linear.weight.data_ptr()
    assert "reference_weight" not in layer.state_dict()
    assert not hasattr(STLLinear.from_linear(linear, bases.strassen(2)), "reference_weight")


def test_extra_repr_shows_tile_rank_and_flop_ratio():
    layer = STLLinear(64, 32, 4, 24)
    text = repr(layer)
    assert "tile=4" in text and "rank=24" in text
    ratio = stl_flops(4096, 64, 32, 4, 24) / dense_flops(4096, 64, 32)
    assert layer.flop_ratio() == pytest.approx(ratio)
    assert f"flops={ratio:.3f}x dense" in text


# --- bad input -----------------------------------------------------------------------------

def test_integer_input_raises():
    layer = STLLinear(4, 4, 2, 3)
    with pytest.raises(TypeError, match="input must be a floating-point tensor"):
        layer(torch.ones(2, 4, dtype=torch.int64))


def test_wrong_feature_count_raises():
    layer = STLLinear(4, 4, 2, 3)
    with pytest.raises(ValueError, match="input has 5 features, layer expects 4"):
        layer(torch.randn(2, 5))


def test_unknown_row_grouping_raises():
    with pytest.raises(ValueError, match="row_grouping must be one of"):
        STLLinear(4, 4, 2, 3, row_grouping="sequence")
    with pytest.raises(ValueError, match="row_grouping must be one of"):
        STLLinear.from_linear(nn.Linear(4, 4), bases.strassen(2), row_grouping="rows")


def test_bad_construction_raises():
    with pytest.raises(ValueError, match="tile must be >= 2"):
        STLLinear(4, 4, 1, 3)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        STLLinear(4, 4, 2, 0)
    with pytest.raises(ValueError, match="features must be >= 1"):
        STLLinear(0, 4, 2, 3)
    with pytest.raises(TypeError, match="from_linear takes an nn.Linear"):
        STLLinear.from_linear(nn.Conv1d(4, 4, 1), bases.strassen(2))
    with pytest.raises(TypeError, match="basis must be an STLBasis"):
        STLLinear.from_linear(nn.Linear(4, 4), "strassen")
    with pytest.raises(ValueError, match="basis has tile=2, rank=7"):
        STLLinear(4, 4, 2, 3).load_basis(bases.strassen(2), torch.randn(4, 4))


# --- STLLinear.from_weight and STLMatmul (activation × activation) -------------------------

def test_from_weight_matches_x_at_weight():
    weight_t, bias = torch.randn(10, 6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    layer = STLLinear.from_weight(weight_t, bias, bases.strassen(2))
    x = torch.randn(3, 5, 10, dtype=torch.float64)
    assert rel_err(layer(x), x @ weight_t + bias) < 1e-12
    with pytest.raises(ValueError, match="weight must be 2-D"):
        STLLinear.from_weight(torch.randn(2, 4, 4), None, bases.strassen(2))
    with pytest.raises(TypeError, match="weight must be a floating-point tensor"):
        STLLinear.from_weight(torch.ones(4, 4, dtype=torch.int64), None, bases.strassen(2))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_stl_matmul_module_exact(dtype):
    module = STLMatmul(bases.strassen(2), dtype=dtype)
    a, b = torch.randn(2, 1, 5, 7, dtype=dtype), torch.randn(3, 7, 6, dtype=dtype)
    assert rel_err(module(a, b), a @ b) < (1e-12 if dtype == torch.float64 else 1e-5)
    assert "tile=2, rank=7" in repr(module)


def test_stl_matmul_module_grads_and_errors():
    module = STLMatmul(bases.random(2, 3), dtype=torch.float64)
    a = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    module(a, b).square().sum().backward()
    for tensor in (a, b, module.ex, module.ew, module.d):
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0
    frozen = STLMatmul(bases.random(2, 3), train_basis=False)
    assert not any(p.requires_grad for p in frozen.parameters())
    with pytest.raises(ValueError, match="inner dimensions differ"):
        module(torch.randn(3, 5, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="basis must be an STLBasis"):
        STLMatmul("strassen")
