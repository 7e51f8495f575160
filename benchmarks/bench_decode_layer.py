"""Decode-size STL layers against dense at Llama-3-8B projection shapes, as CUDA-graph replays
(what a compiled decode step with ``mode="reduce-overhead"`` runs).

A decode step of B sequences calls each linear with B new tokens. With ``row_grouping=
"causal"`` the STL layer computes one 4-row tile per sequence (P = B tile-rows: the cached
earlier rows of the tile and the new one); with ``"batch"`` 4 sequences share a tile
(P = ⌈B/4⌉). So the STL cost depends on P only, and each P is compared with dense at
M = P tokens (causal) and M = 4P tokens (batch, or a prefill chunk of 4P tokens with causal /
token tiles). Columns, bf16, t=4, r=24 (``--rank``), random weights and basis, medians of
``triton.testing.do_bench`` over CUDA-graph replays, inputs rotating over two sets:

- dense:      cuBLAS ``F.linear`` at M = P tokens; dense_4p: at M = 4P tokens;
- unfused:    ``stl::encode`` → ``torch.bmm`` → ``stl::decode`` (the shipped path);
- bmm:        the r small GEMMs alone (the ceiling of any STL layer).

"GB/s" is the weight's bytes (dense: k·m, STL: r·k·m/16 elements) over the time: at decode
sizes every method streams its weight once, so it says how close each is to the memory
system's limit (``copy_gbs`` in the environment: read + written bytes of a large device copy).
At r = 24 the encoded weight is 1.5× the dense weight's bytes: ≈ 0.67× dense is the floor of
any STL decode step.

Usage (CUDA machine): ``python benchmarks/bench_decode_layer.py [--rows 1 4 16 64 256 1024]
[--out DIR]`` writes ``decode_layer.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402  (after the path fix above)
    DTYPE,
    TILE,
    bench,
    copy_bandwidth,
    environment,
    graphed,
    print_env,
    write_json,
)

from stl_compiler.runtime import ops  # noqa: E402  (after the path fix above)

#: Llama-3-8B projections (name, in_features, out_features).
SHAPES = (("q/o 4096->4096", 4096, 4096), ("k/v 4096->1024", 4096, 1024),
          ("gate/up 4096->14336", 4096, 14336), ("down 14336->4096", 14336, 4096))


def _operands(p_rows: int, k: int, m: int, rank: int, gen: torch.Generator) -> dict:
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(DTYPE)

    return {"x": rand(p_rows, TILE, k), "x_dense": rand(p_rows, k),
            "x_batch": rand(TILE * p_rows, k), "w": rand(m, k, scale=k ** -0.5),
            "ex": rand(rank, 16, scale=0.25), "d": rand(rank, 16, scale=0.25),
            "wh": rand(rank, k // TILE, m // TILE, scale=(k / 4) ** -0.5)}


def _unfused(o: dict, m: int) -> torch.Tensor:
    xh = ops.encode(o["x"], o["ex"], TILE)
    yh = torch.bmm(xh.reshape(xh.shape[0], -1, xh.shape[-1]), o["wh"])
    return ops.decode(yh.reshape(*xh.shape[:-1], -1), o["d"], TILE, TILE, m)


def _time(fn, sets: list[dict]) -> float:
    """Median ms of CUDA-graph replays of ``fn`` over the operand sets, in turn."""
    replays = [graphed(lambda o=o: fn(o)) for o in sets]
    state = {"i": 0}

    def call():
        state["i"] += 1
        replays[state["i"] % len(replays)]()

    return bench(call)


def run(rows: list[int], rank: int) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    results = []
    for name, k, m in SHAPES:
        for p_rows in rows:
            sets = [_operands(p_rows, k, m, rank, gen) for _ in range(2)]
            for o in sets:
                xh = ops.encode(o["x"], o["ex"], TILE)
                o["xh"] = xh.reshape(rank, -1, k // TILE)
            methods = {
                "dense": lambda o: F.linear(o["x_dense"], o["w"]),
                "dense_4p": lambda o: F.linear(o["x_batch"], o["w"]),
                "unfused": lambda o, m=m: _unfused(o, m),
                "bmm": lambda o: torch.bmm(o["xh"], o["wh"]),
            }
            ms = {key: _time(fn, sets) for key, fn in methods.items()}
            dense_bytes, stl_bytes = k * m * 2, rank * k * m // 16 * 2
            row = {"name": name, "k": k, "m": m, "tile_rows": p_rows, "rank": rank, "ms": ms,
                   "gbs": {key: (dense_bytes if key.startswith("dense") else stl_bytes)
                           / (t * 1e-3) / 1e9 for key, t in ms.items()},
                   "x_dense_causal": {key: ms["dense"] / t for key, t in ms.items()},
                   "x_dense_batch": {key: ms["dense_4p"] / t for key, t in ms.items()}}
            results.append(row)
            _print(row)
            del sets
            torch.cuda.empty_cache()
    return results


def _print(row: dict) -> None:
    us = "  ".join(f"{key} {t * 1e3:6.1f}" for key, t in row["ms"].items())
    gbs = "  ".join(f"{key} {v:5.0f}" for key, v in row["gbs"].items())
    x = "  ".join(f"{key} {v:.2f}" for key, v in row["x_dense_causal"].items())
    x4 = "  ".join(f"{key} {v:.2f}" for key, v in row["x_dense_batch"].items())
    print(f"{row['name']:<20} P={row['tile_rows']:<4} µs: {us}\n"
          f"{'':<20} GB/s: {gbs}\n{'':<20} x dense at M=P: {x}\n"
          f"{'':<20} x dense at M=4P: {x4}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024])
    parser.add_argument("--rank", type=int, default=24)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_decode_layer.py needs a CUDA device")
    env = environment(torch.device("cuda"))
    env["copy_gbs"] = copy_bandwidth() / 1e9
    print_env(env)
    rows = run(args.rows, args.rank)
    if args.out is not None:
        write_json(args.out / "decode_layer.json", {"env": env, "rows": rows})


if __name__ == "__main__":
    main()
