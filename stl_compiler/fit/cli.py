"""``stl-compiler fit-basis``: fit an STL basis to Gaussian tiles and save it."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from .fitting import INITS, METHODS

# inits that start from Strassen's exact basis, which exists for power-of-two tiles only
_STRASSEN_INITS = ("strassen-pruned", "deflate")
_DEFLATE_SWEEPS = 30  # ALS sweeps of each candidate refit of init=deflate (fitting._deflate)
_DPS48_RANK = 48  # init=deflate-dps48 starts from bases.dps48(), exact for 4x4 tiles only


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``fit-basis`` subcommand."""
    parser = subparsers.add_parser(
        "fit-basis", help="fit an STL basis to Gaussian tiles (alpha vs 2:4)",
        description="Fit a rank-r STL basis to the t×t matrix product for Gaussian tiles and "
                    "write it as safetensors (load it with stl_compiler.bases.load). Progress "
                    "goes to stderr. --causal fits a causal token basis (for "
                    "row_grouping='causal'), --rho its token correlation.")
    parser.add_argument("--tile", type=int, default=4, help="tile side t (default 4)")
    parser.add_argument("--rank", type=int, required=True, help="tensor rank r")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--method", choices=METHODS, default="als", help="default als")
    parser.add_argument("--init", choices=INITS, default="strassen-pruned",
                        help="default strassen-pruned")
    parser.add_argument("--restarts", type=int, default=4, help="independent fits (default 4)")
    parser.add_argument("--steps", type=int, default=500,
                        help="ALS sweeps or SGD steps per restart (default 500)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ridge", type=float, default=1e-5,
                        help="ALS penalty on row-norm products (default 1e-5)")
    parser.add_argument("--causal", action="store_true",
                        help="fit a causal token basis (row_grouping='causal'): every term "
                             "reads only tile rows at or before the first row it writes "
                             "(fit_basis(support='causal'); ALS from the row-separable basis "
                             "and random starts; --init is ignored)")
    parser.add_argument("--rho", type=float, nargs="+", default=None,
                        help="with --causal: fit to tiles of consecutive tokens whose "
                             "neighbours are correlated (fit.alpha.token_moments): one value, "
                             "the lag-1 correlation of an AR(1) sequence, or tile-1 values, "
                             "the correlations at lags 1, 2, ... (e.g. measured on your "
                             "model's activations); alpha_tokens is the alpha on those tiles, "
                             "alpha the Gaussian one. Without it the fit is to Gaussian "
                             "tiles, where no causal basis beats the row-separable one")
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    parser.add_argument("--json", action="store_true",
                        help="print a JSON summary as the last stdout line")
    parser.set_defaults(func=run)
    return parser


def _check_args(args: argparse.Namespace) -> None:
    """Reject, before any work, what would fail late or write a useless basis."""
    for flag, value in (("--tile", args.tile), ("--rank", args.rank),
                        ("--restarts", args.restarts), ("--steps", args.steps)):
        least = 2 if flag == "--tile" else 1
        if value < least:
            why = " (0 steps would write the initial basis unfitted)" if flag == "--steps" else ""
            raise ValueError(f"{flag} must be >= {least}, got {value}{why}")
    if args.rho is not None and not args.causal:
        raise ValueError("--rho needs --causal (it is the token correlation of a causal fit)")
    if args.rho is not None:
        from .alpha import token_moments

        if len(args.rho) not in (1, args.tile - 1):
            raise ValueError(f"--rho takes 1 value (AR(1)) or {args.tile - 1} (lags 1..."
                             f"{args.tile - 1}), got {len(args.rho)}")
        token_moments(args.tile, args.rho[0] if len(args.rho) == 1 else args.rho)
    if args.causal:
        if args.init not in ("strassen-pruned", "random"):
            raise ValueError(f"--causal starts from the row-separable basis and random causal "
                             f"bases; drop --init {args.init}")
        if args.method != "als":
            raise ValueError(f"--causal is fitted by ALS only; drop --method {args.method}")
        return
    if args.init in _STRASSEN_INITS:
        if args.tile & (args.tile - 1):
            raise ValueError(f"--tile {args.tile} with --init {args.init}: that init starts from "
                             f"Strassen's exact basis, which exists only for power-of-two tiles "
                             f"(2, 4, 8, ...); use --init random for tile {args.tile}")
        exact = 7 ** int(math.log2(args.tile))
        if args.rank > exact:
            raise ValueError(f"--rank {args.rank} with --init {args.init}: Strassen's basis for "
                             f"tile {args.tile} has rank {exact}; use --init random for a "
                             f"higher rank")
    if args.init == "deflate-dps48":
        if args.tile != 4:
            raise ValueError(f"--tile {args.tile} with --init deflate-dps48: that init starts "
                             f"from the exact rank-48 scheme for 4x4 tiles; use --tile 4, or "
                             f"--init deflate (from Strassen) for tile {args.tile}")
        if args.rank > _DPS48_RANK:
            raise ValueError(f"--rank {args.rank} with --init deflate-dps48: the scheme it "
                             f"starts from has rank {_DPS48_RANK}; use --rank <= {_DPS48_RANK}, "
                             f"or --init strassen-pruned / random for a higher rank")


