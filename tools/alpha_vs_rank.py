"""α vs rank for Gaussian 4×4 tiles: shipped fitted bases vs the paper's SGD and random init.

    .venv/bin/python tools/alpha_vs_rank.py --plot docs/img/alpha_vs_rank.png \
        --json docs/results/alpha_vs_rank.json

For every shipped rank: the shipped basis (exact α and a bf16 Monte Carlo estimate), the α of
the two deflation starts it was chosen from (Strassen's rank 49 and the rank-48 scheme
``bases.dps48``, read from ``stl_compiler/data/fitted_bases.json``), and, unless
``--no-baselines``, Adam ("sgd", the paper's method) from Strassen-pruned and from random
init and ALS from Strassen-pruned init, each with 4 restarts; the 2:4 line is
``two_four_alpha(4)``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from stl_compiler import bases
from stl_compiler.fit import fit_basis, two_four_alpha

INDEX = os.path.join(os.path.dirname(bases.__file__), "data", "fitted_bases.json")
BASELINES = (("als_strassen_pruned", "ALS, Strassen-pruned init", "strassen-pruned", "als"),
             ("sgd_strassen_pruned", "SGD, Strassen-pruned init", "strassen-pruned", "sgd"),
             ("sgd_random", "SGD, random init", "random", "sgd"))


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
    parser.add_argument("--no-baselines", dest="baselines", action="store_false",
                        help="skip the SGD / ALS-pruned fits (the slow part)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ref = two_four_alpha(4)
    with open(INDEX) as handle:
        index = json.load(handle)["bases"]
    baselines = BASELINES if args.baselines else ()
    rows = []
    for rank in bases.fitted_ranks(4):
        shipped = bases.fitted(4, rank)
        entry = index[str(rank)]
        row = {"rank": rank, "fitted": shipped.alpha, "fitted_bf16": bf16_alpha(shipped),
               "start": entry["start"], "start_49": entry["alpha_start_strassen49"],
               "start_48": entry["alpha_start_dps48"]}
        for key, _, init, method in baselines:
            row[key] = fit_basis(4, rank, init=init, method=method, restarts=4,
                                 steps=args.steps if method == "sgd" else 500)[1]
        rows.append(row)
        print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in row.items()), file=sys.stderr, flush=True)
    header = ["rank", "fitted (shipped)", "fitted, bf16", "deflation from Strassen-49",
              "deflation from dps48", *(label for _, label, _, _ in baselines), "2:4"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        cells = [str(r["rank"]), f"**{r['fitted']:.4f}**", f"{r['fitted_bf16']:.4f}",
                 f"{r['start_49']:.4f}", f"{r['start_48']:.4f}",
                 *(f"{r[key]:.4f}" for key, _, _, _ in baselines), f"{ref:.4f}"]
        print("| " + " | ".join(cells) + " |")
    exact = {basis.name: bf16_alpha(basis) for basis in
             (bases.strassen(4), *(bases.dps48(v) for v in bases.DPS48_VARIANTS))}
    print("\nExact bases (float64 α = 0), bf16 Monte Carlo α: " +
          ", ".join(f"{name} {value:.6f}" for name, value in exact.items()))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"alpha_2_4": ref, "rows": rows, "exact_bf16": exact}, handle, indent=1)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        ranks = [r["rank"] for r in rows]
        lines = [("start_49", "deflation from Strassen-49 + ALS", "o--"),
                 ("start_48", "deflation from dps48 + ALS", "o-"),
                 ("fitted_bf16", "shipped (better start), bf16 Monte Carlo", "x:")]
        styles = iter(("s--", "^--", "v:"))
        lines += [(key, label, next(styles)) for key, label, _, _ in baselines]
        for key, label, style in lines:  # an exact fit (α = 0) has no place on a log axis
            ax.plot(ranks, [r[key] if r[key] > 1e-12 else float("nan") for r in rows], style,
                    label=label)
        for r in rows:
            if r["fitted"] <= 1e-12:
                ax.annotate(f"r={r['rank']}: exact (α = 0)", (r["rank"], r["fitted_bf16"]),
                            textcoords="offset points", xytext=(-110, -4), fontsize=8)
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
