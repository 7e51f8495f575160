"""STL bases: the encoders ``ex``, ``ew`` and the decoder ``d`` of one t×t tile product.

Convention (docs/math.md): a t×t tile ``M`` is vectorized row-major, ``vec(M)[a*t + b] = M[a, b]``;
each of ``ex``, ``ew``, ``d`` is a ``(rank, tile*tile)`` matrix and one tile product is

    vec(X @ W) ≈ d.T @ ((ex @ vec(X)) * (ew @ vec(W)))

A basis is *exact* when this holds with equality for every X, W (Strassen, naive, dps48).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

__all__ = [
    "STLBasis",
    "strassen",
    "naive",
    "pruned",
    "random",
    "fitted",
    "fitted_ranks",
    "FITTED_CONDITIONINGS",
    "causal",
    "causal_ranks",
    "dps48",
    "DPS48_VARIANTS",
    "load",
    "resolve",
    "tile_product_tensor",
]

_FORMAT = "stl-basis/1"


def _check_tile_rank(tile: object, rank: object) -> None:
    if isinstance(tile, bool) or not isinstance(tile, int):
        raise TypeError(f"tile must be an int, got {type(tile).__name__}")
    if tile < 2:
        raise ValueError(f"tile must be >= 2 (a 1x1 tile is a plain scalar product), got {tile}")
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")


@dataclass(frozen=True, eq=False)
class STLBasis:
    """Encoders and decoder of the STL operator for one tile size and tensor rank.

    Args:
        tile: tile side t (>= 2).
        rank: tensor rank r (>= 1), the number of small GEMMs.
        ex: ``(rank, tile*tile)`` encoder of the left operand X (activations).
        ew: ``(rank, tile*tile)`` encoder of the right operand W (weights).
        d: ``(rank, tile*tile)`` decoder.
        name: a label shown in reports.
        alpha: mean squared error per output entry for Gaussian X, W tiles, when known.

    Construction validates shapes, dtypes and finiteness, and stores the three matrices as
    contiguous float64 CPU tensors; use :meth:`to` for the dtype/device of a model.
    """

    tile: int
    rank: int
    ex: torch.Tensor
    ew: torch.Tensor
    d: torch.Tensor
    name: str = "custom"
    alpha: float | None = field(default=None)

    def __post_init__(self) -> None:
        _check_tile_rank(self.tile, self.rank)
        expected = (self.rank, self.tile * self.tile)
        for label in ("ex", "ew", "d"):
            value = getattr(self, label)
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"basis matrix {label!r} must be a torch.Tensor, got "
                                f"{type(value).__name__}")
            if not value.is_floating_point():
                raise TypeError(f"basis matrix {label!r} must be floating point, got {value.dtype}")
            if tuple(value.shape) != expected:
                raise ValueError(f"basis matrix {label!r} has shape {tuple(value.shape)}; a basis "
                                 f"with tile={self.tile}, rank={self.rank} needs (rank, tile*tile)"
                                 f" = {expected}")
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"basis matrix {label!r} contains NaN or Inf")
            object.__setattr__(self, label, value.detach().to("cpu", torch.float64).contiguous())
        if self.alpha is not None and (isinstance(self.alpha, bool) or not isinstance(
                self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha < 0):
            raise ValueError(f"alpha is a mean squared error: a finite number >= 0 or None "
                             f"(unknown), got {self.alpha!r}")

    @property
    def matrices(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.ex, self.ew, self.d

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ex, ew, d)`` converted to ``dtype`` / ``device``."""
        return tuple(m.to(device=device, dtype=dtype) for m in self.matrices)  # type: ignore

    def tensor(self) -> torch.Tensor:
        """The ``(t², t², t²)`` tensor this basis computes: ``sum_p ex[p]⊗ew[p]⊗d[p]``."""
        return torch.einsum("pa,pb,pc->abc", self.ex, self.ew, self.d)

    def exactness_error(self) -> float:
        """Frobenius distance to the exact tile-product tensor (0 for an exact basis)."""
        return float(torch.linalg.vector_norm(self.tensor() - tile_product_tensor(self.tile)))

    def save(self, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
        """Write the basis to a safetensors file (no pickle: loading never runs code).

        ``metadata``: extra string entries stored in the file header (e.g. provenance);
        they cannot override the basis' own keys (format, tile, rank, name, alpha).
        """
        from safetensors.torch import save_file

        meta = {"format": _FORMAT, "tile": str(self.tile), "rank": str(self.rank),
                "name": self.name, "alpha": json.dumps(self.alpha)}
        extra = dict(metadata or {})
        clash = sorted(set(extra) & set(meta))
        if clash:
            raise ValueError(f"metadata keys {clash} are reserved for the basis itself; rename "
                             f"them (reserved: {sorted(meta)})")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
            raise TypeError(f"metadata must map str to str, got {extra!r}")
        meta.update(extra)
        save_file({"ex": self.ex, "ew": self.ew, "d": self.d}, os.fspath(path), metadata=meta)

    def __repr__(self) -> str:
        alpha = "" if self.alpha is None else f", alpha={self.alpha:.4g}"
        return f"STLBasis(name={self.name!r}, tile={self.tile}, rank={self.rank}{alpha})"


def load(path: str | os.PathLike) -> STLBasis:
    """Read a basis written by :meth:`STLBasis.save`.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a safetensors file holding an STL basis.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no basis file at {path!r}")
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            meta = handle.metadata() or {}
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path!r} is not a safetensors file, so not an STL basis "
                         f"(write one with STLBasis.save): {err}") from err
    if meta.get("format") != _FORMAT or not {"ex", "ew", "d"} <= tensors.keys():
        raise ValueError(f"{path!r} is a safetensors file but not an STL basis: expected metadata "
                         f"format={_FORMAT!r} and tensors ex, ew, d; found tensors "
                         f"{sorted(tensors)} and metadata {meta}")
    try:
        tile, rank = int(meta["tile"]), int(meta["rank"])
        alpha = json.loads(meta.get("alpha", "null"))
    except (KeyError, ValueError) as err:
        raise ValueError(f"{path!r}: malformed basis metadata {meta}") from err
    return STLBasis(tile, rank, tensors["ex"], tensors["ew"], tensors["d"],
                    name=meta.get("name", "loaded"), alpha=alpha)


def tile_product_tensor(tile: int) -> torch.Tensor:
    """The exact ``(t², t², t²)`` tensor of the t×t matrix product, row-major vectors.

    ``T[i*t+l, l*t+j, i*t+j] = 1``: X[i,l]·W[l,j] contributes to Y[i,j].
    """
    _check_tile_rank(tile, 1)
    t = tile
    T = torch.zeros(t * t, t * t, t * t, dtype=torch.float64)
    for i in range(t):
        for l in range(t):
            for j in range(t):
                T[i * t + l, l * t + j, i * t + j] = 1.0
    return T


def naive(tile: int) -> STLBasis:
    """The exact basis of rank t³: one product X[i,l]·W[l,j] per row."""
    _check_tile_rank(tile, 1)
    t = tile
    r = t ** 3
    ex, ew, d = (torch.zeros(r, t * t, dtype=torch.float64) for _ in range(3))
    p = 0
    for i in range(t):
        for l in range(t):
            for j in range(t):
                ex[p, i * t + l] = ew[p, l * t + j] = d[p, i * t + j] = 1.0
                p += 1
    return STLBasis(t, r, ex, ew, d, name=f"naive{t}", alpha=0.0)


# Strassen (1969) on a 2×2 block matrix; columns are row-major (11, 12, 21, 22).
_STRASSEN2_EX = [[1, 0, 0, 1], [0, 0, 1, 1], [1, 0, 0, 0], [0, 0, 0, 1],
                 [1, 1, 0, 0], [-1, 0, 1, 0], [0, 1, 0, -1]]
_STRASSEN2_EW = [[1, 0, 0, 1], [1, 0, 0, 0], [0, 1, 0, -1], [-1, 0, 1, 0],
                 [0, 0, 0, 1], [1, 1, 0, 0], [0, 0, 1, 1]]
_STRASSEN2_D = [[1, 0, 0, 1], [0, 0, 1, -1], [0, 1, 0, 1], [1, 0, 1, 0],
                [-1, 1, 0, 0], [0, 0, 0, 1], [1, 0, 0, 0]]


def _nest(outer: torch.Tensor, inner: torch.Tensor, inner_tile: int) -> torch.Tensor:
    """Rows of a 2×2-block outer scheme applied to (inner_tile × inner_tile) blocks.

    Entry (a, b) of the (2s × 2s) tile splits as a = a_hi*s + a_lo; the nested coefficient is
    outer[p_out, a_hi*2 + b_hi] * inner[p_in, a_lo*s + b_lo], with row p = p_out*r_in + p_in.
    """
    s = inner_tile
    o = outer.reshape(-1, 2, 1, 2, 1)            # (p_out, a_hi, ., b_hi, .)
    i = inner.reshape(-1, 1, s, 1, s)            # (p_in, ., a_lo, ., b_lo)
    nested = o[:, None] * i[None]                # (p_out, p_in, a_hi, a_lo, b_hi, b_lo)
    return nested.reshape(outer.shape[0] * inner.shape[0], 4 * s * s)


def strassen(tile: int = 4) -> STLBasis:
    """Strassen's exact basis for a power-of-two tile: rank 7^log2(tile) (49 for tile 4)."""
    _check_tile_rank(tile, 1)
    if tile & (tile - 1):
        raise ValueError(f"strassen needs a power-of-two tile, got {tile}; use naive({tile})")
    mats = [torch.tensor(m, dtype=torch.float64) for m in
            (_STRASSEN2_EX, _STRASSEN2_EW, _STRASSEN2_D)]
    result, t = list(mats), 2
    while t < tile:
        result = [_nest(o, r, t) for o, r in zip(mats, result)]
        t *= 2
    return STLBasis(tile, result[0].shape[0], *result, name=f"strassen{tile}", alpha=0.0)


def pruned(basis: STLBasis, rank: int, seed: int = 0) -> STLBasis:
    """Keep a random subset of ``rank`` rows of ``basis`` (paper appendix B.1)."""
    if not isinstance(basis, STLBasis):
        raise TypeError(f"pruned() takes an STLBasis, got {type(basis).__name__}")
    _check_tile_rank(basis.tile, rank)
    if rank > basis.rank:
        raise ValueError(f"cannot prune a rank-{basis.rank} basis to rank {rank}")
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randperm(basis.rank, generator=gen)[:rank].sort().values
    alpha = basis.alpha if rank == basis.rank else None
    return STLBasis(basis.tile, rank, basis.ex[rows], basis.ew[rows], basis.d[rows],
                    name=f"{basis.name}-pruned{rank}", alpha=alpha)


def random(tile: int, rank: int, seed: int = 0) -> STLBasis:
    """A Gaussian basis, scaled so an encoded entry has the variance of a tile entry."""
    _check_tile_rank(tile, rank)
    gen = torch.Generator().manual_seed(seed)
    scale = 1.0 / math.sqrt(tile * tile)
    ex, ew, d = (torch.randn(rank, tile * tile, generator=gen, dtype=torch.float64) * scale
                 for _ in range(3))
    return STLBasis(tile, rank, ex, ew, d, name=f"random{tile}x{rank}")


def resolve(spec: STLBasis | str, tile: int, rank: int, seed: int = 0) -> STLBasis:
    """Turn a basis name into an :class:`STLBasis` of the requested tile and rank.

    Names: ``"strassen"`` (exact, rank fixed by the tile), ``"strassen-pruned"``,
    ``"naive"`` (exact, rank t³), ``"dps48"`` (exact, rank 48, tile 4 only; see
    :func:`dps48`), ``"random"``, ``"fitted"`` (shipped fitted bases, minimum α),
    ``"fitted-bf16"`` (shipped bf16-conditioned bases: ``fitted(tile, rank, "bf16")``).
    An ``STLBasis`` is checked against ``tile`` and returned as is.
    """
    if isinstance(spec, STLBasis):
        if spec.tile != tile:
            raise ValueError(f"basis {spec.name!r} has tile {spec.tile}, config asks for {tile}")
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"basis must be an STLBasis or a name, got {type(spec).__name__}")
    if spec == "strassen":
        return strassen(tile)
    if spec == "naive":
        return naive(tile)
    if spec == "strassen-pruned":
        return pruned(strassen(tile), rank, seed)
    if spec == "random":
        return random(tile, rank, seed)
    if spec == "fitted":
        return fitted(tile, rank)
    if spec == "fitted-bf16":
        return fitted(tile, rank, conditioning="bf16")
    if spec == "dps48":
        if tile != 4:
            raise ValueError(f"basis 'dps48' is a 4x4 tile scheme, config asks for tile {tile}; "
                             f"use tile=4 or basis='strassen'")
        return dps48()
    raise ValueError(f"unknown basis name {spec!r}; choose one of 'fitted', 'fitted-bf16', "
                     f"'strassen', 'strassen-pruned', 'naive', 'dps48', 'random', or pass an "
                     f"STLBasis")


