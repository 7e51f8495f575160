"""The basis cache of STLConfig: named bases are resolved once per key, and the cache is
bounded (least recently used dropped first)."""

from __future__ import annotations

from stl_compiler import STLConfig, config


def _basis(seed: int):
    return STLConfig(basis="random", rank=8, seed=seed).site_spec("x").basis


def test_same_key_same_object():
    assert _basis(1) is _basis(1)
    assert _basis(1) is not _basis(2)


def test_bounded_least_recently_used(monkeypatch):
    monkeypatch.setattr(config, "_BASIS_CACHE", {})
    monkeypatch.setattr(config, "_BASIS_CACHE_SIZE", 3)
    first = _basis(0)
    for seed in (1, 2):
        _basis(seed)
    assert _basis(0) is first  # a hit: now the most recently used
    _basis(3)  # evicts seed 1, the least recently used
    assert len(config._BASIS_CACHE) == 3
    assert sorted(key[3] for key in config._BASIS_CACHE) == [0, 2, 3]
    assert _basis(0) is first
