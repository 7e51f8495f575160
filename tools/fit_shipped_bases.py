"""Regenerate the fitted bases shipped in ``stl_compiler/data`` and their index.

    .venv/bin/python tools/fit_shipped_bases.py                # all shipped ranks
    .venv/bin/python tools/fit_shipped_bases.py --ranks 24 40  # some of them

Each basis is ``fit_basis(4, rank, init="deflate", steps=STEPS, ridge=RIDGE)`` (deterministic),
written with ``STLBasis.save``; ``fitted_bases.json`` records its α, the 2:4 reference and the
equivalent ``stl-compiler fit-basis`` command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from stl_compiler.fit import fit_basis, two_four_alpha

RANKS = (16, 20, 24, 28, 32, 36, 40, 41, 42, 44, 48)
TILE, STEPS, RIDGE = 4, 500, 1e-5
DATA = os.path.join(os.path.dirname(__file__), os.pardir, "stl_compiler", "data")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=list(RANKS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    index_path = os.path.join(DATA, "fitted_bases.json")
    index = {"tile": TILE, "alpha_2_4": two_four_alpha(TILE), "bases": {}}
    if os.path.exists(index_path):
        with open(index_path) as handle:
            index["bases"] = json.load(handle)["bases"]
    for rank in args.ranks:
        start = time.perf_counter()
        basis, alpha = fit_basis(TILE, rank, init="deflate", steps=STEPS, ridge=RIDGE,
                                 progress=True)
        name = f"fitted_t{TILE}_r{rank}.safetensors"
        basis.save(os.path.join(DATA, name))
        os.chmod(os.path.join(DATA, name), 0o644)
        index["bases"][str(rank)] = {
            "file": name, "alpha": alpha, "matches_2_4": alpha <= index["alpha_2_4"],
            "command": f"stl-compiler fit-basis --tile {TILE} --rank {rank} --init deflate "
                       f"--steps {STEPS} --ridge {RIDGE:g} --out {name}",
        }
        index["bases"] = dict(sorted(index["bases"].items(), key=lambda kv: int(kv[0])))
        print(f"rank {rank}: alpha={alpha:.4f} ({time.perf_counter() - start:.0f}s)",
              file=sys.stderr, flush=True)
        with open(index_path, "w") as handle:
            json.dump(index, handle, indent=1)
            handle.write("\n")


if __name__ == "__main__":
    main()
