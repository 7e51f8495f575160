"""STLConfig: validation, per-site overrides, to_dict / from_dict.

The default basis "auto" ("fitted" / "fitted-bf16" by the site's dtype) needs shipped data
files, so every test names a basis explicitly unless it tests the default.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from stl_compiler import STLConfig, bases


def test_site_spec_defaults():
    config = STLConfig(basis="random", tile=4, rank=12)
    spec = config.site_spec("blocks.0.fc1")
    assert (spec.tile, spec.rank, spec.basis.rank) == (4, 12, 12)
    # targets=None: both kinds, but act×act stays dense next to pre-converted STL layers
    assert config.targets is None
    assert config.targets_for() == frozenset({"linear", "matmul"})
    assert config.targets_for(has_stl_layers=True) == frozenset({"linear"})
    # Exact bases fix their own rank.
    assert STLConfig(basis="strassen", tile=4, rank=24).site_spec("x").rank == 49


def test_targets_are_normalized():
    config = STLConfig(basis="random", targets=["linear"])
    assert config.targets == frozenset({"linear"})


def test_seed_changes_random_bases_and_names_are_cached():
    a = STLConfig(basis="random", rank=6, seed=0).site_spec("a").basis
    b = STLConfig(basis="random", rank=6, seed=1).site_spec("a").basis
    assert not torch.equal(a.ex, b.ex)
    assert STLConfig(basis="random", rank=6, seed=0).site_spec("b").basis is a


def test_overrides_first_matching_pattern_wins():
    config = STLConfig(basis="random", rank=12, overrides={
        "blocks.*.attn.*": "skip",
        "blocks.0.*": {"rank": 8},
        "head": {"tile": 2, "basis": "strassen"},
        "blocks.*": {"rank": 4},
    })
    assert config.site_spec("blocks.0.attn.qkv") is None
    assert config.site_spec("blocks.0.mlp.fc1").rank == 8
    assert config.site_spec("blocks.1.mlp.fc1").rank == 4
    head = config.site_spec("head")
    assert (head.tile, head.rank, head.basis.name) == (2, 7, "strassen2")
    assert config.site_spec("other").rank == 12
    assert config.site_spec("Head").rank == 12  # patterns are case-sensitive
    assert config.override_for("blocks.3.attn.proj") == "skip"


def test_override_with_basis_object():
    basis = bases.random(2, 5)
    config = STLConfig(basis="random", overrides={"fc*": {"tile": 2, "basis": basis}})
    assert config.site_spec("fc1").basis is basis


@pytest.mark.parametrize("kwargs, message", [
    ({"targets": {"linear", "conv"}}, "unknown targets"),
    ({"row_grouping": "rows"}, "row_grouping must be one of"),
    ({"min_dim": -1}, "min_dim must be >= 0"),
    ({"overrides": {"fc*": {"rnak": 8}}}, "override for 'fc\\*' must be 'skip' or a dict"),
    ({"overrides": {"fc*": "dense"}}, "override for 'fc\\*' must be 'skip' or a dict"),
    ({"tile": 3, "basis": "strassen"}, "power-of-two"),
    ({"basis": "strasen"}, "unknown basis name"),
    ({"tile": 1, "basis": "random"}, "tile must be >= 2"),
    ({"rank": 0, "basis": "random"}, "rank must be >= 1"),
    ({"tile": 2, "basis": bases.strassen(4)}, "has tile 4, config asks for 2"),
])
def test_bad_config_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        STLConfig(**kwargs)


def test_filter_fn_cannot_be_serialized():
    config = STLConfig(basis="random", filter_fn=lambda module, fqn: True)
    with pytest.raises(ValueError, match="filter_fn"):
        config.to_dict()


def _round_trip(config: STLConfig) -> STLConfig:
    return STLConfig.from_dict(json.loads(json.dumps(config.to_dict())))


def test_to_dict_round_trip_with_basis_name():
    # "batch" grouping takes only row-separable bases: "fitted" resolves to one (rank 4, 6)
    config = STLConfig(tile=2, rank=4, basis="fitted", targets=["linear"], min_dim=3,
                       max_cost_ratio=None, max_bytes_ratio=2.5, pad=False,
                       row_grouping="batch", decompose_sdpa=True, fuse=False,
                       measure_error=False, seed=7,
                       overrides={"a.*": "skip", "b": {"rank": 6, "basis": "fitted"}})
    data = config.to_dict()
    assert data["targets"] == ["linear"] and data["basis"] == "fitted"
    assert data["max_cost_ratio"] is None and data["max_bytes_ratio"] == 2.5
    restored = _round_trip(config)
    assert restored == config
    assert restored.to_dict() == data


def test_to_dict_round_trip_with_basis_objects():
    main = bases.random(2, 5, seed=3)
    other = bases.STLBasis(2, 7, *bases.strassen(2).matrices, name="mine", alpha=0.0)
    config = STLConfig(tile=2, basis=main, overrides={"fc": {"basis": other}, "x": "skip"})
    restored = _round_trip(config)
    for got, want in ((restored.basis, main), (restored.overrides["fc"]["basis"], other)):
        assert isinstance(got, bases.STLBasis)
        assert (got.tile, got.rank, got.name, got.alpha) == (want.tile, want.rank, want.name,
                                                              want.alpha)
        for a, b in zip(got.matrices, want.matrices):
            assert torch.equal(a, b)
    assert restored.overrides["x"] == "skip"
    assert restored.site_spec("fc").rank == 7
    assert restored.to_dict() == config.to_dict()


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown STLConfig keys \\['tiles'\\]"):
        STLConfig.from_dict({"basis": "random", "tiles": 4})


# --- issue 13: config cases that were silent or unclear -------------------------------------

def test_targets_accepts_a_plain_string():
    assert STLConfig(basis="random", targets="linear").targets == frozenset({"linear"})
    assert STLConfig(basis="random", targets="matmul").targets_for() == frozenset({"matmul"})
    with pytest.raises(ValueError, match="unknown targets \\['conv'\\]"):
        STLConfig(basis="random", targets="conv")


@pytest.mark.parametrize("override, message", [
    ({"rank": 0}, "override 'fc\\*': rank must be >= 1, got 0"),
    ({"rank": 0, "basis": "strassen"}, "override 'fc\\*': rank must be >= 1"),
    ({"tile": 1}, "override 'fc\\*': tile must be >= 2"),
    ({"rank": 100}, "override 'fc\\*': rank=100 exceeds tile\\*\\*3=64"),
    ({"basis": "bogus"}, "override 'fc\\*': unknown basis name 'bogus'"),
    ({"basis": bases.random(2, 5)}, "override 'fc\\*': basis 'random2x5' has tile 2"),
    ({"basis": bases.random(4, 16), "rank": 24}, "override 'fc\\*': rank=24 contradicts"),
])
def test_bad_override_fails_when_the_config_is_built_and_names_the_pattern(override, message):
    with pytest.raises(ValueError, match=message):
        STLConfig(basis="random", overrides={"blocks.*": {"rank": 8}, "fc*": override})


def test_rank_above_tile_cubed_is_rejected():
    with pytest.raises(ValueError, match="rank=100 exceeds tile\\*\\*3=64.*use rank <= 64"):
        STLConfig(basis="random", rank=100)
    assert STLConfig(basis="random", rank=64).site_spec("a").rank == 64
    # exact named bases fix their own rank, which is checked (strassen(8): 343 <= 512)
    assert STLConfig(basis="strassen", tile=8).site_spec("a").rank == 343


def test_rank_and_basis_object_must_agree():
    basis = bases.random(4, 16)
    assert STLConfig(basis=basis).site_spec("a").rank == 16          # rank unset: the basis's
    assert STLConfig(basis=basis, rank=16).site_spec("a").rank == 16  # equal: fine
    with pytest.raises(ValueError, match="rank=24 contradicts the basis object 'random4x16' of "
                                         "rank 16; leave rank unset"):
        STLConfig(basis=basis, rank=24)
    # an override's basis object brings its own rank; the top-level rank is for the others
    config = STLConfig(basis="random", rank=12, overrides={"fc": {"basis": basis}})
    assert config.site_spec("fc").rank == 16 and config.site_spec("x").rank == 12
    assert STLConfig(basis="random").site_spec("x").rank == 24  # the default rank


def test_filter_fn_signature_is_checked():
    with pytest.raises(TypeError, match="filter_fn\\(module, fqn\\) -> bool.*signature \\(fqn\\)"):
        STLConfig(basis="random", filter_fn=lambda fqn: True)
    with pytest.raises(TypeError, match="named 'fqn', as in the old \\(fqn, node\\) order"):
        STLConfig(basis="random", filter_fn=lambda fqn, node: True)
    with pytest.raises(TypeError, match="must be a callable"):
        STLConfig(basis="random", filter_fn="linear")
    STLConfig(basis="random", filter_fn=lambda module, fqn: True)
    STLConfig(basis="random", filter_fn=lambda *args: True)


@pytest.mark.parametrize("name", ["max_cost_ratio", "max_bytes_ratio"])
@pytest.mark.parametrize("value", [0, -1.0, "1", True])
def test_cost_limits_are_checked(name, value):
    with pytest.raises(ValueError, match=f"{name} must be a number > 0 or None"):
        STLConfig(basis="random", **{name: value})


def test_cost_reason():
    config = STLConfig(basis="random", max_bytes_ratio=3.0)
    assert config.cost_reason(100, 80, 10, 30) == ""  # both limits reached exactly: convert
    assert config.cost_reason(100, 81, 10, 10) == ("cost: STL costs 0.81x dense FLOPs > "
                                                   "max_cost_ratio=0.8 (max_cost_ratio=None "
                                                   "converts anyway)")
    assert "3.10x dense bytes (x) > max_bytes_ratio=3" in config.cost_reason(100, 50, 10, 31,
                                                                               " (x)")
    assert STLConfig(basis="random", max_cost_ratio=None).cost_reason(1, 1000, 1, 1) == ""


def test_unused_overrides():
    config = STLConfig(basis="random", overrides={"blocks.*": "skip", "hed": {"rank": 8}})
    assert config.unused_overrides(["blocks.0.fc1", "head"]) == ["hed"]


@pytest.mark.parametrize("alpha", [-5.0, float("nan"), float("inf")])
def test_basis_with_a_bad_alpha_is_rejected(alpha, tmp_path):
    from safetensors.torch import save_file

    good = bases.random(2, 3)
    with pytest.raises(ValueError, match="alpha is a mean squared error: a finite number >= 0"):
        bases.STLBasis(2, 3, *good.matrices, alpha=alpha)
    path = tmp_path / "bad.safetensors"  # a basis file written by hand / by another tool
    save_file(dict(zip(("ex", "ew", "d"), good.matrices)), str(path),
              metadata={"format": "stl-basis/1", "tile": "2", "rank": "3",
                        "alpha": json.dumps(alpha)})
    with pytest.raises(ValueError, match="alpha is a mean squared error"):
        bases.load(path)


# --- row_grouping="causal" -------------------------------------------------------------------

def test_causal_grouping_with_fitted_resolves_to_the_shipped_causal_basis():
    from stl_compiler.tiling import is_causal

    basis = STLConfig(basis="fitted", rank=24, row_grouping="causal").site_spec("x").basis
    shipped = bases.causal(4, 24)
    assert basis.name == shipped.name and is_causal(basis, tol=0.0)
    assert all(torch.equal(a, b) for a, b in zip(basis.matrices, shipped.matrices))
    # "batch" keeps the row-separable basis, "tokens" the general fitted one
    batch = STLConfig(basis="fitted", rank=24, row_grouping="batch").site_spec("x").basis
    assert batch.name.startswith("row-separable")
    tokens = STLConfig(basis="fitted", rank=24, row_grouping="tokens").site_spec("x").basis
    assert torch.equal(tokens.ex, bases.fitted(4, 24).ex)


def test_causal_grouping_falls_back_to_row_separable_then_raises():
    assert 8 not in bases.causal_ranks(4)
    basis = STLConfig(basis="fitted", rank=8, row_grouping="causal").site_spec("x").basis
    assert basis.name.startswith("row-separable") and basis.rank == 8
    with pytest.raises(ValueError, match=r"ranks \[16, 20.*rank 9 is neither"):
        STLConfig(basis="fitted", rank=9, row_grouping="causal").site_spec("x")


def test_causal_grouping_refuses_a_basis_that_is_not_causal():
    with pytest.raises(ValueError, match="reads only tile rows at or before the first row it "
                                         "writes.*'fitted4x24'.*depend on tokens after it"):
        STLConfig(basis=bases.fitted(4, 24), row_grouping="causal").site_spec("x")
    with pytest.raises(ValueError, match="row_grouping='causal' needs a basis"):
        STLConfig(basis="strassen-pruned", rank=24, row_grouping="causal").site_spec("x")


# --- basis="fitted-bf16" ---------------------------------------------------------------------

def test_fitted_bf16_selects_the_shipped_bf16_basis_and_converts_like_the_object():
    from torch import nn

    from stl_compiler import swap_linears_

    shipped = bases.fitted(4, 24, conditioning="bf16")
    basis = STLConfig(basis="fitted-bf16", rank=24).site_spec("x").basis
    assert basis.name == shipped.name == "fitted4x24-bf16"
    assert all(torch.equal(a, b) for a, b in zip(basis.matrices, shipped.matrices))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 32))
    by_name, by_object = (copy.deepcopy(model) for _ in range(2))
    common = {"min_dim": 1, "max_cost_ratio": None, "row_grouping": "tokens"}
    swap_linears_(by_name, STLConfig(basis="fitted-bf16", rank=24, **common))
    swap_linears_(by_object, STLConfig(basis=shipped, **common))
    x = torch.randn(3, 8, 32)
    with torch.no_grad():
        assert torch.equal(by_name(x), by_object(x))
        assert not torch.equal(by_name(x), model(x))
    # the name survives to_dict / from_dict
    config = STLConfig(basis="fitted-bf16", rank=40)
    assert STLConfig.from_dict(json.loads(json.dumps(config.to_dict()))).site_spec("x").basis \
        is config.site_spec("x").basis


def test_fitted_bf16_with_batch_or_causal_grouping_is_the_same_as_fitted():
    for grouping in ("batch", "causal"):
        bf16 = STLConfig(basis="fitted-bf16", rank=24, row_grouping=grouping).site_spec("x")
        plain = STLConfig(basis="fitted", rank=24, row_grouping=grouping).site_spec("x")
        assert bf16.basis.name == plain.basis.name
        assert all(torch.equal(a, b) for a, b in zip(bf16.basis.matrices, plain.basis.matrices))


# --- basis="auto" (the default) --------------------------------------------------------------

def _same_basis(a: bases.STLBasis, b: bases.STLBasis) -> bool:
    return a.name == b.name and all(torch.equal(x, y) for x, y in zip(a.matrices, b.matrices))


def test_auto_is_the_default_and_resolves_by_the_site_dtype():
    config = STLConfig()
    assert config.basis == "auto"
    plain, bf16 = bases.fitted(4, 24), bases.fitted(4, 24, conditioning="bf16")
    for dtype in (None, torch.float32, torch.float64):
        assert _same_basis(config.site_spec("x", dtype=dtype).basis, plain)
    for dtype in (torch.bfloat16, torch.float16):
        assert _same_basis(config.site_spec("x", dtype=dtype).basis, bf16)
    # the cache key holds the resolved name: one entry per choice, reused
    assert config.site_spec("a", dtype=torch.bfloat16).basis \
        is config.site_spec("b", dtype=torch.float16).basis
    assert config.site_spec("a").basis is STLConfig(basis="fitted").site_spec("a").basis
    # an override may name "auto" too
    mixed = STLConfig(basis="random", overrides={"fc": {"basis": "auto"}})
    assert _same_basis(mixed.site_spec("fc", dtype=torch.bfloat16).basis, bf16)
    assert mixed.site_spec("other", dtype=torch.bfloat16).basis.name.startswith("random")


def test_auto_with_batch_or_causal_grouping_is_the_same_as_fitted():
    for grouping in ("batch", "causal"):
        plain = STLConfig(basis="fitted", row_grouping=grouping).site_spec("x").basis
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            auto = STLConfig(row_grouping=grouping).site_spec("x", dtype=dtype).basis
            assert _same_basis(auto, plain)


def test_auto_round_trips_through_to_dict():
    config = STLConfig()
    data = json.loads(json.dumps(config.to_dict()))
    assert data["basis"] == "auto"
    restored = STLConfig.from_dict(data)
    assert restored == config and restored.basis == "auto"
    assert restored.site_spec("x", dtype=torch.bfloat16).basis \
        is config.site_spec("x", dtype=torch.bfloat16).basis


def test_auto_needs_a_bf16_basis_of_the_rank_when_the_config_is_built(monkeypatch):
    from stl_compiler import config as config_module

    fitted = bases.fitted

    def no_bf16_at_40(tile=4, rank=24, conditioning=None):
        if conditioning == "bf16" and rank == 40:
            raise ValueError("no bf16-conditioned fitted basis ships for tile=4, rank=40")
        return fitted(tile, rank, conditioning)

    monkeypatch.setattr(bases, "fitted", no_bf16_at_40)
    monkeypatch.setattr(config_module, "_BASIS_CACHE", {})
    with pytest.raises(ValueError, match=r"basis='auto' \(the default\) picks the "
                                         r"bf16-conditioned .*rank=40.*pass basis='fitted'"):
        STLConfig(rank=40)
    with pytest.raises(ValueError, match="override 'fc'.*basis='auto'"):
        STLConfig(basis="random", overrides={"fc": {"basis": "auto", "rank": 40}})
    STLConfig(basis="fitted", rank=40)  # float32 only: fine
    STLConfig(rank=40, row_grouping="causal")  # resolves like "fitted": no bf16 basis needed
