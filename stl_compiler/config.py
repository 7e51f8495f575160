"""STLConfig: what to convert, with which tile, rank and basis."""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from . import bases
from .bases import STLBasis
from .tiling import (
    causality_message,
    check_row_grouping,
    is_causal,
    is_row_separable,
    row_mixing_message,
    row_separable,
)

__all__ = ["STLConfig", "SiteSpec", "TARGETS"]

TARGETS = ("linear", "matmul")
SKIP = "skip"
#: The default basis name: "fitted-bf16" for bfloat16 / float16 sites, "fitted" otherwise.
AUTO = "auto"
#: Site dtypes for which "auto" picks the bf16-conditioned bases (they serve fp16 as well).
HALF_DTYPES = (torch.bfloat16, torch.float16)


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
        rank: tensor rank r (number of small GEMMs); t³/r is the ideal GEMM speedup. None
            (the default) means 24 for a named basis and the basis's own rank for an
            :class:`STLBasis`; a rank given together with a basis object must equal its rank.
            At most t³ (the exact naive basis): more terms cost more than the dense product.
        basis: an :class:`STLBasis` or a name. "auto" (the default) picks per site by the
            dtype the site computes in: "fitted-bf16" for bfloat16 / float16, "fitted" for
            float32 / float64 (and where no dtype is known, e.g. ``site_spec(fqn)`` without
            ``dtype``). A linear site's dtype is its weight's at conversion, an activation ×
            activation site's its inputs'. Why: the minimum-α "fitted" bases amplify bf16/fp16
            rounding (a bf16 layer drifts 5-42× as much from its float32 output as a dense one
            does), the bf16-conditioned ones at most ~3×, for a slightly larger α
            (docs/quality.md, "bf16-safe bases"). The choice is made when the model is
            converted: a model converted in float32 and cast to bf16 afterwards keeps the
            float32 choice, so convert in the deployment dtype, pass ``basis="fitted-bf16"``,
            or calibrate (:func:`stl_compiler.calibrate`; after it the basis choice no longer
            matters, docs/quality.md). "fitted" (shipped bases fitted to Gaussian tiles,
            minimum α: for float32), "fitted-bf16" (the shipped bf16-conditioned bases,
            :func:`stl_compiler.bases.fitted` with ``conditioning="bf16"``: for bf16 / fp16
            deployment; a bf16 layer drifts at most ~3× as much as a dense one instead of
            5-42×, for a larger α, e.g. +9% at rank 24), "strassen" / "naive" (exact; their
            rank is fixed by the tile), "dps48" (exact rank-48 scheme, tile 4:
            :func:`stl_compiler.bases.dps48`), "strassen-pruned", "random". With
            ``row_grouping="batch"``, "auto", "fitted" and "fitted-bf16" resolve to
            :func:`stl_compiler.tiling.row_separable` of the rank, and any other basis must be
            row-separable (:func:`stl_compiler.tiling.is_row_separable`), else ValueError.
            With ``row_grouping="causal"``, "auto", "fitted" and "fitted-bf16" resolve to the
            shipped causal basis of the rank (:func:`stl_compiler.bases.causal`; already within
            2× dense in bf16), else to the row-separable one, and any other basis must be
            causal (:func:`stl_compiler.tiling.is_causal`). "auto" needs a shipped basis of the
            rank in both conditionings (checked when the config is built, for "tokens" and
            automatic grouping).
        targets: which sites to convert: "linear" (parameter weights) and/or "matmul"
            (activation × activation, e.g. attention QKᵀ and AV); a string names one. None
            (default): both, except that a model which already holds ``STLLinear`` layers
            (calibrated or trained) keeps its matmul sites dense, as converting them would add
            uncalibrated error; name "matmul" explicitly to convert them anyway.
        filter_fn: ``(module, fqn) -> bool`` (torchao's order); a site is converted only when
            it returns True. ``module`` is the ``nn.Module`` owning the weight of a linear site
            and None for an activation × activation site.
        overrides: ``{fnmatch pattern on the site name: {"tile"/"rank"/"basis": ...} or
            "skip"}``; the first matching pattern applies. Checked when the config is built.
        min_dim: sites with any of k, m below this stay dense (too small to gain).
        max_cost_ratio: a site stays dense when its STL FLOPs (encode, small GEMMs, decode;
            on the example inputs) exceed this times its dense FLOPs; None converts regardless
            of cost. The default 0.8 asks each site to save at least 20% of its FLOPs: its
            encode and decode are memory-bound, so FLOPs undercount STL's cost, and every
            site adds error. At rank 24, t=4 a linear saves 1 − 24/64 − 24/k − 24/m.
        max_bytes_ratio: a site stays dense when the bytes it moves (docs/math.md's model)
            exceed this times the dense bytes; None (default) does not gate on bytes.
        pad: zero-pad dims that are not multiples of the tile; when False such sites stay dense.
        row_grouping: "tokens" (t consecutive positions share a tile), "causal" (the same
            tiles with a causal basis: no position depends on a later one; for decoders) or
            "batch" (the same position of t sequences: causality-safe too; needs a
            row-separable basis so that batched sequences stay independent). None (the
            default) chooses per model: "causal" for a causal model (causal attention in the
            captured graph, or a transformers decoder / ``*ForCausalLM`` / generation model;
            :mod:`stl_compiler.passes.detect_causal`), "tokens" for any other model. When every
            basis the config names is exact ("strassen", "dps48", "naive") a causal model gets
            "tokens" too: exact products keep causality up to round-off (the report says
            "kept up to round-off") and attention matmuls stay convertible. Explicit "tokens"
            on a causal model with an inexact basis is refused (ValueError) unless
            ``allow_non_causal``.
        allow_non_causal: accept ``row_grouping="tokens"`` with an inexact basis on a causal
            model, where a position's output then depends on up to t−1 later positions of its
            tile (e.g. to time the fastest grouping); the report says "causal: NOT kept". No
            effect otherwise.
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
    rank: int | None = None
    basis: STLBasis | str = AUTO
    targets: frozenset[str] | set[str] | tuple[str, ...] | str | None = None
    filter_fn: Callable[[nn.Module | None, str], bool] | None = None
    overrides: Mapping[str, Mapping[str, Any] | str] = field(default_factory=dict)
    min_dim: int = 16
    max_cost_ratio: float | None = 0.8
    max_bytes_ratio: float | None = None
    pad: bool = True
    row_grouping: str | None = None
    allow_non_causal: bool = False
    decompose_sdpa: bool = False
    fuse: bool = True
    fuse_row_strip: bool = True
    measure_error: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.targets is not None:
            targets = {self.targets} if isinstance(self.targets, str) else self.targets
            self.targets = frozenset(targets)
            unknown = self.targets - set(TARGETS)
            if unknown:
                raise ValueError(f"unknown targets {sorted(unknown)}; choose from {TARGETS} "
                                 f"(a string or a set of them)")
        if self.row_grouping is not None:  # None: chosen per model (stl_compile, swap_linears_)
            check_row_grouping(self.row_grouping)
        if not isinstance(self.allow_non_causal, bool):
            raise TypeError(f"allow_non_causal must be True or False, got "
                            f"{self.allow_non_causal!r}")
        if self.min_dim < 0:
            raise ValueError(f"min_dim must be >= 0, got {self.min_dim}")
        for name in ("max_cost_ratio", "max_bytes_ratio"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not value > 0):
                raise ValueError(f"{name} must be a number > 0 or None (no limit), got {value!r}")
        if self.filter_fn is not None:
            _check_filter_fn(self.filter_fn)
        self._validate({})  # fail now, not at the first site, on a bad tile/rank/basis
        for pattern, override in self.overrides.items():
            if override == SKIP:
                continue
            if not isinstance(override, Mapping) or set(override) - {"tile", "rank", "basis"}:
                raise ValueError(f"override for {pattern!r} must be 'skip' or a dict with keys "
                                 f"tile / rank / basis, got {override!r}")
            self._validate(override, pattern)

    def targets_for(self, has_stl_layers: bool = False) -> frozenset[str]:
        """The site kinds to convert in a model (``has_stl_layers``: it already holds STL
        layers, whose act×act neighbours then stay dense unless ``targets`` names them)."""
        if self.targets is not None:
            return self.targets
        return frozenset({"linear"}) if has_stl_layers else frozenset(TARGETS)

    def override_pattern(self, fqn: str) -> str | None:
        """The first override pattern matching ``fqn`` (``fnmatch``, case-sensitive)."""
        return next((p for p in self.overrides if fnmatch.fnmatchcase(fqn, p)), None)

    def override_for(self, fqn: str) -> Mapping[str, Any] | str | None:
        pattern = self.override_pattern(fqn)
        return None if pattern is None else self.overrides[pattern]

    def unused_overrides(self, names: Iterable[str]) -> list[str]:
        """Override patterns that match none of ``names`` (the sites of a model)."""
        names = list(names)
        return [p for p in self.overrides if not any(fnmatch.fnmatchcase(n, p) for n in names)]

    def site_spec(self, fqn: str, *, dtype: torch.dtype | None = None) -> SiteSpec | None:
        """Tile, rank and basis for the site ``fqn``, or None when an override skips it.

        ``dtype``: the dtype the site computes in (a linear's weight dtype, an activation ×
        activation site's input dtype); it decides what ``basis="auto"`` resolves to
        ("fitted-bf16" for bfloat16 / float16, else "fitted"; None: "fitted")."""
        pattern = self.override_pattern(fqn)
        override = None if pattern is None else self.overrides[pattern]
        if override == SKIP:
            return None
        basis = self._resolve(override or {}, pattern, dtype)
        return SiteSpec(basis.tile, basis.rank, basis)

    def cost_reason(self, dense_flops: int, stl_flops: int, dense_bytes: int, stl_bytes: int,
                    detail: str = "") -> str:
        """Why a site must stay dense by :attr:`max_cost_ratio` / :attr:`max_bytes_ratio`
        (``detail`` is appended to the ratio, e.g. " (head size 16)"); "" when it may convert."""
        limits = (("FLOPs", "max_cost_ratio", dense_flops, stl_flops),
                  ("bytes", "max_bytes_ratio", dense_bytes, stl_bytes))
        for unit, name, dense, stl in limits:
            limit = getattr(self, name)
            if limit is not None and dense > 0 and stl > limit * dense:
                return (f"cost: STL costs {stl / dense:.2f}x dense {unit}{detail} > "
                        f"{name}={limit:g} ({name}=None converts anyway)")
        return ""

    def _resolve(self, override: Mapping[str, Any], pattern: str | None = None,
                 dtype: torch.dtype | None = None) -> STLBasis:
        try:
            return _resolve_basis(self, override, dtype)
        except (TypeError, ValueError) as error:
            if pattern is None:
                raise
            raise type(error)(f"override {pattern!r}: {error}") from error

    def _validate(self, override: Mapping[str, Any], pattern: str | None = None) -> None:
        """Resolve ``override`` (may be empty) as a site would; "auto" with "tokens" or
        automatic grouping for both of its choices, as a site of either dtype needs one."""
        self._resolve(override, pattern)
        spec = override["basis"] if "basis" in override else self.basis
        if spec == AUTO and self.row_grouping in (None, "tokens"):
            self._resolve(override, pattern, torch.bfloat16)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict; :meth:`from_dict` restores it."""
        if self.filter_fn is not None:
            raise ValueError("filter_fn is a Python callable and cannot be serialized; express "
                             "the rule as overrides={pattern: 'skip'} instead")
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "filter_fn"}
        out["targets"] = None if self.targets is None else sorted(self.targets)
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


DEFAULT_RANK = 24
#: Bases resolved from names, (spec, tile, rank, seed, row_grouping) -> STLBasis, least
#: recently used first; bounded (:data:`_BASIS_CACHE_SIZE`): a long session that sweeps
#: ranks or seeds keeps the latest only. A basis is a pure function of its key.
_BASIS_CACHE: dict[tuple, STLBasis] = {}
_BASIS_CACHE_SIZE = 32


def _check_filter_fn(fn: object) -> None:
    expected = ("filter_fn must be a callable filter_fn(module, fqn) -> bool (torchao's order; "
                "module is the nn.Module owning a linear site's weight, None for an "
                "activation x activation site)")
    if not callable(fn):
        raise TypeError(f"{expected}, got {type(fn).__name__}")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have none: nothing to check
        return
    try:
        signature.bind(None, "")
    except TypeError:
        raise TypeError(f"{expected}; got a callable with signature {signature}") from None
    first = next(iter(signature.parameters), None)
    if first in ("fqn", "name"):
        raise TypeError(f"{expected}; the first parameter of this one is named {first!r}, as "
                        f"in the old (fqn, node) order: swap its parameters (see CHANGELOG.md)")


def _resolve_basis(config: STLConfig, override: Mapping[str, Any],
                   dtype: torch.dtype | None = None) -> STLBasis:
    """The basis of a site computing in ``dtype`` (None: unknown): ``override`` (may be
    empty) over the config's fields."""
    tile = override.get("tile", config.tile)
    if "basis" in override:  # a rank only counts when given in the same place as the basis
        spec, rank = override["basis"], override.get("rank")
    else:
        spec, rank = config.basis, override.get("rank", config.rank)
    if isinstance(spec, STLBasis):
        if rank is not None and rank != spec.rank:
            raise ValueError(f"rank={rank} contradicts the basis object {spec.name!r} of rank "
                             f"{spec.rank}; leave rank unset (None) to use the basis's rank, or "
                             f"pass a basis of rank {rank}")
        rank = spec.rank
    rank = DEFAULT_RANK if rank is None else rank
    bases._check_tile_rank(tile, rank)
    # None (automatic) is resolved per model by stl_compile / swap_linears_ before any site
    # converts; until then a basis is checked as for "tokens" (any basis fits)
    row_grouping = "tokens" if config.row_grouping is None else config.row_grouping
    auto = isinstance(spec, str) and spec == AUTO
    if auto:  # the cache key holds the resolved name: sites of two dtypes differ
        spec = auto_basis(dtype, row_grouping)
    key = (spec, tile, rank, config.seed, row_grouping)
    if isinstance(spec, STLBasis) or key not in _BASIS_CACHE:
        try:
            basis = _basis_for_grouping(spec, tile, rank, config.seed, row_grouping)
        except ValueError as error:
            if not (auto and spec == "fitted-bf16"):
                raise
            raise ValueError(f"basis='auto' (the default) picks the bf16-conditioned basis for "
                             f"bfloat16 / float16 sites: {error}. For float32 deployment only, "
                             f"pass basis='fitted'") from None
        if basis.rank > tile ** 3:  # checked on the result: "strassen"/"naive" fix their rank
            raise ValueError(f"rank={basis.rank} exceeds tile**3={tile ** 3}, the rank of the "
                             f"exact naive basis: STL would cost more than the dense product; "
                             f"use rank <= {tile ** 3} (basis='naive' is exact at {tile ** 3})")
        if isinstance(spec, STLBasis):
            return basis
        _BASIS_CACHE[key] = basis
        while len(_BASIS_CACHE) > _BASIS_CACHE_SIZE:
            del _BASIS_CACHE[next(iter(_BASIS_CACHE))]  # the least recently used
    _BASIS_CACHE[key] = _BASIS_CACHE.pop(key)  # now the most recently used
    return _BASIS_CACHE[key]


def auto_basis(dtype: torch.dtype | None, row_grouping: str | None = "tokens") -> str:
    """The basis name ``basis="auto"`` resolves to for a site computing in ``dtype``:
    "fitted-bf16" for bfloat16 / float16 with "tokens" (or automatic) grouping, else "fitted"
    (with "batch" / "causal" grouping both names give the same bases)."""
    if dtype in HALF_DTYPES and row_grouping in (None, "tokens"):
        return "fitted-bf16"
    return "fitted"


def _basis_for_grouping(spec: STLBasis | str, tile: int, rank: int, seed: int,
                        row_grouping: str) -> STLBasis:
    """The basis of ``spec`` (``"auto"`` already resolved by :func:`auto_basis`) for
    ``row_grouping``. ``"fitted"`` means: the shipped general fitted basis ("tokens"); the
    row-separable basis ("batch": the one kind of inexact basis that keeps rows apart); the
    shipped causal basis of the rank (``bases.causal``), else the row-separable one
    ("causal"). ``"fitted-bf16"`` is the shipped bf16-conditioned basis
    ("tokens") and the same as ``"fitted"`` otherwise: the row-separable and causal bases
    are already bf16-safe (amplification 1-1.14, docs/quality.md). Any other basis must be
    row-separable ("batch") or causal ("causal"), else ValueError."""
    if row_grouping == "tokens":
        return bases.resolve(spec, tile, rank, seed)
    if spec == "fitted-bf16":
        spec = "fitted"
    if spec == "fitted" and row_grouping == "causal":
        if rank in bases.causal_ranks(tile):
            return bases.causal(tile, rank)
        if rank % tile or rank > tile ** 3:
            raise ValueError(
                f"row_grouping='causal' with basis='fitted' needs a shipped causal basis "
                f"(tile {tile}: ranks {bases.causal_ranks(tile) or 'none'}) or a row-separable "
                f"one (ranks that are multiples of {tile}, at most {tile ** 3}); rank {rank} "
                f"is neither. Choose one of those ranks, or fit a causal basis with "
                f"`stl-compiler fit-basis --causal --rho 0.5 --tile {tile} --rank {rank} --out "
                f"FILE` and pass basis=stl_compiler.bases.load(FILE)")
        return row_separable(tile, rank)
    if spec == "fitted":  # ("batch") the one kind of inexact basis that keeps rows apart
        return row_separable(tile, rank)
    basis = bases.resolve(spec, tile, rank, seed)
    if row_grouping == "batch" and not is_row_separable(basis):
        raise ValueError(row_mixing_message(basis))
    if row_grouping == "causal" and not is_causal(basis):
        raise ValueError(causality_message(basis))
    return basis


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
