"""End-to-end model benchmark: dense torch.compile vs STL compiled vs 2:4, on CUDA (bf16, t=4).

Two stacks of blocks from :mod:`stl_compiler.models`, fed random hidden states (no embedding,
no head), all weights random:

- llama: a Llama-like decoder at prefill: 8 x ``DecoderBlock`` (RMSNorm, SDPA causal GQA
  attention, SwiGLU MLP; hidden 4096, MLP 14336, 32 heads / 8 KV heads, no biases), input
  batch 4 x seq 2048 = 8192 tokens;
- vit: a ViT-H-like encoder: ``EncoderBlock`` (LayerNorm, SDPA attention, GELU MLP with
  biases; hidden 1280, MLP 5120, 16 heads), 257 tokens x batch 32 = 8224 tokens. ViT-H has 32
  layers; the default here is 16 (``--vit-layers 32`` for full depth) to keep the whole run
  near 6 minutes, since compile time grows with depth. Attention runs through SDPA
  (``attn.use_sdpa = True``) so that it is flash attention in every column.

Columns, each timed side by side in one run on the same input:

- dense:       ``torch.compile`` of the dense stack (cuBLAS GEMMs, Inductor for the rest);
               the baseline of every ratio ("x" = dense ms / column ms);
- STL fused:   ``stl_compile(stack, (x,), STLConfig(rank=24, targets=("linear",)))``: every
               nn.Linear is an STL site, the fusion passes on (SwiGLU / GELU boundaries become
               one decode→act→encode op, residual + RMSNorm/LayerNorm boundaries one
               decode→norm→encode row-strip op), Inductor backend, static shapes;
- STL fused, no row-strip: the same with ``fuse_row_strip=False`` (residual + norm
               boundaries stay decoded: the fusion of issue 4 before row strips);
- STL unfused: the same with ``fuse=False``;
- 2:4:         magnitude 2:4 pruning of every nn.Linear weight, ``to_sparse_semi_structured``
               (cuSPARSELt), ``torch.compile``; a layer whose conversion fails stays dense and
               the error is recorded; if compiling fails, 2:4 is timed eagerly and both noted.

Attention (SDPA) stays dense in every column: only nn.Linear layers change, as for 2:4. Rows of
an STL tile are 4 consecutive tokens (``row_grouping="tokens"``); for the causal decoder that
lets a token see up to 3 later tokens of its tile with an inexact basis. It does not change
the speed question; pass ``--row-grouping batch`` for the causality-safe grouping.

Times are medians over at least ``--runs`` runs of ``triton.testing.do_bench`` (CUDA events, L2
flushed), as in ``bench_layer.py``, under ``torch.no_grad``. Compile time is the first call of
the compiled module; STL conversion time (capture, passes, per-site error measurement) is
separate. Each column's output is compared with the dense column's (fitted bases are inexact by
design) and the fused STL output with the unfused one (same basis: should agree to rounding).
A soft time budget (``--budget-s``) skips the columns that would start after it.

Usage (CUDA machine; about 4-6 min on an H100, most of it compile time)::

    python benchmarks/bench_model.py [--models llama vit] [--vit-layers 16] [--out DIR]

writes ``DIR/model.json`` (``DIR`` defaults to ``$OUT``). CPU smoke test of the same code path
at tiny sizes (no Triton, 2:4 replaced by pruned dense weights)::

    python benchmarks/bench_model.py --smoke
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_mlp_block import (  # noqa: E402  (after the path fix above)
    bench_ms,
    boundary_summary,
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
    write_json,
)

import stl_compiler as stl  # noqa: E402
from stl_compiler.models import DecoderBlock, EncoderBlock  # noqa: E402

TILE = 4
DTYPE = torch.bfloat16
#: Issue 5's end-to-end target for the Llama-like prefill stack, r=24, fused.
LLAMA_TARGET_X = 1.7


@dataclass
class ModelSpec:
    """One benchmarked stack."""

    name: str
    kind: str  # "decoder" | "encoder"
    layers: int
    dim: int
    mlp_dim: int
    heads: int
    kv_heads: int
    batch: int
    seq: int

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


class Stack(nn.Module):
    """Blocks applied in sequence to hidden states ``(batch, seq, dim)``."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def build(spec: ModelSpec, device: torch.device) -> tuple[nn.Module, Tensor]:
    """The dense stack (bf16, eval, no grad) and a random input, reproducible."""
    torch.manual_seed(0)
    if spec.kind == "decoder":
        blocks = [DecoderBlock(spec.dim, spec.heads, spec.kv_heads, spec.mlp_dim)
                  for _ in range(spec.layers)]
    else:
        blocks = [EncoderBlock(spec.dim, spec.heads, spec.mlp_dim) for _ in range(spec.layers)]
        for block in blocks:
            block.attn.use_sdpa = True  # flash attention, in every column
    model = Stack(blocks).to(device=device, dtype=DTYPE).eval()
    model.requires_grad_(False)
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(spec.batch, spec.seq, spec.dim, device=device, dtype=DTYPE, generator=gen)
    return model, x