def _data_dir() -> str:
    return os.path.join(os.path.dirname(__file__), "data")


#: ``conditioning`` values of :func:`fitted`: None (minimum α) and ``"bf16"``.
FITTED_CONDITIONINGS = (None, "bf16")


def _fitted_prefix(conditioning: str | None) -> str:
    if conditioning not in FITTED_CONDITIONINGS:
        raise ValueError(f"conditioning must be one of {FITTED_CONDITIONINGS} (None: the "
                         f"minimum-alpha basis; 'bf16': the bf16-conditioned one), got "
                         f"{conditioning!r}")
    return "fitted" if conditioning is None else f"fitted_{conditioning}"


def fitted_ranks(tile: int = 4, conditioning: str | None = None) -> list[int]:
    """Ranks for which a fitted basis of this tile (and ``conditioning``, see :func:`fitted`)
    ships with the package."""
    pattern = re.compile(rf"{_fitted_prefix(conditioning)}_t{tile}_r(\d+)\.safetensors$")
    names = os.listdir(_data_dir()) if os.path.isdir(_data_dir()) else []
    return sorted(int(m.group(1)) for m in map(pattern.match, names) if m)


def fitted(tile: int = 4, rank: int = 24, conditioning: str | None = None) -> STLBasis:
    """A shipped basis fitted to Gaussian tiles (``stl_compiler/data``; see docs/quality.md).

    Its ``alpha`` is the mean squared error per output entry for Gaussian X, W tiles.

    Args:
        tile, rank: tile side and tensor rank of a shipped basis (:func:`fitted_ranks`).
        conditioning: None (default): the minimum-α basis, for float32 deployment (its
            cancelling product terms amplify bf16 rounding: a bf16 layer drifts 5-42× as much
            from its float32 output as a dense layer does). ``"bf16"``: the bf16-conditioned
            basis of the rank (``STLConfig(basis="fitted-bf16")``), for bf16 or fp16
            deployment: the smallest-α basis found whose one-layer bf16 drift is at most 3×
            a dense layer's (CPU float64 emulation of bf16; coefficients are bf16 numbers).
            It costs α: +4% at rank 16, +9% at 24, +42% at 40 (per rank in
            ``stl_compiler/data/fitted_bases.json`` → ``bf16`` and docs/quality.md, "bf16-safe
            bases"); made by ``tools/fit_bf16_bases.py``. Its file's metadata records the α of
            the minimum-α basis (``alpha_min_alpha``), the measured ``drift_ratio`` and how
            it was fitted.
    """
    _check_tile_rank(tile, rank)
    prefix = _fitted_prefix(conditioning)
    path = os.path.join(_data_dir(), f"{prefix}_t{tile}_r{rank}.safetensors")
    if not os.path.exists(path) and conditioning is not None:
        raise ValueError(f"no {conditioning}-conditioned fitted basis ships for tile={tile}, "
                         f"rank={rank}; shipped ranks for tile {tile}: "
                         f"{fitted_ranks(tile, conditioning) or 'none'}. Make one with "
                         f"tools/fit_bf16_bases.py, or fit with a larger penalty "
                         f"(`stl-compiler fit-basis --tile {tile} --rank {rank} --ridge 0.01 "
                         f"--out FILE`) and pass bases.load(FILE)")
    if not os.path.exists(path):
        # fit-basis's default init prunes Strassen's basis: a power-of-two tile, rank <= its
        pow2 = tile & (tile - 1) == 0
        init = "" if pow2 and rank <= 7 ** (tile.bit_length() - 1) else " --init random"
        raise ValueError(f"no fitted basis ships for tile={tile}, rank={rank}; shipped ranks for "
                         f"tile {tile}: {fitted_ranks(tile) or 'none'}. Fit one with "
                         f"`stl-compiler fit-basis --tile {tile} --rank {rank}{init} --out FILE` "
                         f"and pass bases.load(FILE) (or `--basis FILE` to "
                         f"`stl-compiler export`)")
    return load(path)


