"""Plot the (A)/(B) results of examples/digits_vit.py and examples/char_lm.py.

    .venv/bin/python tools/plot_examples.py examples/digits_vit.json docs/img/digits_vit.png
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SERIES = (("scratch", "A: trained with STL", "o-"), ("plain", "B: plain encoding", "x:"),
          ("calibrated", "B: + calibration", "s--"), ("distilled", "B: + distillation", "^-"))


def main(source: str, target: str) -> None:
    with open(source) as handle:
        results = json.load(handle)
    ranks = sorted(results["ranks"], key=int)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for key, label, style in SERIES:
        ax.plot([int(r) for r in ranks], [results["ranks"][r][key] for r in ranks], style,
                label=label)
    ax.axhline(results["dense"], color="k", lw=1, label=f"dense ({results['dense']:.4g})")
    ax.set_xlabel("tensor rank r (t=4)")
    ax.set_ylabel(results["metric"])
    if results["metric"] == "perplexity":
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(target, dpi=120)


if __name__ == "__main__":
    main(*sys.argv[1:3])
