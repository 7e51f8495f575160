"""``stl-compiler fit-basis``: fit an STL basis to Gaussian tiles and save it."""

from __future__ import annotations

import argparse
import json
import os

from .fitting import INITS, METHODS


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


def run(args: argparse.Namespace) -> int:
    """Fit, save, and report α next to the 2:4 reference."""
    from .alpha import two_four_alpha
    from .fitting import fit_basis

    if os.path.exists(args.out) and not args.force:
        raise FileExistsError(f"{args.out!r} already exists; pass --force to overwrite it")
    parent = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"output directory {parent!r} does not exist")
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