def causal_ranks(tile: int = 4) -> list[int]:
    """Ranks for which a causal basis (:func:`causal`) of this tile ships with the package."""
    pattern = re.compile(rf"causal_t{tile}_r(\d+)\.safetensors$")
    names = os.listdir(_data_dir()) if os.path.isdir(_data_dir()) else []
    return sorted(int(m.group(1)) for m in map(pattern.match, names) if m)


def causal(tile: int = 4, rank: int = 24) -> STLBasis:
    """A shipped causal token basis (``stl_compiler/data/causal_t{tile}_r{rank}.safetensors``).

    For ``row_grouping="causal"`` (a tile's rows are t consecutive tokens of one sequence):
    every product term reads only tile rows at or before the first row it writes
    (:func:`stl_compiler.tiling.is_causal`, exact zeros), so no token's output depends on a
    later token. It is fitted (``fit_basis(support="causal")``, ALS with the zero pattern
    enforced) to tiles whose rows are correlated tokens, ``fit.token_moments(tile, rho)``
    (neighbour correlation ``rho``, recorded in the file's metadata and in
    ``stl_compiler/data/fitted_bases.json``): for i.i.d. Gaussian tiles no causal basis of
    rank r beats the row-separable one, α = (t³ − r)/t², the gain comes from neighbouring
    tokens being alike (docs/quality.md, "Causal bases"). ``alpha`` is still the class-0
    (Gaussian tiles) α, above the row-separable basis' at the same rank; the metadata key
    ``alpha_tokens`` is the α on the correlated tokens it was fitted to.
    ``STLConfig(row_grouping="causal", basis="fitted")`` resolves to it.
    """
    _check_tile_rank(tile, rank)
    path = os.path.join(_data_dir(), f"causal_t{tile}_r{rank}.safetensors")
    if not os.path.exists(path):
        raise ValueError(f"no causal basis ships for tile={tile}, rank={rank}; shipped causal "
                         f"ranks for tile {tile}: {causal_ranks(tile) or 'none'}. Fit one with "
                         f"`stl-compiler fit-basis --causal --rho 0.5 --tile {tile} --rank {rank} "
                         f"--out FILE` and pass bases.load(FILE), or use "
                         f"stl_compiler.tiling.row_separable(tile, rank)")
    return load(path)


