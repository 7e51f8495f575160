"""Layer benchmark: one STL linear layer against cuBLAS dense and 2:4 cuSPARSELt, on CUDA.

For t=4 and each rank r, each shape ``X (n×k) · W (k×m)`` in bf16 is timed side by side:

- dense:    cuBLAS, ``F.linear(x, W)`` (``x @ Wᵀ``, W stored ``(m, k)`` as nn.Linear keeps it);
- 2:4:      cuSPARSELt, ``F.linear(x, to_sparse_semi_structured(W_pruned))``;
- alg1:     the paper's Algorithm 1 in plain PyTorch (reshape/permute/matmul encode, torch.bmm,
            matmul/permute decode: the aten composites of ``stl_compiler.runtime.ops``);
- ours:     the registered ops on CUDA (Triton encode → torch.bmm → Triton decode), weight
            pre-encoded as STLLinear keeps it; also timed as a CUDA graph replay, against a
            graph replay of dense, to show what launch overhead costs at small sizes;
- bmm:      the r small GEMMs alone (the ceiling of any STL implementation);
- enc, dec: our encode and decode kernels alone.

Times are medians of ``triton.testing.do_bench`` (which flushes the L2 cache before every run,
so no input is served from cache; no rotation needed). "x" is dense time / method time.
The limit of a standalone layer is ``bmm + (bytes(encode) + bytes(decode)) / copy bandwidth``,
with the copy bandwidth measured in the same run; "frac" is limit time / our time.

Usage (on a CUDA machine): ``python benchmarks/bench_layer.py [--ranks 16 24] [--sizes 4096]
[--no-llm] [--no-mid] [--repeat 3] [--out DIR]`` (mid-size shapes: ViT-H fc1, fc2, attention
projections, DiT-XL fc1). No GPU needed: ``--plot RESULTS.json PNG`` draws speedup
vs rank, ``--markdown RESULTS.json`` prints the table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import bench, copy_bandwidth, environment, graphed, prune_2_4  # noqa: E402

from stl_compiler.runtime import ops  # noqa: E402  (after the path fix above)

TILE = 4
RANKS = (16, 24, 32, 40, 49)
SQUARE = (2048, 4096, 8192, 16384)
#: (name, tokens n, in_features k, out_features m)
LLM = (("llm 4096->4096", 8192, 4096, 4096), ("llm 4096->14336", 8192, 4096, 14336),
       ("llm 14336->4096", 8192, 14336, 4096))
#: Mid-size transformer layers (hidden ~1k), where the encoded planes' HBM round trip costs as
#: much as the FLOPs saved: ViT-H fc1 / fc2 / qkv-out (32 x 257 tokens), DiT-XL fc1.
MID = (("vit-h fc1 1280->5120", 8224, 1280, 5120), ("vit-h fc2 5120->1280", 8224, 5120, 1280),
       ("vit-h attn 1280->1280", 8224, 1280, 1280), ("dit-xl fc1 1152->4608", 4096, 1152, 4608))
DTYPE = torch.bfloat16


def sparse_2_4(w: torch.Tensor) -> tuple[torch.Tensor | None, str]:
    """The 2:4 semi-structured (cuSPARSELt) form of ``w (m, k)``, or None and why not."""
    try:
        from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

        SparseSemiStructuredTensor._FORCE_CUTLASS = False  # cuSPARSELt, not the CUTLASS path
        return to_sparse_semi_structured(prune_2_4(w)), "cuSPARSELt"
    except (RuntimeError, ImportError, ValueError) as err:
        return None, f"unavailable: {err}"


def rank_row(x: torch.Tensor, w: torch.Tensor, rank: int, gen: torch.Generator,
             bandwidth: float, check: bool) -> dict:
    """Time the STL methods (alg1, ours, bmm, enc, dec) for one rank; limit from bandwidth."""
    (n, k), m = x.shape, w.shape[0]
    ex, ew, d = (torch.randn(3, rank, TILE * TILE, device="cuda", generator=gen) / TILE).to(DTYPE)
    wh = ops.encode(w.t(), ew, TILE)  # the pre-encoded weight, (r, k/t, m/t)
    enc, dec = torch.ops.stl.encode.default, torch.ops.stl.decode.default
    xh = enc(x, ex, TILE)
    yh = torch.bmm(xh, wh)

    def ours() -> torch.Tensor:
        return dec(torch.bmm(enc(x, ex, TILE), wh), d, TILE, n, m)

    def alg1() -> torch.Tensor:
        return ops.decode_aten(torch.bmm(ops.encode_aten(x, ex, TILE), wh), d, TILE, n, m)

    row = {"rank": rank, "alg1_ms": bench(alg1), "ours_ms": bench(ours),
           "ours_graph_ms": bench(graphed(ours)), "bmm_ms": bench(lambda: torch.bmm(xh, wh)),
           "enc_ms": bench(lambda: enc(x, ex, TILE)),
           "dec_ms": bench(lambda: dec(yh, d, TILE, n, m))}
    enc_bytes = n * k * x.element_size() * (1 + rank / TILE**2)
    dec_bytes = n * m * x.element_size() * (1 + rank / TILE**2)
    row["enc_gbs"] = enc_bytes / row["enc_ms"] / 1e6
    row["dec_gbs"] = dec_bytes / row["dec_ms"] / 1e6
    row["limit_ms"] = row["bmm_ms"] + (enc_bytes + dec_bytes) / bandwidth * 1e3
    if check:  # ours against alg1 (same basis, same math) on this very data
        ref = alg1().float()
        row["rel_err_vs_alg1"] = ((ours().float() - ref).norm() / ref.norm()).item()
    return row


def _median_row(rows: list[dict]) -> dict:
    """One row from repeated measurements: the median of every number (the largest error),
    and the spread (max - min) / median of ours and of dense."""
    out = dict(rows[0])
    for key, value in rows[0].items():
        if isinstance(value, float):
            out[key] = statistics.median(r[key] for r in rows)
    if "rel_err_vs_alg1" in out:
        out["rel_err_vs_alg1"] = max(r["rel_err_vs_alg1"] for r in rows)
    for key in ("ours", "dense"):
        values = [r[f"{key}_ms"] for r in rows]
        out[f"{key}_spread"] = (max(values) - min(values)) / out[f"{key}_ms"]
    out["repeats"] = len(rows)
    return out


def shape_rows(name: str, n: int, k: int, m: int, ranks: tuple[int, ...], bandwidth: float,
               check: bool, repeat: int) -> list[dict]:
    """Time every method for one shape ``x (n, k)``, ``W (m, k)``; one dict per rank.

    With ``repeat`` > 1 the whole set of measurements runs that many times, interleaved, so
    slow drifts (clocks, temperature) hit every method alike; rows hold the medians."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, k, device="cuda", dtype=DTYPE, generator=gen)
    w = torch.randn(m, k, device="cuda", dtype=DTYPE, generator=gen) / k**0.5
    w_sparse, sparse_kind = sparse_2_4(w)
    runs = []
    for _ in range(repeat):
        common = {"shape": name, "n": n, "k": k, "m": m, "sparse_kind": sparse_kind,
                  "dense_ms": bench(lambda: F.linear(x, w)),
                  "dense_graph_ms": bench(graphed(lambda: F.linear(x, w))),
                  "sparse_ms": (bench(lambda: F.linear(x, w_sparse)) if w_sparse is not None
                                else float("nan"))}
        runs.append([{**common, **rank_row(x, w, rank, gen, bandwidth, check)}
                     for rank in ranks])
    return [_median_row(list(rows)) for rows in zip(*runs)]


