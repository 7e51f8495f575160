"""Training-step benchmark: forward + backward of an MLP block, dense vs STL, on CUDA (bf16).

Blocks (``stl_compiler.models.MLP``: Linear + bias → GELU → Linear + bias), random data:

- vit-h mlp: 1280 → 5120 → 1280 on 8224 tokens (a ViT-H MLP at 32 × 257 tokens);
- llm mlp:   4096 → 16384 → 4096 on 8192 tokens.

One step = forward, ``loss = out.float().square().mean()``, backward, gradients dropped
(``grad = None``) so no accumulation is timed. Columns, side by side in one run:

- dense: ``torch.compile`` of the dense block;
- STL:   ``stl_compile(block, (x,), STLConfig(rank=r), dynamic_shapes=None)``; the encoded
         weights, ``ex`` and ``d`` are trainable parameters (what ``distill`` trains).

Every column reports the do_bench median (``ms``), the steady-state wall-clock, the GPU-kernel
time (torch.profiler) and the host overhead, as ``bench_model.py`` does; "x" = dense / column on
wall-clock. Gradients of the STL column are checked to be finite.

Usage (CUDA)::

    python benchmarks/bench_train_step.py [--rank 24] [--out DIR]   # writes DIR/train_step.json
    python benchmarks/bench_train_step.py --smoke                   # CPU, tiny sizes, code path
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402  (after the path fix above)
    DTYPE,
    device_or_exit,
    environment,
    first_call_s,
    free_memory,
    out_dir,
    print_env,
    timing_row,
    write_json,
)

import stl_compiler as stl  # noqa: E402
from stl_compiler.models import MLP  # noqa: E402

#: (name, tokens, widths)
BLOCKS = (("vit-h mlp", 8224, (1280, 5120, 1280)), ("llm mlp", 8192, (4096, 16384, 4096)))
SMOKE_BLOCKS = (("smoke mlp", 64, (64, 256, 64)),)


def train_step(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Forward, a scalar loss, backward; drops the gradients afterwards."""
    loss = module(x).float().square().mean()
    loss.backward()
    for p in module.parameters():
        p.grad = None
    return loss.detach()


def run_block(name: str, tokens: int, widths: tuple[int, ...], args: argparse.Namespace,
              device: torch.device) -> list[dict]:
    torch.manual_seed(0)
    dtype = DTYPE if device.type == "cuda" else torch.float32
    model = MLP(list(widths), ["gelu"]).to(device=device, dtype=dtype)
    x = torch.randn(tokens, widths[0], device=device, dtype=dtype)
    rows = []
    dense = torch.compile(model)
    _, compile_s = first_call_s(lambda: train_step(dense, x), device)
    rows.append({"block": name, "method": "dense", "compile_s": compile_s,
                 **timing_row(lambda: train_step(dense, x), device, args.runs)})
    dense = None
    free_memory(device)
    start = time.perf_counter()
    fast = stl.stl_compile(model, (x,), stl.STLConfig(rank=args.rank, measure_error=False),
                           dynamic_shapes=None)
    convert_s = time.perf_counter() - start
    _, compile_s = first_call_s(lambda: train_step(fast, x), device)
    loss = fast(x).float().square().mean()
    loss.backward()
    finite = all(p.grad is None or bool(torch.isfinite(p.grad).all())
                 for p in fast.parameters())
    rows.append({"block": name, "method": f"STL r={args.rank}", "convert_s": convert_s,
                 "compile_s": compile_s, "grads_finite": finite,
                 **timing_row(lambda: train_step(fast, x), device, args.runs)})
    fast = None
    free_memory(device)
    return rows


def format_rows(rows: list[dict]) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    lines = [f"{'block':<10} {'method':<10} {'ms':>8} {'wall ms':>8} {'gpu ms':>8} "
             f"{'host ms':>8} {'x wall':>7} {'x gpu':>7}"]
    for r in rows:
        dense = next(d for d in rows if d["block"] == r["block"] and d["method"] == "dense")
        x_gpu = (f"{dense['gpu_ms'] / r['gpu_ms']:.2f}" if r["gpu_ms"] and dense["gpu_ms"]
                 else "-")
        lines.append(f"{r['block']:<10} {r['method']:<10} {r['ms']:>8.3f} {r['wall_ms']:>8.3f} "
                     f"{fmt(r['gpu_ms']):>8} {fmt(r['host_ms']):>8} "
                     f"{dense['wall_ms'] / r['wall_ms']:>7.2f} {x_gpu:>7}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=24)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", default=None, help="output folder (default $OUT or ./out)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: code path")
    args = parser.parse_args(argv)
    device = device_or_exit(args.smoke, "bench_train_step")
    env = environment(device)
    print_env(env)
    rows: list[dict] = []
    for name, tokens, widths in SMOKE_BLOCKS if args.smoke else BLOCKS:
        rows += run_block(name, tokens, widths, args, device)
        print(format_rows(rows).splitlines()[-1], flush=True)
    print(format_rows(rows))
    path = out_dir(args.out) / "train_step.json"
    write_json(path, {"environment": env, "settings": vars(args), "rows": rows})
    print(f"wrote {path}")
    if not all(r.get("grads_finite", True) for r in rows):
        sys.exit("!!! STL gradients are not finite")


if __name__ == "__main__":
    main()