DPS48_VARIANTS = ("rational", "accurate")


def dps48(variant: str = "rational") -> STLBasis:
    """The exact rank-48 basis for 4×4 tiles of Dumas, Pernet and Sedoglavic (2025).

    One fewer product than Strassen's 49, with real dyadic coefficients, exact in bf16:
    {0, ±1, ±1/2, ±1/4, ±1/8} (rational) or {0, ±1, ±2, ±1/8} (accurate). Source: "A
    non-commutative algorithm for multiplying 4×4 matrices using 48 non-complex
    multiplications", arXiv:2506.13242; data from the PLinOpt repository
    (github.com/jgdumas/plinopt, CeCILL-B licence), converted by ``tools/parse_plinopt.py``;
    provenance in ``stl_compiler/data/README.md`` and in the file's metadata.

    Args:
        variant: ``"rational"`` (the published rational scheme) or ``"accurate"`` (the
            authors' numerically more accurate variant; its bf16 error is about half).
    """
    if variant not in DPS48_VARIANTS:
        raise ValueError(f"variant must be one of {DPS48_VARIANTS}, got {variant!r}")
    path = os.path.join(_data_dir(), f"dps48_t4_{variant}.safetensors")
    if not os.path.exists(path):
        raise ValueError(f"the dps48 {variant!r} basis file {path!r} is missing from this "
                         f"installation; regenerate it with tools/parse_plinopt.py")
    return load(path)