def specs(args: argparse.Namespace) -> list[ModelSpec]:
    if args.smoke:
        table = {"llama": ModelSpec("llama", "decoder", 2, 64, 160, 4, 2, 2, 16),
                 "vit": ModelSpec("vit", "encoder", 2, 64, 128, 4, 4, 2, 17)}
    else:
        vit_batch = -(-8192 // 257)  # 32 images: 8224 tokens
        table = {"llama": ModelSpec("llama", "decoder", args.llama_layers, 4096, 14336, 32, 8,
                                    4, 2048),
                 "vit": ModelSpec("vit", "encoder", args.vit_layers, 1280, 5120, 16, 16,
                                  vit_batch, 257)}
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
            self.outputs[row["method"]] = out
            if "dense" in self.outputs and row["method"] != "dense":
                row["rel_err_vs_dense"] = rel_error(out, self.outputs["dense"])
        row["elapsed_s"] = time.perf_counter() - self.start
        self.rows.append(row)
        self.on_row(row)

    def timed(self, name: str, module: Callable[[Tensor], Tensor], x: Tensor, **extra: Any
              ) -> None:
        """First call (compile) then the median time; adds the row."""
        out, compile_s = first_call_s(lambda: module(x), self.device)
        ms = bench_ms(lambda: module(x), self.device, self.args.runs)
        self.add({"method": name, "ms": ms, "compile_s": compile_s, **extra}, out)


def stl_column(cols: Columns, name: str, model: nn.Module, x: Tensor, fuse: bool,
               row_strip: bool, measure: bool) -> Any:
    """Convert with stl_compile, compile, time; returns the report (None on failure)."""
    args = cols.args
    config = stl.STLConfig(tile=TILE, rank=args.rank, basis=args.basis, fuse=fuse,
                           fuse_row_strip=row_strip, targets=("linear",),
                           row_grouping=args.row_grouping, measure_error=measure)
    try:
        start = time.perf_counter()
        module = stl.stl_compile(model, (x,), config, dynamic_shapes=None,
                                 backend=args.backend)
        convert_s = time.perf_counter() - start
        report = module.stl_report
        cols.timed(name, module, x, convert_s=convert_s, rank=args.rank, fuse=fuse,
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
        cols.timed(name, compiled, x, conversion_errors=errors,
                   layers_sparse=_count_sparse(sparse_model))
    except Exception as err:  # noqa: BLE001 - recorded; eager 2:4 tried below
        compile_error = f"{type(err).__name__}: {err}"[:3000]
        print(f"  2:4 torch.compile failed: {compile_error[:300]}", flush=True)
        free_memory(cols.device)
        try:
            cols.timed(f"{name} eager (compile failed)", sparse_model, x,
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


def format_row(row: dict, dense_ms: float | None) -> str:
    if "ms" not in row:
        note = row.get("skipped") or row.get("error", "")
        return f"  {row['method']:<26} {'-':>9} {'-':>7}  {note[:200]}"
    ratio = f"{dense_ms / row['ms']:.2f}" if dense_ms else "-"
    conv = f"{row['convert_s']:.1f}" if "convert_s" in row else "-"
    err = f"{row['rel_err_vs_dense']:.2e}" if "rel_err_vs_dense" in row else "-"
    return (f"  {row['method']:<26} {row['ms']:>9.3f} {ratio:>7} {conv:>9} "
            f"{row['compile_s']:>9.1f} {err:>12}")


HEADER = (f"  {'column':<26} {'ms':>9} {'x dense':>7} {'convert s':>9} {'compile s':>9} "
          f"{'err vs dense':>12}")


def run_model(spec: ModelSpec, args: argparse.Namespace, device: torch.device, start: float,
              result: dict, path: Path) -> dict:
    """All columns for one model; returns its JSON entry (also written after every row)."""
    print(f"\n== {spec.name}: {spec.layers} layers, hidden {spec.dim}, MLP {spec.mlp_dim}, "
          f"{spec.heads} heads / {spec.kv_heads} KV heads, batch {spec.batch} x seq "
          f"{spec.seq} = {spec.tokens} tokens, {DTYPE}", flush=True)
    entry: dict[str, Any] = {"spec": asdict(spec), "tokens": spec.tokens, "rows": []}
    result["models"][spec.name] = entry
    model, x = build(spec, device)
    entry["dense_params"] = sum(p.numel() for p in model.parameters())
    print(HEADER, flush=True)

    def on_row(row: dict) -> None:
        entry["rows"] = cols.rows
        write_json(path, result)
        dense = next((r["ms"] for r in cols.rows if r["method"] == "dense" and "ms" in r), None)
        print(format_row(row, dense), f"[{row['elapsed_s']:.0f} s]", flush=True)

    cols = Columns(args, device, start, on_row)
    with torch.no_grad():
        if not cols.over_budget("dense"):
            try:
                cols.timed("dense", torch.compile(model, backend=args.backend), x)
            except Exception as err:  # noqa: BLE001 - recorded
                cols.add({"method": "dense", "error": f"{type(err).__name__}: {err}"[:3000]})
            free_memory(device)
        reports = {}
        fused, no_strip, unfused = (f"STL r={args.rank} {k}" for k in (
            "fused", "fused, no row-strip", "unfused"))
        for name, fuse, row_strip in ((fused, True, True), (no_strip, True, False),
                                      (unfused, False, False)):
            if not cols.over_budget(name):
                measure = name == fused and not args.no_measure_error
                reports[name] = stl_column(cols, name, model, x, fuse, row_strip, measure)
        outs = cols.outputs
        if fused in outs and unfused in outs:
            entry["rel_diff_fused_vs_unfused"] = rel_error(outs[fused], outs[unfused])
            row = next(r for r in cols.rows if r["method"] == fused)
            for other_name, key in ((unfused, "fuse_gain"), (no_strip, "row_strip_gain")):
                other = next((r for r in cols.rows if r["method"] == other_name and "ms" in r),
                             None)
                if other is not None:
                    row[key] = other["ms"] / row["ms"]
        if not args.no_sparse and not cols.over_budget("2:4"):
            sparse_column(cols, model, x)
    entry["rows"] = cols.rows
    report = reports.get(fused)
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
        dense = next((r["ms"] for r in rows if r["method"] == "dense" and "ms" in r), None)
        print(f"\n{name}: {spec['layers']} layers, {entry['tokens']} tokens")
        print(HEADER)
        for row in rows:
            print(format_row(row, dense))
        fused = next((r for r in rows if r["method"].endswith(" fused") and "ms" in r), None)
        if fused is not None and dense:
            print(f"  fusion gain (unfused ms / fused ms): {fused.get('fuse_gain', 0):.2f}; "
                  f"row-strip gain (no row-strip ms / fused ms): "
                  f"{fused.get('row_strip_gain', 0):.2f}; "
                  f"fused vs unfused output rel. diff: "
                  f"{entry.get('rel_diff_fused_vs_unfused', float('nan')):.2e}; "
                  f"ideal GEMM-only x = t^3/r = {fused['ideal_gemm_x']:.2f}")
            if name == "llama" and args.rank == 24 and not args.smoke:
                x = dense / fused["ms"]
                print(f"  issue 5 target {LLAMA_TARGET_X}x: measured {x:.2f}x "
                      f"({x / LLAMA_TARGET_X:.0%} of target)")
            print(f"  stl graph ops (fused): {fused.get('graph_ops')}")
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
    parser.add_argument("--models", nargs="+", default=["llama", "vit"],
                        choices=("llama", "vit"))
    parser.add_argument("--llama-layers", type=int, default=8)
    parser.add_argument("--vit-layers", type=int, default=16,
                        help="ViT-H has 32; 16 keeps the run near 6 min")
    parser.add_argument("--rank", type=int, default=24)
    parser.add_argument("--basis", default="fitted")
    parser.add_argument("--row-grouping", default="tokens", choices=("tokens", "batch"))
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
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    sys.exit(run(parse_args(argv)))


if __name__ == "__main__":
    main()
