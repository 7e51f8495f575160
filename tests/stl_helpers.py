"""Small helpers shared by the tests (imported as ``stl_helpers``; tests/ is on sys.path)."""

from __future__ import annotations

import torch

from stl_compiler import STLConfig, bases

#: Exact bases small enough for fast tests (strassen(8) has rank 343, still cheap at tiny sizes).
EXACT_BASES = {
    "strassen2": lambda: bases.strassen(2),
    "strassen4": lambda: bases.strassen(4),
    "strassen8": lambda: bases.strassen(8),
    "naive3": lambda: bases.naive(3),
    "naive4": lambda: bases.naive(4),
    "strassen4-pruned49": lambda: bases.pruned(bases.strassen(4), 49),
    "dps48": lambda: bases.dps48(),
}


def tiny_config(**fields) -> STLConfig:
    """An :class:`STLConfig` for the tests' tiny models: sites from 8 wide, cost guard off
    (at these widths STL costs more FLOPs than dense, so the guard would keep every site
    dense; these tests check conversion mechanics, not cost), and token tiles on every model,
    causal ones included (``allow_non_causal``: mechanics, not causality, which
    tests/test_causality.py checks; the automatic grouping would keep a decoder's attention
    matmuls dense)."""
    return STLConfig(**{"min_dim": 8, "max_cost_ratio": None, "row_grouping": "tokens",
                        "allow_non_causal": True, **fields})


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a - b‖ / ‖b‖`` in float64 (``‖a‖`` when ``b`` is zero)."""
    if a.shape != b.shape:
        raise AssertionError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    a, b = a.detach().double(), b.detach().double()
    denom = torch.linalg.vector_norm(b)
    diff = torch.linalg.vector_norm(a - b)
    return float(diff / denom) if denom > 0 else float(diff)


def assert_gradients_match(plain: torch.nn.Module, fused: torch.nn.Module, x: torch.Tensor,
                           tol: float = 1e-5) -> None:
    """The same loss through two compiled graphs of one model (``fused`` gets ``plain``'s
    weights): every parameter's and the input's gradient exist and agree within ``tol``."""
    fused.load_state_dict(plain.state_dict())
    grads = []
    for gm in (plain, fused):
        xi = x.clone().requires_grad_()
        gm(xi).square().sum().backward()
        grads.append({"input": xi.grad, **{n: p.grad for n, p in gm.named_parameters()}})
    assert grads[0].keys() == grads[1].keys()
    for key, ref in grads[0].items():
        assert ref is not None and grads[1][key] is not None, f"no gradient for {key}"
        assert rel_err(grads[1][key], ref) < tol, key
