"""α and bf16 drift of the shipped bases through the STL ops on a device (fp32 and bf16).

    python tools/alpha_device.py --out alpha_device.json        # CUDA: the Triton kernels

Bases: general fitted (minimum α and bf16-conditioned), causal and row-separable, every
shipped rank. The α table of docs/quality.md is exact float64 algebra (α = ‖T − T_r‖² / 16)
plus a CPU Monte Carlo of one tile product in bf16. This measures what a deployed layer computes: X
``(n, K)`` and W ``(K, M)`` Gaussian, both cast to the run dtype, the product taken by
``stl_compiler.functional.stl_product`` (``stl::encode`` → batched matmul → ``stl::decode``; on
CUDA the Triton encode / decode kernels and cuBLAS), compared with the float64 product of the
unrounded operands. Every output entry sums K/t independent tile products, so
α ≈ mean squared error / (K/t). The dense row is the same measure of ``X @ W`` in the run dtype
(its error is the input rounding and the accumulation only). ``bf16_drift`` is issue 15's
measure for one layer, ‖y_bf16 − y_fp32‖ / ‖y_fp32‖ of the same product, and
``drift_vs_dense`` its ratio to the dense layer's. Each row: fresh inputs per seed, mean over
seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone

import torch

from stl_compiler import bases
from stl_compiler.functional import stl_product
from stl_compiler.tiling import row_separable

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def product(x: torch.Tensor, w: torch.Tensor, basis: bases.STLBasis | None, dtype: torch.dtype
            ) -> torch.Tensor:
    """``x @ w`` in ``dtype``: dense, or the STL product with ``basis``; float64 result."""
    xs, ws = x.to(dtype), w.to(dtype)
    if basis is None:
        return (xs @ ws).double()
    ex, ew, d = basis.to(dtype, x.device)
    return stl_product(xs, ws, ex, ew, d, basis.tile).double()


def measure(basis: bases.STLBasis | None, device: torch.device, n: int, k: int, seeds: int
            ) -> dict[str, float]:
    """α in each dtype (mean squared error per output entry over K/t, against the float64
    product of the unrounded operands) and the bf16 drift ‖y_bf16 − y_fp32‖ / ‖y_fp32‖ of
    the same product, averaged over ``seeds`` fresh inputs."""
    sums = dict.fromkeys([*DTYPES, "bf16_drift"], 0.0)
    tile = 4 if basis is None else basis.tile
    for seed in range(seeds):
        gen = torch.Generator(device=device).manual_seed(seed)
        x = torch.randn(n, k, generator=gen, device=device, dtype=torch.float64)
        w = torch.randn(k, k, generator=gen, device=device, dtype=torch.float64)
        exact = x @ w
        outs = {name: product(x, w, basis, dtype) for name, dtype in DTYPES.items()}
        for name, out in outs.items():
            sums[name] += float((out - exact).square().mean()) / (k / tile)
        sums["bf16_drift"] += float((outs["bf16"] - outs["fp32"]).norm() / outs["fp32"].norm())
    return {name: total / seeds for name, total in sums.items()}


def candidates(rank: int) -> list[tuple[str, bases.STLBasis]]:
    """The shipped bases of ``rank``: general fitted (``fitted``, ``fitted-bf16``), causal
    (``bases.causal``) and row-separable (``tiling.row_separable``, what "batch" uses)."""
    found = [(name, bases.fitted(4, rank, conditioning))
             for name, conditioning in (("fitted", None), ("fitted-bf16", "bf16"))
             if rank in bases.fitted_ranks(4, conditioning)]
    if rank in bases.causal_ranks(4):
        found.append(("causal", bases.causal(4, rank)))
    if rank % 4 == 0:
        found.append(("row-separable", row_separable(4, rank)))
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=4096, help="rows n of X")
    parser.add_argument("--k", type=int, default=512, help="inner and output size K = M")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--ranks", type=int, nargs="*", default=None,
                        help="default: every shipped rank")
    parser.add_argument("--out", default=None, help="JSON path")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    ranks = args.ranks or bases.fitted_ranks(4)
    rows = [{"basis": "dense", "rank": None, "alpha_float64": 0.0,
             **measure(None, device, args.rows, args.k, args.seeds)}]
    dense_drift = rows[0]["bf16_drift"]
    for rank in ranks:
        for name, basis in candidates(rank):
            row = {"basis": name, "rank": rank, "alpha_float64": basis.alpha,
                   **measure(basis, device, args.rows, args.k, args.seeds)}
            row["drift_vs_dense"] = row["bf16_drift"] / dense_drift
            rows.append(row)
            print(f"r={rank:2d} {name:<12} α float64 {row['alpha_float64']:.4f}  fp32 "
                  f"{row['fp32']:.4f}  bf16 {row['bf16']:.4f}  bf16 drift "
                  f"{row['bf16_drift']:.2%} ({row['drift_vs_dense']:.2f}x dense)", flush=True)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "date": datetime.now(timezone.utc).isoformat(),
              "n": args.rows, "k": args.k, "seeds": args.seeds, "rows": rows}
    print(f"dense: bf16 drift {dense_drift:.3%}")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)
    else:
        json.dump(result, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