def format_table(rows: list[dict]) -> str:
    """The table printed at the end of a run (ms, and x = dense / method)."""
    head = (f"{'shape':<16}{'r':>3} {'dense ms':>9} {'2:4 x':>6} {'alg1 x':>7} {'ours ms':>8} "
            f"{'±%':>4} {'ours x':>7} {'graph x':>8} {'bmm x':>6} {'limit x':>8} {'frac':>5} "
            f"{'enc GB/s':>9} {'dec GB/s':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        def ratio(key: str, r: dict = r) -> float:
            return r["dense_ms"] / r[key]

        lines.append(
            f"{r['shape']:<16}{r['rank']:>3} {r['dense_ms']:>9.4f} {ratio('sparse_ms'):>6.2f} "
            f"{ratio('alg1_ms'):>7.2f} {r['ours_ms']:>8.4f} {100 * r['ours_spread']:>4.1f} "
            f"{ratio('ours_ms'):>7.2f} "
            f"{r['dense_graph_ms'] / r['ours_graph_ms']:>8.2f} {ratio('bmm_ms'):>6.2f} "
            f"{ratio('limit_ms'):>8.2f} {r['limit_ms'] / r['ours_ms']:>5.2f} "
            f"{r['enc_gbs']:>9.0f} {r['dec_gbs']:>9.0f}")
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    """The rows as a Markdown table (docs/benchmarks.md): times in ms, x = dense / method."""
    lines = ["| shape | r | dense ms | 2:4 x | alg1 x | ours ms (±%) | **ours x** | graph x "
             "| bmm x | limit x | frac | enc GB/s | dec GB/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        x = {key: r["dense_ms"] / r[f"{key}_ms"] for key in ("sparse", "alg1", "ours", "bmm",
                                                              "limit")}
        lines.append(
            f"| {r['shape']} | {r['rank']} | {r['dense_ms']:.4f} | {x['sparse']:.2f} | "
            f"{x['alg1']:.2f} | {r['ours_ms']:.4f} ({100 * r['ours_spread']:.1f}) | "
            f"**{x['ours']:.2f}** | {r['dense_graph_ms'] / r['ours_graph_ms']:.2f} | "
            f"{x['bmm']:.2f} | {x['limit']:.2f} | "
            f"{r['limit_ms'] / r['ours_ms']:.2f} | {r['enc_gbs']:.0f} | {r['dec_gbs']:.0f} |")
    return "\n".join(lines)


