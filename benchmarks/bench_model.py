"""End-to-end model benchmark: dense torch.compile vs STL compiled vs 2:4, on CUDA (bf16, t=4).

Stacks of blocks from :mod:`stl_compiler.models`, fed random hidden states (no embedding, no
head), all weights random:

- llama: Llama-like decoder at prefill: 8 x ``DecoderBlock`` (RMSNorm, SDPA causal GQA
  attention, SwiGLU MLP; hidden 4096, MLP 14336, 32 / 8 heads, no biases), 4 x 2048 tokens;
- vit:   ViT-H-like encoder: 16 of ViT-H's 32 ``EncoderBlock`` (pre-norm LayerNorm, SDPA
  attention, GELU MLP with biases; hidden 1280, MLP 5120, 16 heads), 32 x 257 tokens;
- dit:   DiT-XL-like: 8 pre-norm ``EncoderBlock`` (hidden 1152, MLP 4608, 16 heads; no adaLN
  modulation), 16 x 256 tokens;
- bert:  BERT-large-like: 8 post-norm ``EncoderBlock`` (``norm_first=False``; hidden 1024, MLP
  4096, 16 heads), 32 x 512 tokens;
- flux:  Flux-like: 4 pre-norm ``EncoderBlock`` (hidden 3072, MLP 12288, 24 heads), 1 x 4608
  tokens.

Attention runs through SDPA (flash attention) in every column: only nn.Linear layers change, as
for 2:4. Rows of an STL tile are 4 consecutive tokens (``row_grouping="tokens"``; for the causal
decoder that lets a token see up to 3 later tokens of its tile with an inexact basis, so it is
compiled with ``allow_non_causal=True``: it does not change the speed question;
``--row-grouping causal`` (same tiles, causal basis) or ``batch`` for the causality-safe
groupings).

Columns, each timed side by side in one run on the same input, for every ``--modes`` entry
(``default`` = ``torch.compile``'s default mode, ``reduce-overhead`` = CUDA graphs), dense and
STL compiled in the same mode:

- dense [mode]:     ``torch.compile(stack, mode=mode)``: cuBLAS GEMMs, Inductor for the rest;
- STL fused [mode]: ``stl_compile(stack, (x,), STLConfig(rank=24, targets=("linear",)),
                    dynamic_shapes=None, mode=mode)``: every nn.Linear an STL site, all fusion
                    passes on;
- with ``--ablations`` (default mode only): STL with ``fuse_row_strip=False`` and with
  ``fuse=False``;
- 2:4 (default mode): magnitude 2:4 pruning of every nn.Linear weight,
  ``to_sparse_semi_structured`` (cuSPARSELt), ``torch.compile``.

Every column reports, under ``torch.no_grad``: ``ms`` (median of ``triton.testing.do_bench``,
L2 flushed), ``wall`` (steady-state wall-clock per call of calls issued back to back: what a
user's loop sees), ``gpu`` (sum of GPU kernel durations per call, torch.profiler) and ``host``
(wall - gpu: the time the GPU waits for the host). Ratios ("x") are dense [same mode] / column,
on wall-clock. Compile time is the first call; STL conversion time (capture, passes, per-site
error measurement) is separate. Each column's output is compared with the dense column's
(fitted bases are inexact by design). A soft time budget (``--budget-s``) skips the columns that
would start after it.

Usage (CUDA machine; compile time dominates: ~1 min per STL column of a 16-layer stack)::

    python benchmarks/bench_model.py [--models vit dit bert] [--modes default reduce-overhead]
                                     [--ablations] [--out DIR]

writes ``DIR/model.json`` (``DIR`` defaults to ``$OUT``). CPU smoke test of the same code path
at tiny sizes (no Triton, 2:4 replaced by pruned dense weights, default mode only)::

    python benchmarks/bench_model.py --smoke
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402  (after the path fix above)
    DTYPE,
    TILE,
    ModelSpec,
    boundary_summary,
    build,
    device_or_exit,
    environment,
    first_call_s,
    free_memory,
    out_dir,
    print_env,
    rel_error,
    report_json,
    sparsify_linears_,
    stl_graph_ops,
    timing_row,
    write_json,
)

import stl_compiler as stl  # noqa: E402


def specs(args: argparse.Namespace) -> list[ModelSpec]:
    if args.smoke:
        table = {"llama": ModelSpec("llama", "decoder", 2, 64, 160, 4, 2, 2, 16),
                 "vit": ModelSpec("vit", "encoder", 2, 64, 128, 4, 4, 2, 17),
                 "dit": ModelSpec("dit", "encoder", 2, 48, 192, 4, 4, 2, 16),
                 "bert": ModelSpec("bert", "encoder", 2, 64, 256, 4, 4, 2, 16, False),
                 "flux": ModelSpec("flux", "encoder", 1, 96, 384, 4, 4, 1, 32)}
    else:
        vit_batch = -(-8192 // 257)  # 32 images: 8224 tokens
        table = {"llama": ModelSpec("llama", "decoder", args.llama_layers, 4096, 14336, 32, 8,
                                    4, 2048),
                 "vit": ModelSpec("vit", "encoder", args.vit_layers, 1280, 5120, 16, 16,
                                  vit_batch, 257),
                 "dit": ModelSpec("dit", "encoder", args.layers, 1152, 4608, 16, 16, 16, 256),
                 "bert": ModelSpec("bert", "encoder", args.layers, 1024, 4096, 16, 16, 32, 512,
                                   False),
                 "flux": ModelSpec("flux", "encoder", args.flux_layers, 3072, 12288, 24, 24, 1,
                                   4608)}
    return [table[name] for name in args.models]


class Columns:
    """Runs the columns of one model, keeps their outputs, honours the time budget."""

    def __init__(self, args: argparse.Namespace, device: torch.device, start: float,
                 on_row: Callable[[dict], None]) -> None:
        self.args, self.device, self.start, self.on_row = args, device, start, on_row
        self.rows: list[dict] = []
        self.outputs: dict[str, Tensor] = {}

    def over_budget(self, name: str) -> bool:
        elapsed = time.perf_counter() - self.start
        if elapsed <= self.args.budget_s:
            return False
        self.add({"method": name, "skipped": f"time budget: {elapsed:.0f} s elapsed > "
                                             f"--budget-s {self.args.budget_s:.0f}"})
        return True

    def add(self, row: dict, out: Tensor | None = None) -> None:
        if out is not None:
            reference = next((o for name, o in self.outputs.items()
                              if name.startswith("dense")), None)
            self.outputs[row["method"]] = out
            if reference is not None and not row["method"].startswith("dense"):
                row["rel_err_vs_dense"] = rel_error(out, reference)
        row["elapsed_s"] = time.perf_counter() - self.start
        self.rows.append(row)
        self.on_row(row)

    def timed(self, name: str, module: Callable[[Tensor], Tensor], x: Tensor, mode: str,
              **extra: Any) -> None:
        """First call (compile), then do_bench, wall-clock, GPU-kernel and host time; adds
        the row. CUDA-graph outputs are overwritten by the next replay: the kept output is a
        copy, and every call starts a new cudagraph step."""
        if mode == "reduce-overhead":
            def call() -> Tensor:
                torch.compiler.cudagraph_mark_step_begin()
                return module(x)
        else:
            call = lambda: module(x)
        out, compile_s = first_call_s(lambda: call().clone(), self.device)
        self.add({"method": name, "mode": mode, "compile_s": compile_s,
                  **timing_row(call, self.device, self.args.runs), **extra}, out)


def compile_mode(mode: str) -> dict[str, str]:
    """``torch.compile`` / ``stl_compile`` keyword for a ``--modes`` entry."""
    return {} if mode == "default" else {"mode": mode}


def stl_column(cols: Columns, name: str, model: nn.Module, x: Tensor, mode: str, fuse: bool,
               row_strip: bool, measure: bool) -> Any:
    """Convert with stl_compile, compile, time; returns the report (None on failure)."""
    args = cols.args
    config = stl.STLConfig(tile=TILE, rank=args.rank, basis=args.basis, fuse=fuse,
                           fuse_row_strip=row_strip, targets=("linear",),
                           row_grouping=args.row_grouping, measure_error=measure,
                           allow_non_causal=args.row_grouping == "tokens")
    try:
        start = time.perf_counter()
        module = stl.stl_compile(model, (x,), config, dynamic_shapes=None,
                                 backend=args.backend, **compile_mode(mode))
        convert_s = time.perf_counter() - start
        report = module.stl_report
        cols.timed(name, module, x, mode, convert_s=convert_s, rank=args.rank, fuse=fuse,
                   sites_converted=f"{len(report.converted)}/{len(report.sites)}",
                   flop_ratio=report.flop_ratio, model_rel_error_report=report.model_rel_error,
                   boundaries=boundary_summary(report), graph_ops=stl_graph_ops(module),
                   ideal_gemm_x=TILE**3 / args.rank)
        return report
    except Exception as err:  # noqa: BLE001 - recorded, the run goes on
        cols.add({"method": name, "error": f"{type(err).__name__}: {err}"[:3000]})
        return None
    finally:
        module = None
        free_memory(cols.device)


def sparse_column(cols: Columns, model: nn.Module, x: Tensor) -> None:
    """2:4 on every nn.Linear, torch.compile; eager 2:4 if compiling fails."""
    cuda = cols.device.type == "cuda"
    name = "2:4" if cuda else "2:4 pruned dense (smoke)"
    sparse_model = copy.deepcopy(model)
    errors = sparsify_linears_(sparse_model, semi_structured=cuda)
    if errors:
        print(f"  2:4 conversion failed for {len(errors)} layers (left dense): "
              f"{next(iter(errors.items()))}", flush=True)
    try:
        compiled = torch.compile(sparse_model, backend=cols.args.backend)
        cols.timed(name, compiled, x, "default", conversion_errors=errors,
                   layers_sparse=_count_sparse(sparse_model))
    except Exception as err:  # noqa: BLE001 - recorded; eager 2:4 tried below
        compile_error = f"{type(err).__name__}: {err}"[:3000]
        print(f"  2:4 torch.compile failed: {compile_error[:300]}", flush=True)
        free_memory(cols.device)
        try:
            cols.timed(f"{name} eager (compile failed)", sparse_model, x, "default",
                       conversion_errors=errors, compile_error=compile_error)
        except Exception as err2:  # noqa: BLE001 - recorded
            cols.add({"method": name, "error": f"{type(err2).__name__}: {err2}"[:3000],
                      "compile_error": compile_error, "conversion_errors": errors})
    finally:
        compiled = sparse_model = None
        free_memory(cols.device)


def _count_sparse(model: nn.Module) -> str:
    """How many nn.Linear weights are 2:4 semi-structured tensors, out of all."""
    from torch.sparse import SparseSemiStructuredTensor

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    sparse = sum(isinstance(m.weight, SparseSemiStructuredTensor) for m in linears)
    return f"{sparse}/{len(linears)}"


def summarize_report(report: Any, block: str = "blocks.0.") -> list[str]:
    """The lines of an STLReport worth printing for a deep stack: totals, block 0's sites and
    boundaries, and every distinct reason a boundary was not fused or a site stayed dense."""
    lines = [line for line in str(report).splitlines()
             if "sites converted" in line or "rel. error vs dense" in line]
    lines += [f"  site {s.name}: {'STL' if s.converted else 'DENSE: ' + s.reason} "
              f"(x {'x'.join(map(str, s.x_shape))}, w {'x'.join(map(str, s.w_shape))}, "
              f"rel.err {s.rel_error if s.rel_error is None else f'{s.rel_error:.2e}'})"
              for s in report.sites if s.name.startswith(block) or not s.converted]
    lines.append(f"  boundaries by kind: {boundary_summary(report)}")
    for b in report.boundaries:
        if b.producer.startswith(block) or block in " ".join(b.consumers[:1]):
            lines.append(f"  boundary {b.producer} -> {', '.join(b.consumers)}: {b.kind} "
                         f"({b.reason}; {b.bytes_saved} bytes saved)")
    reasons = Counter(b.reason for b in report.boundaries if b.kind == "not fused")
    lines += [f"  not fused x{n}: {reason}" for reason, n in reasons.items()]
    return lines


def format_row(row: dict, dense: dict | None) -> str:
    """One column: do_bench ms, wall / GPU / host ms, x dense (wall and GPU, same mode)."""
    if "ms" not in row:
        note = row.get("skipped") or row.get("error", "")
        return f"  {row['method']:<34} {'-':>8}  {note[:200]}"
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    ratio = lambda key: (f"{dense[key] / row[key]:.2f}" if dense and dense.get(key)
                         and row.get(key) else "-")
    conv = f"{row['convert_s']:.1f}" if "convert_s" in row else "-"
    err = f"{row['rel_err_vs_dense']:.2e}" if "rel_err_vs_dense" in row else "-"
    return (f"  {row['method']:<34} {row['ms']:>8.3f} {row['wall_ms']:>8.3f} "
            f"{fmt(row['gpu_ms']):>8} {fmt(row['host_ms']):>8} {ratio('wall_ms'):>7} "
            f"{ratio('gpu_ms'):>7} {conv:>9} {row['compile_s']:>9.1f} {err:>12}")


HEADER = (f"  {'column':<34} {'ms':>8} {'wall ms':>8} {'gpu ms':>8} {'host ms':>8} "
          f"{'x wall':>7} {'x gpu':>7} {'convert s':>9} {'compile s':>9} {'err vs dense':>12}")


def dense_row(rows: list[dict], mode: str) -> dict | None:
    """The dense column compiled in ``mode``: the baseline of that mode's ratios."""
    return next((r for r in rows if r["method"] == f"dense [{mode}]" and "ms" in r), None)


