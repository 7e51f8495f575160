import copy
import json
import sys

import pytest
import torch
from torch import nn

import stl_compiler as stl
from stl_compiler.fit import calibrate

calibrate_module = sys.modules["stl_compiler.fit.calibrate"]  # the package exports the function


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(24, 40)
        self.down = nn.Linear(40, 18)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _batches(seed=0, n=3):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(24, 24, generator=gen) * 0.3 + torch.eye(24)
    return [torch.randn(4, 7, 24, generator=gen) @ mix for _ in range(n)]  # 7 rows: padding


@pytest.mark.parametrize("row_grouping", ["tokens", "batch"])
@pytest.mark.parametrize("steps", [0, 2])
def test_calibrate_lowers_every_layer_error_and_never_raises_it(row_grouping, steps):
    torch.manual_seed(0)
    dense = Mlp()
    model = copy.deepcopy(dense)
    stl.swap_linears_(model, stl.STLConfig(rank=24, min_dim=8, row_grouping=row_grouping,
                                           max_cost_ratio=None), keep_reference=True)
    table = calibrate(model, _batches(), steps=steps, progress=False)
    assert [r["layer"] for r in table.rows] == ["up", "down"]
    for row in table.rows:
        assert row["error_after"] < row["error_before"]
    # the table's "after" is the model's real error on that layer's calibration inputs
    inputs = []
    hook = model.down.register_forward_hook(lambda m, a, o: inputs.append(a[0]))
    with torch.no_grad():
        for b in _batches():
            model(b)
    hook.remove()
    with torch.no_grad():
        y = torch.cat([model.down(x).flatten() for x in inputs])
        ref = torch.cat([dense.down(x).flatten() for x in inputs])
    assert float((y - ref).norm() / ref.norm()) == pytest.approx(table.rows[1]["error_after"],
                                                                 rel=1e-4)
    assert "error before" in str(table) and json.loads(table.to_json()) == table.rows


def test_calibrate_never_increases_error_of_an_already_calibrated_model():
    torch.manual_seed(1)
    model = Mlp()
    stl.swap_linears_(model, stl.STLConfig(rank=16, min_dim=8, max_cost_ratio=None),
                      keep_reference=True)
    first = calibrate(model, _batches(), steps=1, progress=False)
    second = calibrate(model, _batches(), steps=1, progress=False)
    for b in second.rows:
        assert b["error_after"] <= b["error_before"] + 1e-9
    assert second.rows[0]["error_before"] == pytest.approx(first.rows[0]["error_after"],
                                                           rel=1e-5)


def test_calibrate_recovers_a_scrambled_exact_layer():
    torch.manual_seed(2)
    linear = nn.Linear(20, 12)
    layer = stl.STLLinear.from_linear(linear, stl.bases.strassen(4), keep_reference=True)
    with torch.no_grad():
        layer.weight_encoded.normal_()
    scrambled = layer.weight_encoded.detach().clone()
    x = torch.randn(5, 20)
    # a (near) plain least-squares fit recovers the layer; the default ridge nearly so
    table = calibrate(nn.Sequential(layer), [x], steps=0, progress=False, ridge=1e-8)
    assert table.rows[0]["error_after"] < 1e-5
    with torch.no_grad():
        layer.weight_encoded.copy_(scrambled)
    table = calibrate(nn.Sequential(layer), [x], steps=0, progress=False)
    assert table.rows[0]["error_after"] < 1e-3


def test_calibrate_uses_the_teacher_and_explains_missing_references():
    torch.manual_seed(3)
    dense = Mlp()
    model = copy.deepcopy(dense)
    stl.swap_linears_(model, stl.STLConfig(rank=24, min_dim=8, max_cost_ratio=None))
    with pytest.raises(ValueError, match="keep_reference=True"):
        calibrate(model, _batches(), progress=False)
    with pytest.raises(ValueError, match="no nn.Linear named 'up'"):
        calibrate(model, _batches(), teacher=nn.Sequential(), progress=False)
    table = calibrate(model, _batches(), teacher=dense, steps=0, progress=False)
    assert all(r["error_after"] < r["error_before"] for r in table.rows)
    with pytest.raises(ValueError, match="no STLLinear"):
        calibrate(dense, _batches(), progress=False)
    with pytest.raises(ValueError, match="empty"):
        calibrate(model, [], teacher=dense, progress=False)


