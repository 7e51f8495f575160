"""α vs rank for Gaussian 4×4 tiles: shipped fitted bases vs the paper's SGD and random init.

    .venv/bin/python tools/alpha_vs_rank.py --plot docs/img/alpha_vs_rank.png

For every shipped rank: the shipped basis (exact α and a bf16 Monte Carlo estimate), Adam
("sgd", the paper's method) from Strassen-pruned and from random init, and ALS from
Strassen-pruned init, each with 4 restarts; the 2:4 line is ``two_four_alpha(4)``.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from stl_compiler import bases
from stl_compiler.fit import fit_basis, two_four_alpha


def bf16_alpha(basis: bases.STLBasis, n: int = 200_000) -> float:
    """Monte Carlo α with encode, product and decode in bfloat16 (fixed seed)."""
    gen = torch.Generator().manual_seed(0)
    x, w = (torch.randn(n, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    exact = (x.view(n, 4, 4) @ w.view(n, 4, 4)).reshape(n, 16)
    ex, ew, d = basis.to(torch.bfloat16)
    approx = ((x.bfloat16() @ ex.T) * (w.bfloat16() @ ew.T)) @ d
    return float((exact - approx.double()).square().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plot", help="PNG path")
    parser.add_argument("--json", help="write the table as JSON here")
    parser.add_argument("--steps", type=int, default=2000, help="SGD steps per restart")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ref = two_four_alpha(4)
    rows = []
    for rank in bases.fitted_ranks(4):
        shipped = bases.fitted(4, rank)
        row = {"rank": rank, "fitted": shipped.alpha, "fitted_bf16": bf16_alpha(shipped)}
        for label, init, method, steps in (("sgd_strassen_pruned", "strassen-pruned", "sgd",
                                            args.steps),
                                           ("sgd_random", "random", "sgd", args.steps),
                                           ("als_strassen_pruned", "strassen-pruned", "als",
                                            500)):
            row[label] = fit_basis(4, rank, init=init, method=method, steps=steps,
                                   restarts=4)[1]
        rows.append(row)
        print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in row.items()), file=sys.stderr, flush=True)
    print("| rank | fitted (shipped) | fitted, bf16 | ALS, Strassen-pruned | "
          "SGD, Strassen-pruned | SGD, random | 2:4 |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['rank']} | {r['fitted']:.4f} | {r['fitted_bf16']:.4f} | "
              f"{r['als_strassen_pruned']:.4f} | {r['sgd_strassen_pruned']:.4f} | "
              f"{r['sgd_random']:.4f} | {ref:.4f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"alpha_2_4": ref, "rows": rows}, handle, indent=1)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        ranks = [r["rank"] for r in rows]
        for key, label, style in (("fitted", "fitted (shipped, deflation + ALS)", "o-"),
                                  ("als_strassen_pruned", "ALS, Strassen-pruned init", "s--"),
                                  ("sgd_strassen_pruned", "SGD, Strassen-pruned init", "^--"),
                                  ("sgd_random", "SGD, random init", "v:")):
            ax.plot(ranks, [r[key] for r in rows], style, label=label)
        ax.axhline(ref, color="k", lw=1, label=f"2:4 pruning (α={ref:.3f})")
        ax.set_xlabel("tensor rank r (t=4)")
        ax.set_ylabel("α: mean squared error per output entry")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
