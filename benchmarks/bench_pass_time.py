"""Pass time vs torch.compile time for a 24-layer decoder (issue: the pass must stay a small
fraction of compilation). Prints one table; writes JSON to $OUT (or ./out) when set.

    python benchmarks/bench_pass_time.py [--layers 24] [--dim 512] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from stl_compiler import STLConfig, stl_compile
from stl_compiler.models import DecoderLM


def _first_call_seconds(module, tokens) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        module(tokens)
    if tokens.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = DecoderLM(vocab=1024, dim=args.dim, depth=args.layers, heads=8, kv_heads=4,
                      mlp_dim=4 * args.dim).to(args.device).eval()
    tokens = torch.randint(0, 1024, (4, args.seq), device=args.device)

    torch._dynamo.reset()
    dense_compile = _first_call_seconds(torch.compile(model), tokens)

    torch._dynamo.reset()
    start = time.perf_counter()
    compiled = stl_compile(model, (tokens,), STLConfig(rank=24, decompose_sdpa=True,
                                                       measure_error=False,
                                                       row_grouping="tokens",
                                                       allow_non_causal=True), backend="inductor")
    stl_passes = time.perf_counter() - start
    stl_inductor = _first_call_seconds(compiled, tokens)
    report = compiled.stl_report
    rows = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__, "layers": args.layers, "dim": args.dim,
        "sites_converted": len(report.converted), "sites": len(report.sites),
        "stl_compile_capture_and_passes_s": stl_passes,
        "per_pass_s": report.pass_seconds,
        "torch_compile_dense_first_call_s": dense_compile,
        "torch_compile_stl_first_call_s": stl_inductor,
        "pass_fraction_of_total": stl_passes / (stl_passes + stl_inductor),
    }
    print(f"{args.layers}-layer decoder, dim {args.dim}, on {rows['device']}, torch "
          f"{torch.__version__}: {rows['sites_converted']}/{rows['sites']} sites converted")
    print(f"  stl_compile capture + passes : {stl_passes:8.2f} s  "
          + ", ".join(f"{k} {v:.2f}" for k, v in report.pass_seconds.items()))
    print(f"  torch.compile of STL graph   : {stl_inductor:8.2f} s (first call)")
    print(f"  torch.compile of dense model : {dense_compile:8.2f} s (first call)")
    print(f"  passes / (passes + Inductor) : {rows['pass_fraction_of_total']:8.1%}")
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "pass_time.json"), "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
