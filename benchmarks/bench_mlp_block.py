"""MLP-block benchmark: one STL MLP block against cuBLAS dense and 2:4, on CUDA (bf16, t=4).

The block is ``stl_compiler.models.MLP([4096, 16384, 4096])``: Linear (+bias) → exact GELU →
Linear (+bias), on 8192 tokens of random data. Rows, timed side by side in one run:

- dense eager:     cuBLAS GEMMs + eager GELU (for reference);
- dense compiled:  ``torch.compile`` of the dense module (cuBLAS GEMMs + one Inductor
                   bias+GELU kernel): the baseline of every ratio ("x" = dense ms / row ms);
- 2:4 compiled:    magnitude 2:4 pruning, ``to_sparse_semi_structured`` weights (cuSPARSELt),
                   ``torch.compile``;
- STL r, unfused:  ``stl_compile(..., STLConfig(rank=r, fuse=False))``: encode → bmm → decode,
                   bias + GELU by Inductor, encode → bmm → decode;
- STL r, fused:    ``STLConfig(rank=r, fuse=True)``: decode → bias → GELU → encode is the one
                   op ``stl::decode_act_encode`` (the decoded hidden is never written);
- STL strassen:    the exact rank-49 basis, fused (t³/r = 1.31): the correctness gate.

Times are medians of ``triton.testing.do_bench`` (L2 flushed before each run), as in
``bench_layer.py``. Correctness: each row's output on the first ``--check-rows`` tokens against a
float32 dense reference of the same module. Fitted bases are inexact by design (large error on
random weights: reported, not gated). Gates, on the exact Strassen basis: float32 (eager, fused
and unfused) rel. error < 1e-4; bf16 (compiled, full block) < 3e-2. bf16 is not held to 1e-2:
Strassen's decode cancels terms, so the bf16 rounding of the r encoded planes is amplified about
4x over dense bf16 (measured 1.8e-2 vs 4.2e-3 for dense on the CPU composite at these dims).
The script exits with status 1 when a gate fails (after writing the JSON).

Usage (CUDA machine, ~2-3 min on an H100, mostly compile time)::

    python benchmarks/bench_mlp_block.py [--ranks 16 24 32] [--out DIR]

writes ``DIR/mlp_block.json`` (``DIR`` defaults to ``$OUT``). CPU smoke test of the same code
path at tiny sizes (no Triton, 2:4 replaced by pruned dense weights)::

    python benchmarks/bench_mlp_block.py --smoke
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_layer import prune_2_4  # noqa: E402

import stl_compiler as stl  # noqa: E402  (after the path fix above)
from stl_compiler.models import MLP  # noqa: E402

TILE = 4
DTYPE = torch.bfloat16
FP32_GATE = 1e-4
BF16_GATE = 3e-2


# ------------------------------------------------------------------------------------------
# Helpers shared with bench_model.py
# ------------------------------------------------------------------------------------------

def device_or_exit(smoke: bool, script: str) -> torch.device:
    """CUDA for a real run (exit with a clear message without it); CPU for ``--smoke``."""
    if smoke:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        sys.exit(f"{script} needs a CUDA GPU (torch.cuda.is_available() is False). "
                 f"Run `python benchmarks/{script}.py --smoke` for the CPU smoke test.")
    try:
        import triton  # noqa: F401
    except ImportError as err:
        sys.exit(f"{script} needs triton on CUDA (timing and STL kernels): {err}")
    from stl_compiler.runtime import triton_kernels

    if triton_kernels.kernels() is None:
        sys.exit(f"{script}: the STL Triton kernels cannot be imported, so the STL ops would "
                 f"fall back to the slow aten composites; fix that first")
    return torch.device("cuda")


def bench_ms(fn: Callable[[], object], device: torch.device, runs: int = 20) -> float:
    """Median time of ``fn`` in ms: ``do_bench`` on CUDA (>= ``runs`` timed runs, L2
    flushed before each), ``perf_counter`` over 3 runs on CPU (smoke only)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        estimate = max(start.elapsed_time(end), 1e-3)
        return float(do_bench(fn, warmup=max(25.0, 3 * estimate),
                              rep=max(200.0, runs * estimate), return_mode="median"))
    times = []
    for _ in range(3):
        start_s = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start_s) * 1e3)
    return statistics.median(times)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def first_call_s(fn: Callable[[], object], device: torch.device) -> tuple[Any, float]:
    """Run ``fn`` once (this compiles a torch.compile'd module); its output and seconds."""
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖out − ref‖ / ‖ref‖`` in float32 (inf when ``out`` is not finite)."""
    out, ref = out.float(), ref.float()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm()).item()


def free_memory(device: torch.device) -> None:
    """Drop compiled graphs and cached blocks between rows."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def environment(device: torch.device) -> dict:
    """Device, versions, date and commit of this run."""
    env = {"device": "cpu (smoke)", "torch": torch.__version__, "cuda": torch.version.cuda,
           "python": platform.python_version(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "commit": os.environ.get("STL_COMMIT") or _git_commit()}
    if device.type == "cuda":
        import triton

        props = torch.cuda.get_device_properties(0)
        env.update(device=torch.cuda.get_device_name(0), sms=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2**30, 1), triton=triton.__version__)
    return env


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def print_env(env: dict) -> None:
    print(f"device {env['device']} | torch {env['torch']} | triton {env.get('triton', '-')} | "
          f"{env['date']} | commit {env['commit']}", flush=True)


