"""STLConfig: what to convert, with which tile, rank and basis."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from . import bases
from .bases import STLBasis
from .tiling import check_row_grouping

__all__ = ["STLConfig", "SiteSpec", "TARGETS"]

TARGETS = ("linear", "matmul")
SKIP = "skip"


@dataclass(frozen=True)
class SiteSpec:
    """The resolved choice for one site: tile, rank and basis."""

    tile: int
    rank: int
    basis: STLBasis


@dataclass
class STLConfig:
    """How :func:`stl_compiler.stl_compile` converts a model (a plain dataclass).

    Attributes:
        tile: tile side t.
        rank: tensor rank r (number of small GEMMs); t³/r is the ideal GEMM speedup.
        basis: an :class:`STLBasis` or a name: "fitted" (shipped bases fitted to Gaussian
            tiles), "strassen" / "naive" (exact; their rank is fixed by the tile),
            "strassen-pruned", "random".
        targets: which sites to convert: "linear" (parameter weights) and/or "matmul"
            (activation × activation, e.g. attention QKᵀ and AV).
        filter_fn: ``(fqn, node) -> bool``; a site is converted only when it returns True.
        overrides: ``{fnmatch pattern on the site name: {"tile"/"rank"/"basis": ...} or
            "skip"}``; the first matching pattern applies.
        min_dim: sites with any of n, k, m below this stay dense (too small to gain).
        pad: zero-pad dims that are not multiples of the tile; when False such sites stay dense.
        row_grouping: "tokens" (t consecutive positions share a tile) or "batch" (the same
            position of t sequences: causality-safe for decoders).
        decompose_sdpa: rewrite ``scaled_dot_product_attention`` into explicit matmuls so its
            QKᵀ and AV become STL sites.
        fuse: run the decode→encode fusion passes.
        fuse_row_strip: with ``fuse``, also fuse decode → residual add → LayerNorm/RMSNorm →
            encode into one row-strip op (off: those boundaries stay unfused, for comparison).
        measure_error: run the example inputs through each converted site and report its
            relative output error.
        seed: seed of random / pruned bases.
    """

    tile: int = 4
    rank: int = 24
    basis: STLBasis | str = "fitted"
    targets: frozenset[str] | set[str] | tuple[str, ...] = frozenset(TARGETS)
    filter_fn: Callable[[str, Any], bool] | None = None
    overrides: Mapping[str, Mapping[str, Any] | str] = field(default_factory=dict)
    min_dim: int = 16
    pad: bool = True
    row_grouping: str = "tokens"
    decompose_sdpa: bool = False
    fuse: bool = True
    fuse_row_strip: bool = True
    measure_error: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        self.targets = frozenset(self.targets)
        unknown = self.targets - set(TARGETS)
        if unknown:
            raise ValueError(f"unknown targets {sorted(unknown)}; choose from {TARGETS}")
        check_row_grouping(self.row_grouping)
        if self.min_dim < 0:
            raise ValueError(f"min_dim must be >= 0, got {self.min_dim}")
        for pattern, override in self.overrides.items():
            if override == SKIP:
                continue
            if not isinstance(override, Mapping) or set(override) - {"tile", "rank", "basis"}:
                raise ValueError(f"override for {pattern!r} must be 'skip' or a dict with keys "
                                 f"tile / rank / basis, got {override!r}")
        self.site_spec("")  # fail now, not at the first site, on a bad tile/rank/basis

    def override_for(self, fqn: str) -> Mapping[str, Any] | str | None:
        for pattern, override in self.overrides.items():
            if fnmatch.fnmatchcase(fqn, pattern):
                return override
        return None

    def site_spec(self, fqn: str) -> SiteSpec | None:
        """Tile, rank and basis for the site ``fqn``, or None when an override skips it."""
        override = self.override_for(fqn)
        if override == SKIP:
            return None
        chosen = {"tile": self.tile, "rank": self.rank, "basis": self.basis, **(override or {})}
        basis = _cached_basis(chosen["basis"], chosen["tile"], chosen["rank"], self.seed)
        return SiteSpec(basis.tile, basis.rank, basis)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict; :meth:`from_dict` restores it."""
        if self.filter_fn is not None:
            raise ValueError("filter_fn is a Python callable and cannot be serialized; express "
                             "the rule as overrides={pattern: 'skip'} instead")
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "filter_fn"}
        out["targets"] = sorted(self.targets)
        out["basis"] = _basis_to_dict(self.basis)
        out["overrides"] = {
            p: o if o == SKIP else {**o, **({"basis": _basis_to_dict(o["basis"])}
                                            if "basis" in o else {})}
            for p, o in self.overrides.items()
        }
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> STLConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown STLConfig keys {sorted(unknown)}")
        values = dict(data)
        if "basis" in values:
            values["basis"] = _basis_from_dict(values["basis"])
        if "overrides" in values:
            values["overrides"] = {
                p: o if o == SKIP else {**o, **({"basis": _basis_from_dict(o["basis"])}
                                                if "basis" in o else {})}
                for p, o in values["overrides"].items()
            }
        return cls(**values)


_BASIS_CACHE: dict[tuple, STLBasis] = {}


def _cached_basis(spec: STLBasis | str, tile: int, rank: int, seed: int) -> STLBasis:
    if isinstance(spec, STLBasis):
        return bases.resolve(spec, tile, rank, seed)
    key = (spec, tile, rank, seed)
    if key not in _BASIS_CACHE:
        _BASIS_CACHE[key] = bases.resolve(spec, tile, rank, seed)
    return _BASIS_CACHE[key]


def _basis_to_dict(basis: STLBasis | str) -> Any:
    if isinstance(basis, str):
        return basis
    return {"name": basis.name, "tile": basis.tile, "rank": basis.rank, "alpha": basis.alpha,
            "ex": basis.ex.tolist(), "ew": basis.ew.tolist(), "d": basis.d.tolist()}


def _basis_from_dict(data: Any) -> STLBasis | str:
    if isinstance(data, (str, STLBasis)):
        return data
    mats = {k: torch.tensor(data[k], dtype=torch.float64) for k in ("ex", "ew", "d")}
    return STLBasis(int(data["tile"]), int(data["rank"]), **mats, name=data.get("name", "custom"),
                    alpha=data.get("alpha"))
