"""Fused STL GEMM benchmark: ``stl::gemm_decode`` against today's path, dense and the bmm ceiling.

For each layer shape ``X (n×k) · W (k×m)`` in bf16 (t=4, r=24 unless ``--rank``), side by side
in one run:

- dense:    cuBLAS ``F.linear(x, w, b)``;
- unfused:  today's ops: ``stl::encode`` → ``torch.bmm`` → ``stl::decode_epilogue`` (bias);
- bmm:      the r small GEMMs alone (the ceiling of any STL layer);
- fused:    ``stl::encode`` → ``stl::gemm_decode`` (bias), autotuned over all configs;
- fused-fma / fused-tc: the fused kernel autotuned over one decode kind only (CUDA-core FMAs
  or a tensor-core dot), and ``gemm`` = the fused kernel alone (no encode).

Before timing, every shape's fused and unfused outputs are checked against the float64
composite (relative Frobenius error; bf16 tolerance 1e-2). Times are medians of
``triton.testing.do_bench`` (L2 flushed before each run), inputs rotate over two sets.
"x" = dense / method; "of ceiling" = bmm / method (1.0 = the layer costs only its GEMMs), each
against dense / bmm timed the same way: eager launches, or CUDA-graph replays ("graph": GPU
time without host launch overhead, which for the custom ops' eager launches can exceed the
kernels' time).
"L2 GB/s" is the fused kernel's operand traffic (each block reads r·(BM+BN)·K/t elements of
Xh and Wh) over its time: the kernel re-reads operands once per output block, where a
standalone bmm with its larger tiles reads them far fewer times.

Usage (CUDA machine): ``python benchmarks/bench_stl_gemm.py [--rank 24] [--out DIR]``; writes
``stl_gemm.json`` to ``--out``. ``--profile-once`` instead launches the fused kernel once per
decode kind at ViT-H fc1 (fixed configs, after a warm-up launch each) and the bmm, for
``ncu -k regex:gemm_decode|gemm`` to profile.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import bench, environment, graphed, print_env  # noqa: E402

from stl_compiler.runtime import ops, stl_gemm  # noqa: E402  (after the path fix above)
from stl_compiler.runtime.triton.gemm_decode import DECODES  # noqa: E402

TILE = 4
DTYPE = torch.bfloat16
#: (name, tokens n, in_features k, out_features m)
SHAPES = (("vit-h fc1", 8224, 1280, 5120), ("vit-h fc2", 8224, 5120, 1280),
          ("vit-h qkv/out", 8224, 1280, 1280), ("dit-xl fc1", 4096, 1152, 4608),
          ("bert-l fc1", 16384, 1024, 4096), ("square 4096", 4096, 4096, 4096),
          ("llm 4096->14336", 8192, 4096, 14336))
TOLERANCE = 1e-2


def _operands(n: int, k: int, m: int, rank: int, gen: torch.Generator) -> dict:
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(DTYPE)

    return {"x": rand(n, k), "w": rand(m, k, scale=k ** -0.5), "b": rand(m),
            "ex": rand(rank, 16, scale=0.25), "d": rand(rank, 16, scale=0.25),
            "wh": rand(rank, k // TILE, m // TILE, scale=(k / 4) ** -0.5)}


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def _unfused(o: dict, n: int, m: int) -> torch.Tensor:
    xh = ops.encode(o["x"], o["ex"], TILE)
    yh = torch.bmm(xh, o["wh"])
    return ops.decode_epilogue(yh, o["d"], o["b"], "none", 1.0, TILE, n, m)


def _fused(o: dict, n: int, m: int, decode: str | None = None) -> torch.Tensor:
    xh = ops.encode(o["x"], o["ex"], TILE)
    if decode is None:
        return stl_gemm.gemm_decode(xh, o["wh"], o["d"], o["b"], "none", 1.0, TILE, n, m)
    return stl_gemm.kernel_module().gemm_decode(xh, o["wh"], o["d"], o["b"], "none", 1.0, TILE,
                                               n, m, decode=decode)


def _check(name: str, sets: list[dict], n: int, m: int) -> dict:
    o = sets[0]
    xh = ops.encode(o["x"], o["ex"], TILE)
    ref = stl_gemm.gemm_decode_aten(xh.double(), o["wh"].double(), o["d"].double(),
                                    o["b"].double(), "none", 1.0, TILE, n, m)
    errors = {"unfused": _rel(_unfused(o, n, m), ref), "fused": _rel(_fused(o, n, m), ref),
              **{f"fused-{kind}": _rel(_fused(o, n, m, kind), ref) for kind in DECODES}}
    bad = {k: v for k, v in errors.items() if not v < TOLERANCE}
    if bad:
        raise SystemExit(f"{name}: relative error vs float64 above {TOLERANCE}: {bad}")
    return errors


def _rotating(fn, sets: list[dict]):
    state = {"i": 0}

    def call():
        state["i"] += 1
        return fn(sets[state["i"] % len(sets)])

    return call


def _same_mode(method: str, key: str) -> str:
    """``method``'s time key in the mode (eager launches or graph replay) of ``key``."""
    return f"{method} graph" if key.endswith(" graph") else method