def run_model(spec: ModelSpec, args: argparse.Namespace, device: torch.device, start: float,
              result: dict, path: Path) -> dict:
    """All columns for one model; returns its JSON entry (also written after every row)."""
    print(f"\n== {spec.name}: {spec.layers} layers, hidden {spec.dim}, MLP {spec.mlp_dim}, "
          f"{spec.heads} heads / {spec.kv_heads} KV heads, batch {spec.batch} x seq "
          f"{spec.seq} = {spec.tokens} tokens, {'pre' if spec.norm_first else 'post'}-norm, "
          f"{DTYPE}", flush=True)
    entry: dict[str, Any] = {"spec": asdict(spec), "tokens": spec.tokens, "rows": []}
    result["models"][spec.name] = entry
    model, x = build(spec, device)
    entry["dense_params"] = sum(p.numel() for p in model.parameters())
    print(HEADER, flush=True)

    def on_row(row: dict) -> None:
        entry["rows"] = cols.rows
        write_json(path, result)
        print(format_row(row, dense_row(cols.rows, row.get("mode", "default"))),
              f"[{row['elapsed_s']:.0f} s]", flush=True)

    cols = Columns(args, device, start, on_row)
    reports = {}
    fused = lambda mode: f"STL r={args.rank} fused [{mode}]"
    with torch.no_grad():
        for mode in args.modes:
            name = f"dense [{mode}]"
            if not cols.over_budget(name):
                try:
                    dense = torch.compile(model, backend=args.backend, **compile_mode(mode))
                    cols.timed(name, dense, x, mode)
                except Exception as err:  # noqa: BLE001 - recorded
                    cols.add({"method": name, "mode": mode,
                              "error": f"{type(err).__name__}: {err}"[:3000]})
                dense = None
                free_memory(device)
            if not cols.over_budget(fused(mode)):
                measure = mode == args.modes[0] and not args.no_measure_error
                reports[mode] = stl_column(cols, fused(mode), model, x, mode, True, True,
                                           measure)
        if args.ablations:
            for name, fuse, row_strip in ((f"STL r={args.rank} no row-strip [default]", True,
                                           False),
                                          (f"STL r={args.rank} unfused [default]", False, False)):
                if not cols.over_budget(name):
                    stl_column(cols, name, model, x, "default", fuse, row_strip, False)
        if not args.no_sparse and not cols.over_budget("2:4"):
            sparse_column(cols, model, x)
    entry["rows"] = cols.rows
    report = reports.get(args.modes[0])
    if report is not None:
        entry["report"] = report_json(report)
        entry["report_summary"] = summarize_report(report)
    cols.outputs.clear()
    model = x = None
    free_memory(device)
    write_json(path, result)
    return entry


