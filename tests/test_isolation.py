"""Request isolation: with every configuration offered for batching unrelated sequences, each
sequence's output is independent of the sequences batched with it (issue 13, item 1)."""

from __future__ import annotations

import copy

import pytest
import torch
from stl_helpers import rel_err
from torch import nn

from stl_compiler import STLConfig, STLLinear, bases, stl_compile, swap_linears_
from stl_compiler.fit import basis_alpha
from stl_compiler.tiling import is_row_separable, row_separable

D, H = 128, 256  # big enough for the cost guard at rank 24 (0.75x / 0.66x dense FLOPs)


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(D, H)
        self.down = nn.Linear(H, D)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _batch_mlp(config: STLConfig) -> nn.Module:
    model = Mlp()
    assert set(swap_linears_(model, config).values()) == {"converted"}
    return model


def _compiled_mlp(config: STLConfig) -> nn.Module:
    return stl_compile(Mlp(), (torch.randn(4, 6, D),), config, backend="eager")


class _CompiledPerBatch(nn.Module):
    """One dense model compiled (statically) for each batch size it is called with: the
    batch-1 and batch-4 programs share every weight, so they must agree on sequence 0."""

    def __init__(self, config: STLConfig) -> None:
        super().__init__()
        self.dense, self.config, self.compiled = Mlp(), config, {}

    def forward(self, x):
        if x.shape not in self.compiled:
            self.compiled[x.shape] = stl_compile(self.dense, (x,), self.config,
                                                 dynamic_shapes=None, backend="eager")
        return self.compiled[x.shape](x)


# Every way to build a "batch"-grouped model: layer, eager swap, stl_compile; the default
# basis ("fitted" -> row-separable), the exact row-separable naive basis, explicit ranks.
BATCH_MODELS = {
    "STLLinear row_separable(4, 24)": lambda: STLLinear.from_linear(
        nn.Linear(D, D), row_separable(4, 24), row_grouping="batch"),
    "STLLinear naive(4)": lambda: STLLinear.from_linear(
        nn.Linear(D, D), bases.naive(4), row_grouping="batch"),
    "swap_linears_ default basis": lambda: _batch_mlp(STLConfig(row_grouping="batch")),
    "swap_linears_ rank 16": lambda: _batch_mlp(STLConfig(rank=16, row_grouping="batch")),
    "swap_linears_ naive": lambda: _batch_mlp(STLConfig(basis="naive", row_grouping="batch",
                                                        max_cost_ratio=None)),
    # max_cost_ratio=None: the guard judges each static compile on its example, and a batch of
    # 1 padded to a 4-row tile costs more than dense (it would stay dense)
    "stl_compile eager default basis": lambda: _CompiledPerBatch(
        STLConfig(row_grouping="batch", max_cost_ratio=None)),
    "stl_compile eager naive": lambda: _CompiledPerBatch(
        STLConfig(basis="naive", row_grouping="batch", max_cost_ratio=None)),
}


@pytest.mark.parametrize("name", sorted(BATCH_MODELS))
def test_batch_grouping_keeps_each_sequence_independent(name):
    torch.manual_seed(0)
    model = BATCH_MODELS[name]()
    x = torch.randn(4, 7, D)  # 4 sequences of 7 tokens (not a tile multiple)
    other = x.clone()
    other[1:] = torch.randn(3, 7, D) * 10  # change every tile-mate of sequence 0
    with torch.no_grad():
        y, y_other, y_alone = model(x), model(other), model(x[:1])
    assert rel_err(y_other[0], y[0]) < 1e-6   # the other sequences changed
    assert rel_err(y_alone[0], y[0]) < 1e-6   # batch of 1 vs batch of 4
    assert rel_err(y_other[1], y[1]) > 1e-2   # (and those sequences' outputs did change)


def test_general_basis_would_mix_the_sequences():
    """Why the rule exists: the same layer built with a general basis in "tokens" grouping and
    run with the rows of a tile being sequences (what "batch" would do) changes sequence 0."""
    torch.manual_seed(1)
    linear = nn.Linear(D, D)
    mixing = STLLinear.from_linear(linear, bases.random(4, 24), row_grouping="tokens")
    x = torch.randn(4, D)  # as "tokens": one tile = 4 rows = 4 sequences of length 1
    other = torch.cat([x[:1], torch.randn(3, D)])
    with torch.no_grad():
        assert rel_err(mixing(other)[0], mixing(x)[0]) > 0.1


@pytest.mark.parametrize("basis", [bases.strassen(4), bases.random(4, 24), bases.fitted(4, 24),
                                   bases.pruned(bases.strassen(4), 24)])