def _l2_bytes(n: int, k: int, m: int, rank: int, config: str) -> float | None:
    """Xh and Wh bytes the fused kernel's blocks read, from the autotuner's config string."""
    try:
        fields = dict(part.split(": ") for part in config.split(", "))
        bm, bn = int(fields["BM"]), int(fields["BN"])
    except (KeyError, ValueError):
        return None
    blocks = -(-(n // TILE) // bm) * -(-(m // TILE) // bn)
    return blocks * rank * (bm + bn) * (k // TILE) * 2


def _times(sets: list[dict], n: int, m: int) -> dict[str, float]:
    """Median ms of each method, inputs rotating over ``sets``."""
    kernel = stl_gemm.kernel_module()
    methods = {
        "dense": lambda o: F.linear(o["x"], o["w"], o["b"]),
        "bmm": lambda o: torch.bmm(o["xh"], o["wh"]),
        "encode": lambda o: ops.encode(o["x"], o["ex"], TILE),
        "unfused": lambda o: _unfused(o, n, m),
        "fused": lambda o: _fused(o, n, m),
        **{f"fused-{kind}": (lambda o, kind=kind: _fused(o, n, m, kind)) for kind in DECODES},
        "gemm": lambda o: kernel.gemm_decode(o["xh"], o["wh"], o["d"], o["b"], "none", 1.0,
                                             TILE, n, m),
    }
    times = {key: bench(_rotating(fn, sets)) for key, fn in methods.items()}
    # The same as CUDA-graph replays: GPU time without the host's launch overhead (eager
    # launches of the custom ops can cost more host time than the kernels take).
    for key in GRAPHED:
        replays = [graphed(lambda o=o, fn=methods[key]: fn(o)) for o in sets]
        times[f"{key} graph"] = bench(_rotating(lambda replay: replay(), replays))
    return times


def run(rank: int) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name, n, k, m in SHAPES:
        sets = [_operands(n, k, m, rank, gen) for _ in range(2)]
        errors = _check(name, sets, n, m)
        xhs = [ops.encode(o["x"], o["ex"], TILE) for o in sets]
        for o, xh in zip(sets, xhs):
            o["xh"] = xh
        kernel = stl_gemm.kernel_module()
        times = _times(sets, n, m)
        configs = {kind: [v for key, v in kernel.best_config(decode).items()
                          if f"{k // TILE}, {m // TILE}, {rank}" in key]
                   for kind, decode in (("all", None), *((k, k) for k in DECODES))}
        config = (configs["all"] or ["?"])[0]
        l2 = _l2_bytes(n, k, m, rank, config)
        row = {"name": name, "n": n, "k": k, "m": m, "rank": rank, "ms": times,
               "x": {key: times[_same_mode("dense", key)] / t for key, t in times.items()},
               "of_ceiling": {key: times[_same_mode("bmm", key)] / t
                              for key, t in times.items()},
               "errors": errors, "configs": configs,
               "fused_l2_gbs": None if l2 is None else l2 / (times["gemm"] * 1e-3) / 1e9}
        rows.append(row)
        _print_row(row)
        del sets, xhs
        torch.cuda.empty_cache()
    return rows


COLUMNS = ("dense", "bmm", "encode", "unfused", "fused", "fused-fma", "fused-tc", "gemm")
GRAPHED = ("dense", "bmm", "encode", "unfused", "fused", "gemm")


def _print_row(row: dict) -> None:
    ms = "  ".join(f"{key} {row['ms'][key] * 1e3:7.1f}" for key in COLUMNS)
    graph = "  ".join(f"{key} {row['ms'][key + ' graph'] * 1e3:7.1f}" for key in GRAPHED)
    x = "  ".join(f"{key} {row['x'][key]:.2f}" for key in ("bmm", "unfused", "fused"))
    xg = "  ".join(f"{key} {row['x'][key + ' graph']:.2f}" for key in ("bmm", "unfused",
                                                                        "fused"))
    ceil = "  ".join(f"{key} {row['of_ceiling'][key]:.2f}" for key in ("unfused", "fused",
                                                                        "gemm"))
    l2 = row["fused_l2_gbs"]
    print(f"{row['name']:<16} {row['n']}x{row['k']}->{row['m']}  µs: {ms}", flush=True)
    print(f"{'':<16} graph µs: {graph} | x dense (graphs): {xg}", flush=True)
    print(f"{'':<16} x dense: {x} | of ceiling: {ceil} | fused L2 "
          f"{'-' if l2 is None else f'{l2:.0f}'} GB/s | config {row['configs']['all']} | "
          f"errors {', '.join(f'{k} {v:.1e}' for k, v in row['errors'].items())}", flush=True)


#: The fixed configs ``--profile-once`` launches (the autotuner's picks at ViT-H fc1 in run 2).
PROFILED = ((64, 16, 64, 4, 4, "fma"), (32, 32, 64, 4, 3, "tc"))


def profile_once(rank: int) -> None:
    _, n, k, m = SHAPES[0]
    o = _operands(n, k, m, rank, torch.Generator(device="cuda").manual_seed(0))
    xh = ops.encode(o["x"], o["ex"], TILE)
    kernel = stl_gemm.kernel_module()
    for config in PROFILED:
        for _ in range(2):  # the first launch compiles
            kernel.gemm_decode(xh, o["wh"], o["d"], o["b"], "none", 1.0, TILE, n, m,
                               config=config)
    torch.bmm(xh, o["wh"])
    torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=24)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--profile-once", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_stl_gemm.py needs a CUDA device")
    if args.profile_once:
        profile_once(args.rank)
        return
    device = torch.device("cuda")
    env = environment(device)
    print_env(env)
    rows = run(args.rank)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "stl_gemm.json").write_text(json.dumps({"env": env, "rows": rows},
                                                           indent=1))


if __name__ == "__main__":
    main()
