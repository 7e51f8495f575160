"""stl_matmul, its float64 reference (paper eq. 2) and the FLOP model."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from stl_helpers import EXACT_BASES, rel_err

from stl_compiler import bases, dense_flops, stl_flops, stl_matmul, stl_matmul_reference

# (x shape, w shape): non-multiples of every tile, 2-D, batched and broadcast batch dims.
SHAPES = [
    ((8, 8), (8, 8)),
    ((5, 7), (7, 3)),
    ((1, 9), (9, 1)),
    ((3, 6, 10), (10, 5)),
    ((11, 6), (2, 6, 13)),
    ((2, 1, 7, 5), (3, 5, 6)),
    ((4, 1, 3, 9), (1, 2, 9, 4)),
]
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", sorted(EXACT_BASES))
def test_exact_basis_equals_matmul(name, dtype):
    basis = EXACT_BASES[name]()
    for x_shape, w_shape in SHAPES:
        x, w = torch.randn(x_shape, dtype=dtype), torch.randn(w_shape, dtype=dtype)
        y = stl_matmul(x, w, basis)
        expected = torch.matmul(x, w)
        assert y.dtype == dtype and y.shape == expected.shape
        assert rel_err(y, expected) < TOL[dtype], (x_shape, w_shape)


@pytest.mark.parametrize("name", ["strassen2", "naive3"])
def test_reference_with_exact_basis_equals_matmul(name):
    basis = EXACT_BASES[name]()
    x, w = torch.randn(2, 1, 5, 7, dtype=torch.float64), torch.randn(3, 7, 4, dtype=torch.float64)
    assert rel_err(stl_matmul_reference(x, w, basis), x @ w) < 1e-12


def test_reference_single_tile_is_eq2():
    """On one t×t tile the reference is d.T @ ((ex @ vec X) * (ew @ vec W)), row-major vec."""
    basis = bases.random(3, 5, seed=7)
    x, w = torch.randn(3, 3, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    expected = basis.d.T @ ((basis.ex @ x.flatten()) * (basis.ew @ w.flatten()))
    assert torch.allclose(stl_matmul_reference(x, w, basis), expected.reshape(3, 3), atol=1e-13)


def test_output_tile_depends_only_on_its_row_and_column_tiles():
    basis = bases.random(2, 3, seed=1)
    x, w = torch.randn(6, 4, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    y = stl_matmul(x, w, basis)
    x2, w2 = x.clone(), w.clone()
    x2[2:4] += 1.0          # row tile 1 of X
    w2[:, 4:6] += 1.0       # column tile 2 of W
    y2 = stl_matmul(x2, w2, basis)
    changed = (y2 - y).abs() > 1e-12
    assert not changed[:2, :4].any() and not changed[4:, :4].any()
    assert changed[2:4].any() and changed[:, 4:6].any()


@st.composite
def _random_case(draw):
    tile = draw(st.sampled_from([2, 4, 8]))
    rank = draw(st.integers(1, 12))
    n, k, m = (draw(st.integers(1, 2 * tile + 1)) for _ in range(3))
    batch = draw(st.sampled_from([((), ()), ((2,), ()), ((), (3,)), ((2, 1), (3,)),
                                  ((1, 2), (2, 1))]))
    seed = draw(st.integers(0, 2**16))
    return tile, rank, (*batch[0], n, k), (*batch[1], k, m), seed


@settings(max_examples=30, deadline=None)
@given(_random_case())
def test_random_basis_matches_reference(case):
    tile, rank, x_shape, w_shape, seed = case
    basis = bases.random(tile, rank, seed=seed)
    x, w = torch.randn(x_shape, dtype=torch.float64), torch.randn(w_shape, dtype=torch.float64)
    ref = stl_matmul_reference(x, w, basis)
    assert rel_err(stl_matmul(x, w, basis), ref) < 1e-12
    assert rel_err(stl_matmul(x.float(), w.float(), basis), ref) < 1e-4


def test_random_basis_is_not_matmul():
    basis = bases.random(4, 24)
    x, w = torch.randn(8, 8, dtype=torch.float64), torch.randn(8, 8, dtype=torch.float64)
    assert rel_err(stl_matmul(x, w, basis), x @ w) > 0.1


# --- autograd ------------------------------------------------------------------------------

@pytest.mark.parametrize("x_shape, w_shape", [((3, 5), (5, 4)), ((2, 1, 3, 4), (2, 4, 3))])
def test_gradcheck_stl_matmul(x_shape, w_shape):
    basis = bases.random(2, 3, seed=0)
    x = torch.randn(x_shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(w_shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: stl_matmul(a, b, basis), (x, w))


# --- bad input -----------------------------------------------------------------------------

def test_integer_inputs_raise():
    basis = bases.strassen(2)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        stl_matmul(torch.ones(4, 4, dtype=torch.int64), torch.ones(4, 4), basis)
    with pytest.raises(TypeError, match="w must be a floating-point tensor"):
        stl_matmul(torch.ones(4, 4), torch.ones(4, 4, dtype=torch.int32), basis)


def test_mismatched_inner_dims_raise():
    with pytest.raises(ValueError, match="inner dimensions differ"):
        stl_matmul(torch.randn(4, 5), torch.randn(4, 4), bases.strassen(2))


def test_other_bad_operands_raise():
    basis = bases.strassen(2)
    with pytest.raises(ValueError, match="at least 2 dims"):
        stl_matmul(torch.randn(4), torch.randn(4, 4), basis)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        stl_matmul([[1.0]], torch.randn(1, 1), basis)
    with pytest.raises(TypeError, match="dtypes differ"):
        stl_matmul(torch.randn(4, 4), torch.randn(4, 4, dtype=torch.float64), basis)
    with pytest.raises(TypeError, match="basis must be an STLBasis"):
        stl_matmul(torch.randn(4, 4), torch.randn(4, 4), "strassen")


# --- FLOP model ----------------------------------------------------------------------------

def _formula(n, k, m, t, r):
    pad = lambda v: -(-v // t) * t
    n, k, m = pad(n), pad(k), pad(m)
    return 2 * r * n * k + 2 * r * n * k * m / t**3 + 2 * r * n * m


@pytest.mark.parametrize("n, k, m, t, r", [(8, 8, 8, 4, 24), (5, 6, 7, 4, 24), (1, 1, 1, 2, 7),
                                           (4096, 4096, 4096, 4, 24), (10, 9, 3, 3, 27)])
def test_stl_flops_formula(n, k, m, t, r):
    assert stl_flops(n, k, m, t, r) == _formula(n, k, m, t, r)
    pad = lambda v: -(-v // t) * t
    assert stl_flops(n, k, m, t, r, encode_w=True) == _formula(n, k, m, t, r) + 2 * r * pad(
        k) * pad(m)
    assert dense_flops(n, k, m) == 2 * n * k * m


def test_flops_worked_example():
    assert stl_flops(5, 6, 7, 4, 24) == 2 * 24 * 64 + 2 * 24 * 512 // 64 + 2 * 24 * 64
    # The GEMM part alone has ratio r/t³; encode/decode vanish for large k, m.
    big = 1 << 14
    gemm = 2 * 24 * big**3 // 64
    assert stl_flops(big, big, big, 4, 24) - gemm == 2 * 24 * big * big * 2
    assert abs(stl_flops(big, big, big, 4, 24) / dense_flops(big, big, big) - 24 / 64) < 0.01


def test_bytes_model():
    from stl_compiler import functional

    # x (5x6) @ w (6x7), t=4, r=24: padded 8x8 tiles; each encoded plane set holds
    # r * (8*8)/16 = 96 elements. Read X 30, write+read X^ 2*96, read W^ 96, write+read Y^
    # 2*96, write Y 35 -> 545 elements; act x act adds read W 42 + write W^ 96.
    assert functional.stl_bytes(5, 6, 7, 4, 24, itemsize=1) == 545
    assert functional.stl_bytes(5, 6, 7, 4, 24, encode_w=True, itemsize=2) == 2 * (545 + 138)
    assert functional.dense_bytes(5, 6, 7, itemsize=4) == 4 * (30 + 42 + 35)
    # large n: about 1 + 2r/t^2 = 4x the activation bytes of dense at r=24
    ratio = functional.stl_bytes(4096, 1024, 1024, 4, 24) / functional.dense_bytes(4096, 1024,
                                                                                   1024)
    assert 3.5 < ratio < 4.0