def test_batch_grouping_refuses_a_basis_that_mixes_rows(basis):
    message = f"basis {basis.name!r} has product terms that read or write two tile rows"
    with pytest.raises(ValueError, match=message):
        STLLinear.from_linear(nn.Linear(8, 8), basis, row_grouping="batch")
    with pytest.raises(ValueError, match="row_separable\\(tile, rank\\)"):
        STLConfig(basis=basis, row_grouping="batch")
    with pytest.raises(ValueError, match="override 'up'.*read or write two tile rows"):
        STLConfig(row_grouping="batch", overrides={"up": {"basis": basis}})


@pytest.mark.parametrize("name", ["strassen", "random", "strassen-pruned"])
def test_batch_grouping_refuses_named_bases_that_mix_rows(name):
    with pytest.raises(ValueError, match="read or write two tile rows"):
        STLConfig(basis=name, row_grouping="batch")


def test_default_basis_resolves_to_row_separable_under_batch_grouping():
    spec = STLConfig(row_grouping="batch").site_spec("any")
    assert spec.basis.name == "row-separable4" and spec.rank == 24
    assert is_row_separable(spec.basis)
    assert STLConfig().site_spec("any").basis.name != "row-separable4"  # tokens: fitted
    with pytest.raises(ValueError, match="multiple of 4.*use rank=20"):
        STLConfig(rank=22, row_grouping="batch")


def test_is_row_separable():
    assert is_row_separable(bases.naive(4)) and is_row_separable(bases.naive(3))
    assert is_row_separable(bases.pruned(bases.naive(4), 24))  # naive terms each use one row
    assert not is_row_separable(bases.strassen(4)) and not is_row_separable(bases.random(4, 24))
    basis = row_separable(4, 24)
    assert is_row_separable(basis)
    # entries below tol x the largest entry count as zero (float noise of a saved basis)
    ex = basis.ex.clone()
    ex[0, 15] = 1e-9  # term 0 serves row 0; entry 15 is row 3
    noisy = bases.STLBasis(4, 24, ex, basis.ew, basis.d)
    assert is_row_separable(noisy) and not is_row_separable(noisy, tol=1e-12)
    # a term that reads row 0 and writes row 1 mixes rows even with single-row ex and d
    d = basis.d.clone()
    d[0] = torch.roll(basis.d[0], 4)
    assert not is_row_separable(bases.STLBasis(4, 24, basis.ex, basis.ew, d))
    # modules work too: a layer whose ex was trained off the row pattern mixes rows
    layer = STLLinear.from_linear(nn.Linear(8, 8), basis, row_grouping="batch")
    assert layer.rows_isolated
    with torch.no_grad():
        layer.ex.add_(0.01)
    assert not is_row_separable(layer) and not layer.rows_isolated


@pytest.mark.parametrize("rank", [8, 24, 48, 64])
def test_row_separable_basis(rank):
    basis = row_separable(4, rank)
    # alpha (Gaussian tiles) against the package's independent Monte Carlo-free formula
    assert basis.alpha == pytest.approx(basis_alpha(basis), abs=1e-9)
    assert (basis.exactness_error() == 0) == (rank == 64)
    x, w = torch.randn(3, 8, 12, dtype=torch.float64), torch.randn(12, 8, dtype=torch.float64)
    layer = STLLinear.from_weight(w, None, basis, row_grouping="batch")
    if rank == 64:
        assert rel_err(layer(x), x @ w) < 1e-12


def test_row_separable_basis_bad_rank():
    with pytest.raises(ValueError, match="multiple of 4 and at most 64, got rank=66"):
        row_separable(4, 66)


def test_tokens_grouping_is_isolated_with_any_basis():
    model = Mlp()
    swap_linears_(model, STLConfig(basis="random", rank=24))
    x = torch.randn(4, 8, D)
    other = torch.cat([x[:1], torch.randn(3, 8, D)])
    with torch.no_grad():
        assert rel_err(model(other)[0], model(x)[0]) < 1e-6
        assert rel_err(model(x[:1])[0], model(x)[0]) < 1e-6


def test_compiled_report_states_the_grouping_and_isolation():
    model = _compiled_mlp(STLConfig(row_grouping="batch"))
    report = model.stl_report
    assert report.row_grouping == "batch"
    assert all(s.isolated for s in report.converted)
    text = " ".join(str(report).split())
    assert "row_grouping='batch'" in text and "rows isolated: yes" in text


def test_report_flags_a_preconverted_layer_whose_rows_mix():
    model = Mlp()
    swap_linears_(model, STLConfig(row_grouping="batch"))
    trained = copy.deepcopy(model)
    with torch.no_grad():
        trained.up.ex.add_(0.01)  # e.g. ex trained freely: no longer row-separable
    report = stl_compile(trained, (torch.randn(4, 6, D),), backend="eager").stl_report
    rows = {s.name: s for s in report.sites}
    assert rows["up"].isolated is False and rows["down"].isolated is True
    assert "rows isolated: NO, 1 STL site(s) mix the sequences of a tile (up" in \
        " ".join(str(report).split())