def test_calibrate_reports_layers_the_batches_never_call():
    torch.manual_seed(4)
    model = nn.ModuleDict({"used": nn.Linear(16, 16), "unused": nn.Linear(16, 16)})
    stl.swap_linears_(model, stl.STLConfig(rank=16, min_dim=8, max_cost_ratio=None),
                      keep_reference=True)
    wrapper = nn.Sequential(model["used"])
    wrapper.add_module("unused", model["unused"])  # registered, never called by forward
    wrapper.forward = lambda x: model["used"](x)
    table = calibrate(wrapper, [torch.randn(8, 16)], steps=0, progress=False)
    rows = {r["layer"]: r for r in table.rows}
    assert rows["unused"]["error_after"] is None and "not called" in str(table)
    assert rows["0"]["error_after"] < rows["0"]["error_before"]


def test_row_separable_basis_keeps_sequences_independent_under_batch_grouping():
    torch.manual_seed(5)
    dense = Mlp()
    model = copy.deepcopy(dense)
    stl.swap_linears_(model, stl.STLConfig(rank=24, min_dim=8, row_grouping="batch",
                                           max_cost_ratio=None), keep_reference=True)
    general = stl.bases.fitted(4, 24)  # e.g. after training ex, d freely: rows mix
    with torch.no_grad():
        for layer in (model.up, model.down):
            layer.ex.copy_(general.ex)
            layer.d.copy_(general.d)
    x = torch.randn(8, 5, 24)
    changed = x.clone()
    changed[3] += torch.randn(5, 24)  # another sequence in the same tiles
    with torch.no_grad():  # a general (inexact) basis mixes the rows of a tile
        assert not torch.allclose(model(x)[:3], model(changed)[:3], atol=1e-4)
    table = calibrate(model, _batches(), steps=0, basis="row_separable", progress=False)
    keep = (torch.arange(24)[:, None] // 6) == (torch.arange(16)[None] // 4)
    for layer in (model.up, model.down):
        assert torch.all(layer.ex[~keep] == 0) and torch.all(layer.d[~keep] == 0)
    assert all(r["error_after"] < r["error_before"] for r in table.rows)
    with torch.no_grad():  # each sequence's output now depends on that sequence only
        torch.testing.assert_close(model(x)[:3], model(changed)[:3])
        torch.testing.assert_close(model(x)[4:], model(changed)[4:])
    # refinement rounds never leave the layer worse than the row-separable start
    again = copy.deepcopy(model)
    table2 = calibrate(again, _batches(), steps=1, basis="row_separable", progress=False)
    assert all(b["error_after"] <= a["error_after"] + 1e-9
               for a, b in zip(table.rows, table2.rows))


def test_teacher_targets_fit_the_teacher_activations_end_to_end():
    torch.manual_seed(6)
    dense = Mlp()
    errors = {}
    for target in ("layer", "teacher"):
        model = copy.deepcopy(dense)
        stl.swap_linears_(model, stl.STLConfig(rank=16, min_dim=8, row_grouping="batch",
                                               max_cost_ratio=None))
        table = calibrate(model, _batches(), teacher=dense, target=target, steps=0,
                          progress=False)
        with torch.no_grad():
            y = torch.cat([model(b).flatten() for b in _batches()])
            ref = torch.cat([dense(b).flatten() for b in _batches()])
        errors[target] = float((y - ref).norm() / ref.norm())
    # with "teacher", the last layer's closed-form fit minimizes exactly this error
    assert table.rows[-1]["error_after"] == pytest.approx(errors["teacher"], rel=1e-4)
    assert errors["teacher"] < 0.95 * errors["layer"]


def test_calibrate_rejects_bad_options():
    model = Mlp()
    stl.swap_linears_(model, stl.STLConfig(rank=41, min_dim=8, max_cost_ratio=None),
                      keep_reference=True)
    with pytest.raises(ValueError, match="multiple of its tile"):
        calibrate(model, _batches(), basis="row_separable", progress=False)
    with pytest.raises(ValueError, match="basis must be one of"):
        calibrate(model, _batches(), basis="strassen", progress=False)
    with pytest.raises(ValueError, match="target must be one of"):
        calibrate(model, _batches(), target="dense", progress=False)
    with pytest.raises(ValueError, match="pass teacher="):
        calibrate(model, _batches(), target="teacher", progress=False)
    with pytest.raises(ValueError, match="shard must be one of"):
        calibrate(model, _batches(), shard="ranks", progress=False)


def _stl_mlp(seed):
    """An Mlp with both layers converted by from_linear (no conversion cost guard)."""
    torch.manual_seed(seed)
    model = Mlp()
    for name in ("up", "down"):
        setattr(model, name, stl.STLLinear.from_linear(getattr(model, name),
                                                       stl.bases.fitted(4, 24),
                                                       keep_reference=True))
    return model


def test_calibrate_rejects_a_non_finite_batch_and_leaves_the_model_unchanged():
    model = _stl_mlp(7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = _batches()
    batches[1][2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"calibration batch 1 contains NaN or Inf.*nan_to_num"):
        calibrate(model, batches, progress=False)
    batches[1][2, 3, 4] = float("inf")
    with pytest.raises(ValueError, match=r"batch 0 \(item 'x'\) contains NaN"):
        calibrate(model, [{"x": batches[1]}], progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("solver", ["_solve_weight", "_solve_decoder"])
def test_calibrate_never_keeps_a_non_finite_iterate(monkeypatch, solver):
    module = sys.modules["stl_compiler.fit.calibrate"]  # the package exports the function
    model = _stl_mlp(8)
    real = getattr(module, solver)
    monkeypatch.setattr(module, solver, lambda *a: torch.full_like(real(*a), float("nan")))
    with pytest.warns(UserWarning, match="least-squares solve gave NaN or Inf"):
        table = calibrate(model, _batches(), steps=2, progress=False)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    for row in table.rows:  # the best finite iterate (the layer as converted at worst)
        assert row["error_after"] <= row["error_before"]
    with torch.no_grad():
        assert bool(torch.isfinite(model(_batches()[0])).all())


def test_calibrate_refuses_a_compiled_model():
    model = _stl_mlp(9)
    compiled = stl.stl_compile(model, (_batches()[0],), stl.STLConfig(rank=24), backend="eager")
    with pytest.raises(ValueError, match="calibrate before stl_compile: swap_linears_"):
        calibrate(compiled, _batches(), progress=False)


def _sequence_zero_isolated(model, width):
    """Sequence 0's output does not move when the 3 sequences sharing its tiles change."""
    x = torch.randn(8, 5, width)
    changed = x.clone()
    changed[1:4] = torch.randn(3, 5, width) * 3
    with torch.no_grad():
        ref = model(x)[0]
        return float((model(changed)[0] - ref).norm() / ref.norm())


@pytest.mark.parametrize("basis", ["converted", "row_separable"])
def test_calibrate_keeps_a_batch_grouped_layer_row_separable(basis):
    """The decoder's least squares and the encoder's Adam steps stay on each term's own tile
    row (unconstrained, both move entries into the other rows: sequences would mix)."""
    torch.manual_seed(6)
    dense = Mlp()
    model = copy.deepcopy(dense)
    stl.swap_linears_(model, stl.STLConfig(rank=24, min_dim=8, row_grouping="batch",
                                           max_cost_ratio=None), keep_reference=True)
    table = calibrate(model, _batches(), steps=2, basis=basis, progress=False)
    assert all(r["error_after"] < r["error_before"] for r in table.rows)
    for layer in (model.up, model.down):
        assert stl.tiling.is_row_separable(layer) and layer.rows_isolated
    assert _sequence_zero_isolated(model, 24) < 1e-6


def test_row_support_is_none_unless_batch_grouped_and_row_separable():
    from stl_compiler.fit.calibrate import row_support

    separable = stl.tiling.row_separable(4, 24)
    tokens = stl.STLLinear.from_linear(nn.Linear(8, 8), separable)
    assert row_support(tokens) is None  # rows of one sequence: nothing to preserve
    mixing = stl.STLLinear.from_linear(nn.Linear(8, 8), stl.bases.fitted(4, 24))
    mixing.row_grouping = "batch"  # e.g. a layer trained freely before this fix
    assert row_support(mixing) is None
    layer = stl.STLLinear.from_linear(nn.Linear(8, 8), separable, row_grouping="batch")
    ex_mask, d_mask = row_support(layer)
    row = torch.arange(24)[:, None] // 6 == torch.arange(16)[None] // 4  # term p: row p // 6
    assert torch.equal(ex_mask, row) and torch.equal(d_mask, row)


def _causal_basis(rank=24):
    """A causal basis with cross-row terms (not row-separable): a quick fit to correlated
    tokens with a fixed pivot split (every row has terms, so every token sees itself)."""
    from stl_compiler.fit import fit_basis
    from stl_compiler.fit.alpha import token_moments

    share = rank // 8
    pivots = [0] * (rank - 3 * share) + [1] * share + [2] * share + [3] * share
    return fit_basis(4, rank, data=token_moments(4, 0.8), support="causal", pivots=pivots,
                     restarts=1, steps=30)[0]


def _future_leak(model, dim, seq=11, seed=0):
    """Largest change of an output at positions < j when input token j changes, over j,
    in float64 (0.0 exactly for a causal model)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, seq, dim, generator=gen, dtype=torch.float64)
    worst = 0.0
    with torch.no_grad():
        ref = model(x)
        for j in range(1, seq):
            changed = x.clone()
            changed[:, j] += torch.randn(3, dim, generator=gen, dtype=torch.float64) * 3
            out = model(changed)
            worst = max(worst, float((out[:, :j] - ref[:, :j]).abs().max()))
            assert float((out[:, j] - ref[:, j]).abs().max()) > 1e-3  # token j sees itself
    return worst


@pytest.mark.parametrize("basis", ["converted", "row_separable"])
def test_calibrate_keeps_a_causal_layer_causal(basis):
    torch.manual_seed(11)
    dense = Mlp().double()
    model = copy.deepcopy(dense)
    stl.swap_linears_(model, stl.STLConfig(rank=24, basis=_causal_basis(), min_dim=8,
                                           row_grouping="causal", max_cost_ratio=None),
                      keep_reference=True)
    model.double()
    assert not stl.tiling.is_row_separable(model.up)
    batches = [b.double() for b in _batches(seed=3)]
    table = calibrate(model, batches, steps=2, basis=basis, progress=False)
    assert all(r["error_after"] < 0.9 * r["error_before"] for r in table.rows)
    for layer in (model.up, model.down):
        assert stl.tiling.is_causal(layer, tol=0.0) and layer.keeps_causality
    assert _future_leak(model, 24) == 0.0


def test_support_masks_of_a_causal_layer_keep_any_update_causal():
    from stl_compiler.fit.calibrate import row_support, support_masks
    from stl_compiler.fit.fitting import pivot_masks

    basis = _causal_basis(16)
    layer = stl.STLLinear.from_linear(nn.Linear(8, 8), basis, row_grouping="causal")
    ex_mask, d_mask = support_masks(layer)
    first_write = torch.stack([torch.nonzero(r.reshape(4, 4).any(1))[0, 0] for r in basis.d != 0])
    expect = pivot_masks(4, first_write, "causal")
    assert torch.equal(ex_mask, expect[0]) and torch.equal(d_mask, expect[1])
    assert torch.equal(row_support(layer)[0], ex_mask)  # the former name
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # any values inside the masks: still causal
        layer.ex.copy_(torch.randn(16, 16, generator=gen) * ex_mask)
        layer.d.copy_(torch.randn(16, 16, generator=gen) * d_mask)
    assert stl.tiling.is_causal(layer, tol=0.0)
    # the same basis under "tokens" grouping: nothing to preserve
    assert support_masks(stl.STLLinear.from_linear(nn.Linear(8, 8), basis)) is None


def _near_degenerate(seed: int, n: int = 512, k: int = 64) -> torch.Tensor:
    """Inputs of rank 8 plus 1e-4 noise: the least-squares solve can buy a little fp32 error
    with large weights along the noise directions."""
    mix = torch.randn(8, k, generator=torch.Generator().manual_seed(99))
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=gen) @ mix + 1e-4 * torch.randn(n, k, generator=gen)


def test_ridge_keeps_the_encoded_weight_bounded_for_bf16():
    """On nearly degenerate inputs the default ridge keeps the calibrated weight small, so the
    layer run in bf16 stays near its float64 self on held-out inputs; the plain fit (1e-8)
    grows weights that cancel in float64 but not in bf16. The fp32 fit is as good."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(64, 48))
    held_out = _near_degenerate(7)
    results = {}
    for ridge in (1e-8, calibrate_module.DEFAULT_RIDGE):
        model = copy.deepcopy(dense)
        stl.swap_linears_(model, stl.STLConfig(rank=16, min_dim=0, max_cost_ratio=None),
                          keep_reference=True)
        calibrate(model, [_near_degenerate(s) for s in range(4)], steps=2, progress=False,
                  ridge=ridge)
        with torch.no_grad():
            exact = copy.deepcopy(model).double()(held_out.double())
            bf16 = copy.deepcopy(model).bfloat16()(held_out.bfloat16()).double()
            fit = float((exact - dense(held_out).double()).norm() / exact.norm())
        results[ridge] = (float(model[0].weight_encoded.detach().abs().max()),
                          float((bf16 - exact).norm() / exact.norm()), fit)
    (big, drift_plain, fit_plain), (small, drift, fit_ridge) = results.values()
    assert small < big / 3 and drift < 0.1 and drift < drift_plain / 3, results
    assert fit_ridge < 1.05 * fit_plain, results


@pytest.mark.parametrize("ridge", [-1e-4, float("nan"), float("inf"), "1e-4", True])
def test_ridge_must_be_a_finite_non_negative_number(ridge):
    with pytest.raises(ValueError, match="ridge must be a finite number >= 0"):
        calibrate(_stl_mlp(3), _batches(), progress=False, ridge=ridge)
