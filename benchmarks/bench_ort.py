"""ONNX Runtime benchmark: the dense export vs the STL export of the same model, CPU provider.

Models (fp32, random weights, ``stl_compiler.models``):

- layer: one ``nn.Linear(4096, 4096)`` on 2048 tokens;
- vit-b: a ViT-B-like stack: 4 pre-norm ``EncoderBlock`` (hidden 768, MLP 3072, 12 heads,
  explicit attention matmuls) on 8 x 196 tokens.

Dense: ``export_onnx(model)``. STL: ``stl_compile(model, (x,), STLConfig(rank=r),
backend="eager")`` then ``export_onnx`` (standard ONNX ops: the STL ops are exported through
their aten decompositions, weight encodings folded). Both run in ``ort_session`` (all graph
optimizations, ``--threads`` intra-op threads); the time is the median of ``--runs`` runs after
warm-up, "x" = dense / STL. With ``--profile`` ORT's profiler gives the time per ONNX op type
(summed over the graph's nodes, mean per run) for both exports: where the STL export loses.
The STL export's output is checked against the STL torch module (relative error).

Usage::

    python benchmarks/bench_ort.py [--models layer vit-b] [--threads 16] [--profile] [--out DIR]
    python benchmarks/bench_ort.py --smoke      # tiny sizes: the code path only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import environment, out_dir, print_env, rel_error, write_json  # noqa: E402

import stl_compiler as stl  # noqa: E402
from stl_compiler.models import EncoderBlock  # noqa: E402


class Stack(nn.Module):
    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def build(name: str, smoke: bool) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name == "layer":
        tokens, dim = (64, 64) if smoke else (2048, 4096)
        return nn.Linear(dim, dim).eval(), torch.randn(tokens, dim)
    dim, mlp, heads, batch, seq, depth = ((64, 256, 4, 2, 16, 1) if smoke
                                          else (768, 3072, 12, 8, 196, 4))
    model = Stack([EncoderBlock(dim, heads, mlp) for _ in range(depth)]).eval()
    return model, torch.randn(batch, seq, dim)


def time_session(session, x: torch.Tensor, runs: int) -> float:
    """Median ms of ``runs`` runs after 3 warm-up runs."""
    feed = x.numpy()
    for _ in range(3):
        session.run(feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(feed)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def profile_by_op(path: Path, x: torch.Tensor, threads: int, runs: int) -> dict[str, float]:
    """Mean ms per run spent in each ONNX op type (ORT's profiler, node events)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(""))
    session = stl.runtime.ort_session(path, ["CPUExecutionProvider"],
                                      intra_op_num_threads=threads, session_options=options)
    feed = x.numpy()
    for _ in range(runs):
        session.run(feed)
    trace = Path(session.session.end_profiling())
    per_op: dict[str, float] = defaultdict(float)
    for event in json.loads(trace.read_text()):
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            per_op[event["args"].get("op_name", "?")] += event["dur"] / 1e3 / runs
    trace.unlink()
    return dict(sorted(per_op.items(), key=lambda kv: -kv[1]))


def run_model(name: str, args: argparse.Namespace, folder: Path) -> dict:
    model, x = build(name, args.smoke)
    fast = stl.stl_compile(model, (x,), stl.STLConfig(rank=args.rank, measure_error=False),
                           backend="eager")
    row: dict = {"model": name, "input": list(x.shape), "rank": args.rank}
    with torch.no_grad():
        reference = fast(x)
    for label, module in (("dense", model), ("stl", fast)):
        path = folder / f"{name}_{label}.onnx"
        start = time.perf_counter()
        stl.exporters.export_onnx(module, (x,), path)
        row[f"{label}_export_s"] = time.perf_counter() - start
        session = stl.runtime.ort_session(path, ["CPUExecutionProvider"],
                                          intra_op_num_threads=args.threads)
        row[f"{label}_ms"] = time_session(session, x, args.runs)
        row[f"{label}_op_types"] = stl.exporters.onnx_op_types(path)
        if label == "stl":
            row["stl_rel_error_vs_torch"] = rel_error(session.run(x.numpy())[0], reference)
        if args.profile:
            row[f"{label}_ms_by_op"] = profile_by_op(path, x, args.threads, args.runs)
    row["x"] = row["dense_ms"] / row["stl_ms"]
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["layer", "vit-b"],
                        choices=("layer", "vit-b"))
    parser.add_argument("--rank", type=int, default=24)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--profile", action="store_true", help="ORT time per op type")
    parser.add_argument("--out", default=None, help="output folder (default $OUT or ./out)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: the code path only")
    args = parser.parse_args(argv)
    env = environment(torch.device("cpu"))
    env.update(device=f"CPU, {os.cpu_count()} cores (ONNX Runtime CPU provider)",
               threads=args.threads)
    print_env(env)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            row = run_model(name, args, Path(tmp))
            rows.append(row)
            print(f"{name:<6} dense {row['dense_ms']:8.2f} ms | STL r={args.rank} "
                  f"{row['stl_ms']:8.2f} ms | x {row['x']:.2f} | STL export vs torch "
                  f"{row['stl_rel_error_vs_torch']:.1e}", flush=True)
            for label in ("dense", "stl"):
                top = list(row.get(f"{label}_ms_by_op", {}).items())[:8]
                if top:
                    print(f"  {label} ms by op: "
                          + ", ".join(f"{op} {ms:.2f}" for op, ms in top), flush=True)
    path = out_dir(args.out) / "ort_bench.json"
    write_json(path, {"environment": env, "settings": vars(args), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