def _exact_rank(init: str, tile: int) -> int:
    """Rank of the exact basis a deflation starts from (Strassen's or the rank-48 scheme)."""
    return _DPS48_RANK if init == "deflate-dps48" else 7 ** int(math.log2(tile))


def _deflate_estimate(tile: int, rank: int, exact: int) -> float:
    """Seconds a deflation from the exact rank-``exact`` basis should take on this machine: it
    times one candidate refit (ALS at the rank just below ``exact``) and scales it to every
    row removal (``r`` candidates at rank ``r - 1``, each costing about in proportion to its
    rank)."""
    from .fitting import fit_basis

    start = time.perf_counter()
    fit_basis(tile, exact - 1, init="random", restarts=1, steps=_DEFLATE_SWEEPS)
    one = time.perf_counter() - start
    return one * sum(r * (r - 1) for r in range(rank + 1, exact + 1)) / (exact - 1)


def _fit_causal(args: argparse.Namespace) -> tuple[object, float, dict]:
    """``--causal``: the basis with its Gaussian α, and the extra summary entries."""
    from .alpha import basis_alpha, token_moments
    from .fitting import fit_basis

    rho = None if args.rho is None else args.rho[0] if len(args.rho) == 1 else args.rho
    data = "gaussian" if rho is None else token_moments(args.tile, rho)
    basis, fitted_alpha = fit_basis(args.tile, args.rank, data=data, support="causal",
                                    restarts=args.restarts, steps=args.steps, seed=args.seed,
                                    ridge=args.ridge, progress=True)
    alpha = basis_alpha(basis)  # class-0 (Gaussian tiles), the α a basis file records
    basis = type(basis)(basis.tile, basis.rank, *basis.matrices, name=basis.name, alpha=alpha)
    separable = (args.tile ** 3 - args.rank) / args.tile ** 2 if args.rank <= args.tile ** 3 \
        else 0.0
    extra: dict = {"support": "causal", "alpha_row_separable": separable}
    if rho is not None:
        extra.update(rho=rho, alpha_tokens=fitted_alpha)
    return basis, alpha, extra


def run(args: argparse.Namespace) -> int:
    """Fit, save, and report α next to the 2:4 reference."""
    from .alpha import two_four_alpha
    from .fitting import fit_basis

    _check_args(args)
    if os.path.exists(args.out) and not args.force:
        raise FileExistsError(f"{args.out!r} already exists; pass --force to overwrite it")
    parent = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"output directory {parent!r} does not exist")
    if args.init.startswith("deflate"):
        estimate = _deflate_estimate(args.tile, args.rank, _exact_rank(args.init, args.tile))
        if estimate > 30:
            print(f"fit-basis: warning: --init {args.init} removes rows one at a time (each "
                  f"removal refits every candidate, whatever --steps): about {estimate:.0f} s on "
                  f"this machine; --init strassen-pruned takes seconds", file=sys.stderr,
                  flush=True)
    if args.causal:
        basis, alpha, extra = _fit_causal(args)
    else:
        basis, alpha = fit_basis(args.tile, args.rank, init=args.init, method=args.method,
                                 restarts=args.restarts, steps=args.steps, seed=args.seed,
                                 ridge=args.ridge, progress=True)
        extra = {}
    basis.save(args.out, metadata={k: v if isinstance(v, str) else json.dumps(v)
                                   for k, v in extra.items()})
    ref = two_four_alpha(args.tile) if args.tile % 4 == 0 else None
    summary = {"alpha": alpha, "alpha_2_4": ref, "rank": args.rank, "tile": args.tile, **extra}
    verdict = "" if ref is None else (" (matches 2:4)" if alpha <= ref else " (above 2:4)")
    more = "".join(f" {k}={v:.6g}" for k, v in extra.items() if isinstance(v, float))
    print(f"wrote {args.out}: tile={args.tile} rank={args.rank} alpha={alpha:.6g}"
          f"{'' if ref is None else f' alpha_2:4={ref:.6g}'}{verdict}{more}")
    if args.json:
        print(json.dumps(summary))
    return 0