def sparsify_linears_(model: nn.Module, semi_structured: bool) -> dict[str, str]:
    """Magnitude 2:4-prune every ``nn.Linear`` weight of ``model`` in place.

    With ``semi_structured`` (CUDA) the weight becomes ``to_sparse_semi_structured`` of the
    pruned weight (cuSPARSELt); otherwise (CPU smoke) it stays a dense tensor holding the
    pruned values. Returns ``{layer name: error}`` for layers whose conversion failed (left
    dense, unpruned), keyed by name and weight shape.
    """
    errors: dict[str, str] = {}
    if semi_structured:
        from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

        SparseSemiStructuredTensor._FORCE_CUTLASS = False  # cuSPARSELt, as bench_layer.py
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        pruned = prune_2_4(module.weight.detach())
        try:
            weight = to_sparse_semi_structured(pruned) if semi_structured else pruned
        except (RuntimeError, ValueError, TypeError, NotImplementedError) as err:
            errors[f"{name} {tuple(module.weight.shape)}"] = f"{type(err).__name__}: {err}"
            continue
        module.weight = nn.Parameter(weight, requires_grad=False)
    return errors


def stl_graph_ops(module: nn.Module) -> dict[str, int]:
    """How many ``stl::*`` and bmm nodes the rewritten graph of an ``stl_compile`` result has."""
    gm = getattr(module, "_orig_mod", module)
    counts: Counter[str] = Counter()
    for node in getattr(gm, "graph", torch.fx.Graph()).nodes:
        name = str(node.target)
        if name.startswith("stl."):
            counts[name.split(".")[1]] += 1
        elif name in ("aten.bmm.default", "aten.baddbmm.default"):
            counts["bmm"] += 1
    return dict(sorted(counts.items()))


def boundary_summary(report: Any) -> dict[str, int]:
    """Boundary counts by fusion kind from an ``STLReport``."""
    return dict(sorted(Counter(b.kind for b in report.boundaries).items()))


def report_json(report: Any) -> dict:
    return json.loads(report.to_json())


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str))


def out_dir(value: str | None) -> Path:
    return Path(value or os.environ.get("OUT") or "out")


# ------------------------------------------------------------------------------------------
# The MLP block benchmark
# ------------------------------------------------------------------------------------------

def build(dims: tuple[int, int, int], tokens: int, device: torch.device, dtype: torch.dtype
          ) -> tuple[nn.Module, torch.Tensor]:
    """The dense block and a random input, reproducible."""
    torch.manual_seed(0)
    model = MLP(list(dims), ["gelu"]).to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(tokens, dims[0], device=device, dtype=dtype, generator=gen)
    return model, x


def stl_row(name: str, model: nn.Module, x: torch.Tensor, config: stl.STLConfig,
            device: torch.device, backend: str, runs: int) -> tuple[dict, torch.Tensor, Any]:
    """Convert + compile ``model`` with ``config``, time it; the row, its output, its report."""
    start = time.perf_counter()
    module = stl.stl_compile(model, (x,), config, dynamic_shapes=None, backend=backend)
    convert_s = time.perf_counter() - start
    report = module.stl_report
    out, compile_s = first_call_s(lambda: module(x), device)
    row = {"method": name, "rank": report.converted[0].rank if report.converted else None,
           "fuse": config.fuse, "basis": report.converted[0].basis if report.converted else None,
           "convert_s": convert_s, "compile_s": compile_s,
           "ms": bench_ms(lambda: module(x), device, runs),
           "sites_converted": f"{len(report.converted)}/{len(report.sites)}",
           "flop_ratio": report.flop_ratio, "model_rel_error_report": report.model_rel_error,
           "boundaries": boundary_summary(report), "graph_ops": stl_graph_ops(module)}
    if row["rank"]:
        row["ideal_x"] = TILE**3 / row["rank"]
    return row, out, report