def print_summary(result: dict, args: argparse.Namespace) -> None:
    for name, entry in result["models"].items():
        spec = entry["spec"]
        rows = entry["rows"]
        print(f"\n{name}: {spec['layers']} layers, {entry['tokens']} tokens")
        print(HEADER)
        for row in rows:
            print(format_row(row, dense_row(rows, row.get("mode", "default"))))
        for mode in args.modes:
            dense = dense_row(rows, mode)
            stl_row = next((r for r in rows if r["method"] == f"STL r={args.rank} fused [{mode}]"
                            and "ms" in r), None)
            if dense and stl_row:
                gpu = (f"{dense['gpu_ms'] / stl_row['gpu_ms']:.2f}x" if stl_row["gpu_ms"]
                       else "-")
                wall = dense["wall_ms"] / stl_row["wall_ms"]
                print(f"  [{mode}] STL fused vs dense: wall {wall:.2f}x, GPU-kernel "
                      f"{gpu}, host overhead {stl_row['host_ms'] or 0:.3f} ms "
                      f"(dense {dense['host_ms'] or 0:.3f} ms); ideal GEMM-only x = t^3/r = "
                      f"{TILE**3 / args.rank:.2f}")
        for line in entry.get("report_summary", []):
            print(f"  {line}")


def run(args: argparse.Namespace) -> int:
    device = device_or_exit(args.smoke, "bench_model")
    start = time.perf_counter()
    env = environment(device)
    print_env(env)
    path = out_dir(args.out) / "model.json"
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    result: dict[str, Any] = {"environment": env, "settings": settings, "tile": TILE,
                              "dtype": str(DTYPE), "models": {}}
    for spec in specs(args):
        run_model(spec, args, device, start, result, path)
    result["total_s"] = time.perf_counter() - start
    write_json(path, result)
    print_summary(result, args)
    if args.smoke:
        print("\n(smoke run on CPU: the timings mean nothing; it tests the code path)")
    print(f"\ntotal {result['total_s']:.0f} s; wrote {path}")
    failed = [f"{m}: {r['method']}" for m, e in result["models"].items() for r in e["rows"]
              if "error" in r and not r["method"].startswith("2:4")]
    if failed:
        print(f"!!! columns failed: {failed}", file=sys.stderr)
        return 1
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vit", "dit", "bert"],
                        choices=("llama", "vit", "dit", "bert", "flux"))
    parser.add_argument("--modes", nargs="+", default=["default", "reduce-overhead"],
                        choices=("default", "reduce-overhead", "max-autotune-no-cudagraphs"),
                        help="torch.compile modes; dense and STL are compiled in each")
    parser.add_argument("--ablations", action="store_true",
                        help="also STL without row-strip fusion and without fusion (default mode)")
    parser.add_argument("--llama-layers", type=int, default=8)
    parser.add_argument("--vit-layers", type=int, default=16,
                        help="ViT-H has 32; 16 keeps compile time near a minute per column")
    parser.add_argument("--layers", type=int, default=8, help="layers of the dit / bert stacks")
    parser.add_argument("--flux-layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=24)
    parser.add_argument("--basis", default="fitted")
    parser.add_argument("--row-grouping", default="tokens", choices=("tokens", "causal", "batch"))
    parser.add_argument("--runs", type=int, default=10, help="timed runs per column (at least)")
    parser.add_argument("--backend", default="inductor", choices=("inductor", "eager"))
    parser.add_argument("--no-sparse", action="store_true", help="skip the 2:4 column")
    parser.add_argument("--no-measure-error", action="store_true",
                        help="STLConfig(measure_error=False) for the fused column too")
    parser.add_argument("--budget-s", type=float, default=330.0,
                        help="columns that would start after this many seconds are skipped")
    parser.add_argument("--out", default=None, help="output folder (default $OUT or ./out)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes on CPU (no Triton, no 2:4): tests the code path")
    args = parser.parse_args(argv)
    if args.smoke:
        args.modes = ["default"]  # CUDA graphs need CUDA
    return args


def main(argv: list[str] | None = None) -> None:
    sys.exit(run(parse_args(argv)))


if __name__ == "__main__":
    main()
