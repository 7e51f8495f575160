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
                    "goes to stderr.")
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
    basis, alpha = fit_basis(args.tile, args.rank, init=args.init, method=args.method,
                             restarts=args.restarts, steps=args.steps, seed=args.seed,
                             ridge=args.ridge, progress=True)
    basis.save(args.out)
    ref = two_four_alpha(args.tile) if args.tile % 4 == 0 else None
    summary = {"alpha": alpha, "alpha_2_4": ref, "rank": args.rank, "tile": args.tile}
    verdict = "" if ref is None else (" (matches 2:4)" if alpha <= ref else " (above 2:4)")
    print(f"wrote {args.out}: tile={args.tile} rank={args.rank} alpha={alpha:.6g}"
          f"{'' if ref is None else f' alpha_2:4={ref:.6g}'}{verdict}")
    if args.json:
        print(json.dumps(summary))
    return 0