def run(ranks: tuple[int, ...], sizes: tuple[int, ...], llm: bool, out_dir: Path | None,
        check: bool = True, repeat: int = 1, mid: bool = True) -> dict:
    """Run the whole benchmark; print the table; write ``layer_bench.json`` into ``out_dir``."""
    env = environment(torch.device("cuda"))
    env["command"] = " ".join(["python3", *sys.argv])
    print(f"device {env['device']} | torch {env['torch']} | triton {env['triton']} | "
          f"{env['date']} | commit {env['commit']}", flush=True)
    env["copy_bandwidth_gbs"] = copy_bandwidth() / 1e9
    print(f"device-to-device copy: {env['copy_bandwidth_gbs']:.0f} GB/s (read + write)",
          flush=True)
    shapes = ([(f"square {s}", s, s, s) for s in sizes] + (list(LLM) if llm else [])
              + (list(MID) if mid else []))
    rows: list[dict] = []
    print(format_table(rows), flush=True)
    for name, n, k, m in shapes:
        new = shape_rows(name, n, k, m, ranks, env["copy_bandwidth_gbs"] * 1e9, check, repeat)
        print("\n".join(format_table(new).splitlines()[2:]), flush=True)
        rows += new
        torch.cuda.empty_cache()
    result = {"environment": env, "tile": TILE, "dtype": str(DTYPE), "repeat": repeat,
              "rows": rows}
    print(format_table(rows))
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "layer_bench.json").write_text(json.dumps(result, indent=1))
    return result


def plot(results: Path, png: Path) -> None:
    """Speedup over dense vs rank, one line per shape (ours solid, bmm ceiling dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(results.read_text())
    env = data["environment"]
    fig, ax = plt.subplots(figsize=(8, 5))
    shapes = list(dict.fromkeys(r["shape"] for r in data["rows"]))
    for i, shape in enumerate(shapes):
        rows = [r for r in data["rows"] if r["shape"] == shape]
        ranks = [r["rank"] for r in rows]
        color = f"C{i}"
        ax.plot(ranks, [r["dense_ms"] / r["ours_ms"] for r in rows], "o-", color=color,
                label=shape)
        ax.plot(ranks, [r["dense_ms"] / r["bmm_ms"] for r in rows], ":", color=color)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xlabel("rank r (t = 4)")
    ax.set_ylabel("speedup over cuBLAS dense (bf16)")
    ax.set_title(f"STL layer: ours (solid) and batched-GEMM ceiling (dotted)\n"
                 f"{env['device']}, torch {env['torch']}, {env['date'][:10]}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=list(RANKS))
    parser.add_argument("--sizes", type=int, nargs="*", default=list(SQUARE))
    parser.add_argument("--no-llm", action="store_true", help="skip the LLM shapes")
    parser.add_argument("--no-mid", action="store_true",
                        help="skip the mid-size shapes (ViT-H, DiT-XL layers)")
    parser.add_argument("--no-check", action="store_true", help="skip ours-vs-alg1 check")
    parser.add_argument("--repeat", type=int, default=1,
                        help="repeat every measurement, interleaved; report medians and spread")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")))
    parser.add_argument("--plot", nargs=2, type=Path, metavar=("RESULTS_JSON", "PNG"))
    parser.add_argument("--markdown", type=Path, metavar="RESULTS_JSON",
                        help="print a results file as a Markdown table")
    args = parser.parse_args(argv)
    if args.plot:
        plot(*args.plot)
        return
    if args.markdown:
        print(markdown_table(json.loads(args.markdown.read_text())["rows"]))
        return
    if not torch.cuda.is_available():
        sys.exit("bench_layer needs a CUDA GPU")
    run(tuple(args.ranks), tuple(args.sizes), not args.no_llm, args.out, not args.no_check,
        args.repeat, not args.no_mid)


if __name__ == "__main__":
    main()
