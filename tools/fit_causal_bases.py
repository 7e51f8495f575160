"""Regenerate the causal token bases shipped in ``stl_compiler/data`` and their index.

    .venv/bin/python tools/fit_causal_bases.py                # all shipped ranks
    .venv/bin/python tools/fit_causal_bases.py --ranks 24 40  # some of them
    .venv/bin/python tools/fit_causal_bases.py --table        # the table of docs/quality.md

Each rank is fitted by ``fit_basis(4, rank, data=token_moments(4, RHO), support="causal",
restarts=RESTARTS, steps=STEPS, ridge=RIDGE, seed=0)``: ALS restricted to causal terms (each
term reads only tile rows at or before its pivot row, writes only rows at or after it), to
tiles of 4 consecutive tokens whose neighbours are correlated RHO (AR(1)); the pivot split is
searched first (``fit_basis``'s pattern search). The basis is written with ``STLBasis.save``,
its ``alpha`` the class-0 α (Gaussian tiles), its metadata the token correlation, the α on
those tokens and the command, unless the file already shipped is at least as good on the
tokens (ALS is not bit-reproducible across machines). ``fitted_bases.json`` gets a
``"causal"`` section: per rank the Gaussian α, the token α, the row-separable basis' α (the
same on both: (64 − r)/16), the terms per pivot row and the command. The other sections of
the index are kept as they are.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from stl_compiler import bases
from stl_compiler.fit import basis_alpha, fit_basis
from stl_compiler.fit.alpha import token_moments
from stl_compiler.fit.fitting import basis_pivots
from stl_compiler.tiling import is_causal, row_separable

RANKS = (16, 20, 24, 28, 32, 36, 40, 44, 48)
TILE, STEPS, RESTARTS, RIDGE, RHO = 4, 500, 4, 1e-5, 0.5
DATA = os.path.join(os.path.dirname(__file__), os.pardir, "stl_compiler", "data")


def table(ranks: list[int]) -> None:
    """Print the α vs rank table of docs/quality.md ("Causal bases") as markdown rows."""
    sys.path.insert(0, os.path.dirname(__file__))
    from alpha_vs_rank import bf16_alpha

    moments = token_moments(TILE, RHO)
    print(f"| r | causal (shipped, fitted at rho={RHO}): Gaussian / tokens / bf16 | causal "
          f"fitted to Gaussian tiles | row-separable: Gaussian = tokens / bf16 | general "
          f"fitted (not causal): Gaussian / tokens / bf16 |")
    print("|---|---|---|---|---|")
    for rank in ranks:
        causal = bases.causal(TILE, rank)
        gaussian_fit = fit_basis(TILE, rank, support="causal", restarts=2, steps=300)[1]
        separable = row_separable(TILE, rank)
        general = bases.fitted(TILE, rank)
        cells = [f"{basis_alpha(causal):.4f} / {basis_alpha(causal, moments):.4f} / "
                 f"{bf16_alpha(causal):.4f}", f"{gaussian_fit:.4f}",
                 f"{basis_alpha(separable):.4f} / {bf16_alpha(separable):.4f}",
                 f"{basis_alpha(general):.4f} / {basis_alpha(general, moments):.4f} / "
                 f"{bf16_alpha(general):.4f}"]
        print(f"| {rank} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=list(RANKS))
    parser.add_argument("--table", action="store_true",
                        help="fit nothing: print the alpha table of docs/quality.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.table:
        table(args.ranks)
        return
    index_path = os.path.join(DATA, "fitted_bases.json")
    with open(index_path) as handle:
        index = json.load(handle)
    section = index.setdefault("causal", {})
    section.update({
        "rho": RHO,
        "data": f"fit.alpha.token_moments({TILE}, {RHO}): rows of a tile are consecutive "
                f"tokens, correlation rho**|a-b|, features independent, W i.i.d. N(0, 1)",
        "alpha": "class-0 alpha (Gaussian tiles); alpha_tokens: on the tokens fitted to",
    })
    section.setdefault("bases", {})
    moments = token_moments(TILE, RHO)
    for rank in args.ranks:
        start = time.perf_counter()
        basis, alpha_tokens = fit_basis(TILE, rank, data=moments, support="causal",
                                        restarts=RESTARTS, steps=STEPS, ridge=RIDGE, seed=0)
        seconds = time.perf_counter() - start
        assert is_causal(basis, tol=0.0)
        alpha = basis_alpha(basis)
        name = f"causal_t{TILE}_r{rank}.safetensors"
        command = (f"stl-compiler fit-basis --causal --rho {RHO} --tile {TILE} --rank {rank} "
                   f"--restarts {RESTARTS} --steps {STEPS} --ridge {RIDGE:g} --out {name}")
        print(f"rank {rank}: alpha={alpha:.4f} alpha_tokens={alpha_tokens:.4f} "
              f"({seconds:.0f}s)", file=sys.stderr, flush=True)
        path = os.path.join(DATA, name)
        if os.path.exists(path) and basis_alpha(bases.load(path), moments) <= alpha_tokens * (
                1 + 1e-9):
            basis = bases.load(path)
            alpha, alpha_tokens = basis_alpha(basis), basis_alpha(basis, moments)
            print(f"rank {rank}: kept the shipped file (alpha_tokens={alpha_tokens:.4f})",
                  file=sys.stderr)
        else:
            basis = bases.STLBasis(TILE, rank, *basis.matrices, name=f"causal{TILE}x{rank}",
                                   alpha=alpha)
            basis.save(path, metadata={"support": "causal", "rho": json.dumps(RHO),
                                       "alpha_tokens": json.dumps(alpha_tokens),
                                       "command": command})
            os.chmod(path, 0o644)
        pivots = basis_pivots(basis)
        separable = basis_alpha(row_separable(TILE, rank)) if rank % TILE == 0 else None
        section["bases"][str(rank)] = {
            "file": name, "alpha": alpha, "alpha_tokens": alpha_tokens,
            "alpha_row_separable": separable,
            "alpha_tokens_row_separable": None if separable is None else basis_alpha(
                row_separable(TILE, rank), moments),
            "terms_per_pivot_row": [pivots.count(a) for a in range(TILE)],
            "fit_seconds": round(seconds, 1), "command": command,
        }
        section["bases"] = dict(sorted(section["bases"].items(), key=lambda kv: int(kv[0])))
        with open(index_path, "w") as handle:
            json.dump(index, handle, indent=1)
            handle.write("\n")


if __name__ == "__main__":
    main()
