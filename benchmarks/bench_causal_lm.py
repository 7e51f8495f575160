"""Causal LM benchmark: prefill of a transformers Llama by row grouping, and the decode regime.

Two parts, each dense ``torch.compile`` vs ``stl_compile`` in the same (default) mode, bf16,
t=4, rank 24, timed side by side in one run (wall-clock, GPU-kernel time, host overhead):

- prefill: ``transformers.LlamaForCausalLM`` with random weights at Llama-3-8B layer shapes
  (hidden 4096, MLP 14336, 32 / 8 heads, vocab 32000), ``--layers`` layers, ``--batch`` x
  ``--seq`` tokens, SDPA attention; STL columns for ``row_grouping`` "causal" (token tiles,
  causal basis: causality-safe), "batch" (row-separable basis: causality-safe) and "tokens"
  (the general fitted basis: NOT causal, compiled with ``allow_non_causal=True`` as the speed
  reference). Only the linear layers change (``targets="linear"``).
- decode: one 4096 -> 14336 linear layer fed ``(B, 1, 4096)`` (B sequences, one new token
  each: a decode step) and ``(1, M, 4096)`` (a prefill chunk), dense vs STL "causal" and
  "batch". With "causal" a decode step computes a whole 4-row tile per sequence (the cached
  earlier rows of its tile; see docs/causal_lm.md), which the ``(B, 4, 4096)`` input models;
  "batch" packs 4 sequences per tile. The break-even size is printed.

Usage (CUDA machine)::

    python benchmarks/bench_causal_lm.py [--layers 4] [--out DIR]

writes ``DIR/causal_lm.json``. CPU smoke test of the same code path at tiny sizes::

    python benchmarks/bench_causal_lm.py --smoke
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402  (after the path fix above)
    DTYPE,
    device_or_exit,
    environment,
    free_memory,
    kernel_breakdown,
    out_dir,
    print_env,
    rel_error,
    timing_row,
    write_json,
)

import stl_compiler as stl  # noqa: E402

GROUPINGS = ("causal", "batch", "tokens")
#: Extra "causal" columns with some projections left dense (``--variants``): which sites pay.
VARIANTS = {
    "dense-kv": {"*k_proj": "skip", "*v_proj": "skip"},
    "dense-lm-head": {"lm_head": "skip"},
    "dense-kv-lm-head": {"*k_proj": "skip", "*v_proj": "skip", "lm_head": "skip"},
}


def llama(args: argparse.Namespace, device: torch.device) -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    hidden, mlp, heads, vocab = (64, 160, 4, 128) if args.smoke else (4096, 14336, 32, 32000)
    config = tf.LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_attention_heads=heads,
                            num_key_value_heads=heads // 4, num_hidden_layers=args.layers,
                            vocab_size=vocab, max_position_embeddings=args.seq,
                            use_cache=False, attn_implementation="sdpa")
    model = tf.LlamaForCausalLM(config).to(device=device, dtype=DTYPE).eval()
    model.requires_grad_(False)
    return model


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


def stl_config(grouping: str, **kw: Any) -> stl.STLConfig:
    return stl.STLConfig(rank=24, targets="linear", row_grouping=grouping,
                         allow_non_causal=grouping == "tokens", **kw)


def row(name: str, fn: Any, device: torch.device, runs: int, extra: dict) -> tuple[dict, Any]:
    """One timed column: first call (compile) time, then :func:`timing_row`."""
    start = time.perf_counter()
    out = fn()
    entry = {"method": name, "first_call_s": time.perf_counter() - start, **extra}
    entry.update(timing_row(fn, device, runs))
    print(f"  {name:<40} wall {entry['wall_ms']:8.3f} ms  gpu "
          f"{entry['gpu_ms'] if entry['gpu_ms'] is None else round(entry['gpu_ms'], 3)}  "
          f"host {entry['host_ms']}", flush=True)
    return entry, out


def prefill(args: argparse.Namespace, device: torch.device) -> list[dict]:
    model = llama(args, device)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=device)
    rows = []
    columns = [(g, g, {}) for g in args.groupings] + [
        (f"causal, {v}", "causal", VARIANTS[v]) for v in args.variants]
    with torch.no_grad():
        dense = torch.compile(model)
        entry, ref = row("dense [default]", partial(logits, dense, ids), device, args.runs, {})
        if args.profile:
            entry["kernels"] = kernel_breakdown(partial(logits, dense, ids), device)
        rows.append(entry)
        dense = None
        for label, grouping, overrides in columns:
            name = f"STL r=24 {label} [default]"
            try:
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    fast = stl.stl_compile(model, (ids,),
                                           stl_config(grouping, overrides=overrides),
                                           dynamic_shapes=None)
                convert_s = time.perf_counter() - start
                entry, out = row(name, partial(logits, fast, ids), device, args.runs,
                                 {"convert_s": convert_s, "grouping": grouping,
                                  "dense_sites": sorted(overrides)})
                if args.profile:
                    entry["kernels"] = kernel_breakdown(partial(logits, fast, ids), device)
                entry["rel_err_vs_dense"] = rel_error(out, ref)
                entry["report_headline"] = [line for line in str(fast.stl_report).splitlines()
                                            if "row_grouping" in line or "causal" in line]
            except Exception as err:  # noqa: BLE001 - recorded in the results
                entry = {"method": name, "error": f"{type(err).__name__}: {err}"[:2000]}
                print(f"  {name:<40} {entry['error'][:300]}", flush=True)
            rows.append(entry)
            fast = None
            free_memory(device)
    return rows


def decode(args: argparse.Namespace, device: torch.device) -> list[dict]:
    torch.manual_seed(0)
    k, m = (64, 160) if args.smoke else (4096, 14336)
    layer = nn.Linear(k, m, bias=False).to(device=device, dtype=DTYPE).eval()
    layer.requires_grad_(False)
    shapes = [(b, 1) for b in args.decode_batches] + [(1, s) for s in args.prefill_rows]
    rows = []
    with torch.no_grad():
        for batch, seq in shapes:
            x = torch.randn(batch, seq, k, device=device, dtype=DTYPE)
            tokens = batch * seq
            dense = torch.compile(layer, dynamic=False)
            base, _ = row(f"dense ({batch}, {seq})", partial(dense, x), device, args.runs,
                          {"batch": batch, "seq": seq})
            base["tokens"] = tokens
            rows.append(base)
            for grouping in ("causal", "batch"):
                # A causal decode step recomputes its sequence's tile: 4 rows per sequence.
                xs = x.expand(batch, 4, k).contiguous() if grouping == "causal" and seq == 1 else x
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        fast = stl.stl_compile(layer, (xs,), stl_config(grouping),
                                               dynamic_shapes=None)
                    entry, _ = row(f"STL {grouping} ({batch}, {seq})", partial(fast, xs), device,
                                   args.runs, {"batch": batch, "seq": seq, "grouping": grouping})
                    entry["tokens"] = tokens
                    entry["speedup_vs_dense"] = base["wall_ms"] / entry["wall_ms"]
                except Exception as err:  # noqa: BLE001 - recorded in the results
                    entry = {"method": f"STL {grouping} ({batch}, {seq})",
                             "error": f"{type(err).__name__}: {err}"[:2000]}
                rows.append(entry)
                fast = None
            free_memory(device)
    return rows


def break_even(rows: list[dict], grouping: str) -> int | None:
    """The smallest token count from which STL ``grouping`` is at least as fast as dense."""
    faster = sorted(r["tokens"] for r in rows if r.get("grouping") == grouping
                    and r.get("speedup_vs_dense", 0) >= 1.0)
    return faster[0] if faster else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--decode-batches", type=int, nargs="*", default=[1, 8, 32, 128, 256])
    parser.add_argument("--prefill-rows", type=int, nargs="*", default=[1024, 4096, 8192])
    parser.add_argument("--parts", nargs="+", default=["prefill", "decode"],
                        choices=("prefill", "decode"))
    parser.add_argument("--groupings", nargs="*", default=list(GROUPINGS), choices=GROUPINGS,
                        help="prefill STL columns, one per row grouping")
    parser.add_argument("--variants", nargs="*", default=[], choices=sorted(VARIANTS),
                        help="extra prefill columns: causal grouping with these sites dense")
    parser.add_argument("--profile", action="store_true",
                        help="prefill: record each column's top GPU kernels (torch.profiler)")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU")
    args = parser.parse_args(argv)
    if args.smoke:
        args.layers, args.batch, args.seq = 2, 2, 16
        args.decode_batches, args.prefill_rows, args.runs = [1, 4], [8], 2
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = device_or_exit(args.smoke, "bench_causal_lm")
    env = environment(device)
    print_env(env)
    result: dict[str, Any] = {"environment": env, "settings": vars(args), "dtype": str(DTYPE)}
    path = out_dir(args.out) / "causal_lm.json"
    if "prefill" in args.parts:
        print(f"\n== prefill: LlamaForCausalLM {args.layers} layers, {args.batch} x {args.seq} "
              f"tokens", flush=True)
        result["prefill"] = prefill(args, device)
        write_json(path, result)
    if "decode" in args.parts:
        print("\n== decode regime: one 4096 -> 14336 linear", flush=True)
        result["decode"] = decode(args, device)
        result["break_even_tokens"] = {g: break_even(result["decode"], g)
                                       for g in ("causal", "batch")}
        print(f"  break-even (tokens): {result['break_even_tokens']}")
    write_json(path, result)
    if args.smoke:
        print("\n(smoke run on CPU: the timings mean nothing; it tests the code path)")
    print(f"wrote {path}")
    failed = [r["method"] for part in ("prefill", "decode") for r in result.get(part, [])
              if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
