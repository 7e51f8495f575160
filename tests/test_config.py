"""STLConfig: validation, per-site overrides, to_dict / from_dict.

The default basis "fitted" needs shipped data files, so every test names a basis explicitly.
"""

from __future__ import annotations

import json

import pytest
import torch

from stl_compiler import STLConfig, bases


def test_site_spec_defaults():
    config = STLConfig(basis="random", tile=4, rank=12)
    spec = config.site_spec("blocks.0.fc1")
    assert (spec.tile, spec.rank, spec.basis.rank) == (4, 12, 12)
    assert config.targets == frozenset({"linear", "matmul"})
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
    config = STLConfig(basis="random", filter_fn=lambda fqn, node: True)
    with pytest.raises(ValueError, match="filter_fn"):
        config.to_dict()


def _round_trip(config: STLConfig) -> STLConfig:
    return STLConfig.from_dict(json.loads(json.dumps(config.to_dict())))


def test_to_dict_round_trip_with_basis_name():
    config = STLConfig(tile=2, rank=5, basis="strassen-pruned", targets=["linear"], min_dim=3,
                       pad=False, row_grouping="batch", decompose_sdpa=True, fuse=False,
                       measure_error=False, seed=7,
                       overrides={"a.*": "skip", "b": {"rank": 3, "basis": "random"}})
    data = config.to_dict()
    assert data["targets"] == ["linear"] and data["basis"] == "strassen-pruned"
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