def strassen_fp32_check(model: nn.Module, x: torch.Tensor, ref: torch.Tensor) -> dict:
    """The exact basis in float32, eager (the same custom ops and kernels), fused and unfused."""
    model32 = copy.deepcopy(model).float()
    result = {}
    for fuse in (False, True):
        config = stl.STLConfig(basis="strassen", fuse=fuse, measure_error=False)
        module = stl.stl_compile(model32, (x.float(),), config, dynamic_shapes=None,
                                 backend="eager")
        result["fused" if fuse else "unfused"] = rel_error(module(x.float()), ref)
    return result


def format_table(rows: list[dict], dense_ms: float) -> str:
    head = (f"{'method':<24} {'ms':>9} {'x dense':>8} {'ideal x':>8} {'fuse gain':>9} "
            f"{'rel.err vs fp32':>15} {'convert s':>9} {'compile s':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        ms = r.get("ms")
        if ms is None:
            lines.append(f"{r['method']:<24} {'-':>9}  {r.get('error', '')[:120]}")
            continue
        ideal = f"{r['ideal_x']:.2f}" if "ideal_x" in r else "-"
        gain = f"{r['fuse_gain']:.2f}" if "fuse_gain" in r else "-"
        err = f"{r['rel_err_vs_fp32']:.2e}" if r.get("rel_err_vs_fp32") is not None else "-"
        conv = f"{r['convert_s']:.1f}" if "convert_s" in r else "-"
        lines.append(f"{r['method']:<24} {ms:>9.4f} {dense_ms / ms:>8.2f} {ideal:>8} "
                     f"{gain:>9} {err:>15} {conv:>9} {r.get('compile_s', 0):>9.1f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; print the table; write ``mlp_block.json``. Returns the exit status."""
    device = device_or_exit(args.smoke, "bench_mlp_block")
    t_start = time.perf_counter()
    env = environment(device)
    print_env(env)
    dims, tokens = tuple(args.dims), args.tokens
    print(f"MLP block: {tokens} tokens, {dims[0]} -> {dims[1]} -> {dims[2]}, GELU, "
          f"{DTYPE}, t={TILE}, ranks {args.ranks}", flush=True)
    model, x = build(dims, tokens, device, DTYPE)
    check = x[: args.check_rows]
    with torch.no_grad():
        ref = copy.deepcopy(model).float()(check.float())
    result: dict[str, Any] = {"environment": env, "tokens": tokens, "dims": dims, "tile": TILE,
                              "dtype": str(DTYPE), "check_rows": args.check_rows,
                              "smoke": args.smoke, "rows": []}
    rows: list[dict] = result["rows"]
    path = out_dir(args.out) / "mlp_block.json"

    dense_ms = 1.0

    def add(row: dict, out: torch.Tensor | None) -> None:
        if out is not None:
            row["rel_err_vs_fp32"] = rel_error(out[: args.check_rows], ref)
        rows.append(row)
        write_json(path, result)  # partial results survive a later failure
        print(format_table([row], dense_ms).splitlines()[-1], flush=True)

    with torch.no_grad():
        print(format_table([], 1.0), flush=True)
        dense = torch.compile(model, backend=args.backend)
        out, compile_s = first_call_s(lambda: dense(x), device)
        dense_ms = bench_ms(lambda: dense(x), device, args.runs)
        add({"method": "dense compiled", "compile_s": compile_s, "ms": dense_ms}, out)
        dense = out = None
        free_memory(device)
        add({"method": "dense eager", "compile_s": 0.0,
             "ms": bench_ms(lambda: model(x), device, args.runs)}, model(x))

        sparse_model = copy.deepcopy(model)
        errors = sparsify_linears_(sparse_model, semi_structured=device.type == "cuda")
        name = "2:4 compiled" if device.type == "cuda" else "2:4 pruned dense (smoke)"
        try:
            sparse = torch.compile(sparse_model, backend=args.backend)
            out, compile_s = first_call_s(lambda: sparse(x), device)
            add({"method": name, "compile_s": compile_s, "conversion_errors": errors,
                 "ms": bench_ms(lambda: sparse(x), device, args.runs)}, out)
        except Exception as err:  # noqa: BLE001 - recorded, the run goes on
            add({"method": name, "error": f"{type(err).__name__}: {err}"[:2000],
                 "conversion_errors": errors}, None)
        sparse = out = None
        del sparse_model
        free_memory(device)

        reports: dict[str, Any] = {}
        for rank in args.ranks:
            outs = {}
            for fuse in (False, True):
                config = stl.STLConfig(tile=TILE, rank=rank, basis=args.basis, fuse=fuse,
                                       measure_error=not args.no_measure_error)
                label = f"STL r={rank} {'fused' if fuse else 'unfused'}"
                try:
                    row, outs[fuse], report = stl_row(label, model, x, config, device,
                                                      args.backend, args.runs)
                except Exception as err:  # noqa: BLE001 - recorded, the run goes on
                    add({"method": label, "error": f"{type(err).__name__}: {err}"[:2000]}, None)
                    continue
                reports[label] = report
                if fuse and False in outs:
                    unfused = next(r for r in rows if r["method"] == f"STL r={rank} unfused")
                    row["fuse_gain"] = unfused["ms"] / row["ms"]
                    row["rel_diff_vs_unfused"] = rel_error(outs[True], outs[False])
                add(row, outs[fuse])
                free_memory(device)
            outs.clear()

        gates: dict[str, Any] = {}
        if not args.no_strassen:
            config = stl.STLConfig(basis="strassen", fuse=True,
                                   measure_error=not args.no_measure_error)
            label = "STL strassen r=49 fused"
            try:
                row, out, report = stl_row(label, model, x, config, device, args.backend,
                                           args.runs)
                reports[label] = report
                add(row, out)
                err = row["rel_err_vs_fp32"]
            except Exception as exc:  # noqa: BLE001 - recorded; the gate fails below
                add({"method": label, "error": f"{type(exc).__name__}: {exc}"[:2000]}, None)
                err = float("inf")
            out = None
            free_memory(device)
            gates["bf16_compiled_fused"] = {"rel_err": err, "threshold": BF16_GATE,
                                            "pass": err < BF16_GATE, "below_1e-2": err < 1e-2}
            for kind, err in strassen_fp32_check(model, check, ref).items():
                gates[f"fp32_eager_{kind}"] = {"rel_err": err, "threshold": FP32_GATE,
                                               "pass": err < FP32_GATE}
        result["gates"] = gates
        result["reports"] = {k: report_json(r) for k, r in reports.items()}

    result["total_s"] = time.perf_counter() - t_start
    write_json(path, result)
    print("\n" + format_table(rows, dense_ms))
    print("x dense = dense compiled ms / row ms; ideal x = t^3/r (GEMM part only); fuse gain = "
          "unfused ms / fused ms; rel.err vs a float32 dense reference on the first "
          f"{args.check_rows} tokens (fitted bases are inexact by design)")
    for label, report in reports.items():
        if label.startswith(f"STL r={24 if 24 in args.ranks else args.ranks[0]} fused") or \
                label.startswith("STL strassen"):
            print(f"\n--- stl_report of {label} ---\n{report}")
    failed = [k for k, g in gates.items() if not g["pass"]]
    for kind, gate in gates.items():
        print(f"gate {kind}: rel. error {gate['rel_err']:.3e} < {gate['threshold']:g}: "
              f"{'PASS' if gate['pass'] else 'FAIL'}")
    if args.smoke:
        print("(smoke run on CPU: the timings mean nothing; it tests the code path)")
    print(f"total {result['total_s']:.0f} s; wrote {path}")
    if failed:
        print(f"!!! CORRECTNESS GATE FAILED: {failed}", file=sys.stderr)
        return 1
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--dims", type=int, nargs=3, default=[4096, 16384, 4096])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 24, 32])
    parser.add_argument("--basis", default="fitted", help="basis of the rank rows")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per row (at least)")
    parser.add_argument("--check-rows", type=int, default=1024,
                        help="tokens checked against the float32 reference")
    parser.add_argument("--backend", default="inductor", choices=("inductor", "eager"))
    parser.add_argument("--no-strassen", action="store_true", help="skip the exact-basis gate")
    parser.add_argument("--no-measure-error", action="store_true",
                        help="STLConfig(measure_error=False): faster conversion")
    parser.add_argument("--out", default=None, help="output folder (default $OUT or ./out)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes on CPU (no Triton, no 2:4): tests the code path")
    args = parser.parse_args(argv)
    if args.smoke:
        args.tokens, args.dims, args.ranks = 64, [64, 256, 64], [24]
        args.check_rows = 32
    if args.check_rows % TILE or args.check_rows > args.tokens:
        parser.error(f"--check-rows must be a multiple of {TILE} and <= --tokens")
    return args


def main(argv: list[str] | None = None) -> None:
    sys.exit(run(parse_args(argv)))


if __name__ == "__main__":
    main()
