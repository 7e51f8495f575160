"""Device check: transformers ``generate`` with causal STL layers (issue 14, incremental decoding).

A random-weight ``LlamaForCausalLM`` (hidden 512, 4 layers by default) is converted with
``swap_linears_(model, STLConfig(row_grouping="causal", ...))`` and checked:

1. ``exact``: the exact causal basis (naive, rank 64): greedy tokens identical to the dense
   model's for ``--new-exact`` tokens, float32 with TF32 off, eager (DynamicCache), eager
   StaticCache, and StaticCache with the decode step compiled (``mode="reduce-overhead"``: CUDA
   graphs, ``fullgraph=True``). A mismatch reports the step and the dense top-1/top-2 logit
   margin there (a near-tie flipped by rounding is not a bug; a wide margin is).
2. ``rank24``: incremental logits (every generated step) vs one full forward over the same
   tokens, float32, for the basis ``fitted`` resolves to at rank 24 and for a random causal
   basis whose terms span tile rows (where decoding without the tile state is far off: the
   ``no_state`` row shows by how much). Eager DynamicCache and compiled StaticCache.
3. ``speed``: tokens/s, dense vs STL rank 24 (bf16, prompt ``--prompt``, ``--new`` new tokens,
   batch 1 and 8): eager DynamicCache, compiled StaticCache (reduce-overhead; transformers
   compiles the decode step only) and ``compiled-forward`` (the whole ``model.forward``
   compiled, so the prefill too; ``--modes``). Prefill is timed alone (one new token) so decode
   tokens/s is reported too.

Prints one JSON object (and writes it to ``$OUT/gpu_generation.json`` or ``--out``).
``--smoke`` runs a tiny model on CPU (no compile unless ``--compile``): the code path only.

Usage: ``python benchmarks/gpu_generation_check.py [--skip speed] [--smoke]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import stl_compiler as stl  # noqa: E402
from stl_compiler import generation  # noqa: E402
from stl_compiler.bases import STLBasis  # noqa: E402

STEPS = ("exact", "rank24", "speed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--init", type=float, default=0.05,
                   help="initializer_range: larger than transformers' 0.02 so that greedy "
                        "decoding has fewer near-ties")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--new-exact", type=int, default=40)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--modes", nargs="+", default=["eager", "compiled"],
                   choices=["eager", "compiled", "compiled-forward"],
                   help="generation modes: eager (DynamicCache), compiled (StaticCache, "
                        "transformers compiles the decode step), compiled-forward (StaticCache, "
                        "the whole forward compiled: prefill too)")
    p.add_argument("--skip", nargs="*", default=[], choices=STEPS)
    p.add_argument("--compile", action="store_true", help="compile in --smoke too")
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.hidden, args.layers, args.heads, args.intermediate, args.vocab = 32, 2, 4, 64, 96
        args.prompt, args.new, args.new_exact, args.batches = 7, 6, 8, [1, 3]
    return args


def build(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Any:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads or args.heads,
        max_position_embeddings=args.prompt + args.new + 64,
        initializer_range=args.init, bos_token_id=1, eos_token_id=None, pad_token_id=0)
    return transformers.LlamaForCausalLM(config).to(device, dtype).eval()


def convert(model: Any, basis: STLBasis | str, rank: int | None = None) -> dict[str, str]:
    config = stl.STLConfig(row_grouping="causal", basis=basis, rank=rank, min_dim=0,
                           max_cost_ratio=None)
    outcome = stl.swap_linears_(model, config)
    if generation.generation_state(model) is None:
        raise RuntimeError("swap_linears_ did not enable incremental decoding")
    return outcome


def random_causal_basis(tile: int = 4, rank: int = 24) -> STLBasis:
    """Random terms, each with a pivot row q: reads tile rows <= q, writes rows >= q."""
    gen = torch.Generator().manual_seed(1)
    pivot = torch.randint(0, tile, (rank,), generator=gen)
    row = torch.arange(tile).repeat_interleave(tile)
    rand = lambda: torch.randn(rank, tile * tile, generator=gen, dtype=torch.float64) / tile
    return STLBasis(tile, rank, rand() * (row <= pivot[:, None]), rand(),
                    rand() * (row >= pivot[:, None]), name="random-causal")


def compile_config(device: torch.device) -> Any:
    import transformers

    config = transformers.CompileConfig(
        fullgraph=True, mode="reduce-overhead" if device.type == "cuda" else "default")
    config._compile_all_devices = True
    return config


def compiled_forward(model: Any, device: torch.device) -> Any:
    """``model.forward`` compiled once per model (static shapes: one graph for the prefill, one
    for the decode step; CUDA graphs on a GPU), the transformers "compile the forward" recipe
    that compiles the prefill too."""
    if "_bench_compiled_forward" not in model.__dict__:
        model.__dict__["_bench_compiled_forward"] = torch.compile(
            model.forward, fullgraph=True, dynamic=False,
            mode="reduce-overhead" if device.type == "cuda" else "default")
    return model.__dict__["_bench_compiled_forward"]


def generate(model: Any, ids: torch.Tensor, new: int, mode: str, device: torch.device) -> Any:
    """``mode``: "eager" (DynamicCache), "static" (StaticCache, eager), "compiled" (StaticCache,
    decode step compiled by transformers), "compiled-forward" (StaticCache, the whole forward
    compiled: :func:`compiled_forward`, so the prefill runs compiled as well)."""
    kwargs: dict[str, Any] = {}
    if mode != "eager":
        kwargs["cache_implementation"] = "static"
    if mode == "compiled":
        kwargs["compile_config"] = compile_config(device)
    else:
        kwargs["disable_compile"] = True
    if mode == "compiled-forward":
        model.forward = compiled_forward(model, device)
    try:
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                  min_new_tokens=new, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True, **kwargs)
    finally:
        model.__dict__.pop("forward", None)  # the class's forward again


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def first_mismatch(out: Any, ref: Any, prompt: int) -> dict[str, Any]:
    same = out.sequences == ref.sequences
    if bool(same.all()):
        return {"tokens_equal": True}
    step = int((~same[:, prompt:]).any(0).nonzero()[0])
    top = torch.stack(ref.logits)[step].float().topk(2, -1).values
    return {"tokens_equal": False, "first_mismatch_step": step,
            "dense_top2_margin_there": float((top[:, 0] - top[:, 1]).min()),
            "logits_rel_err_before": rel(torch.stack(out.logits[:step]).float(),
                                         torch.stack(ref.logits[:step]).float())
            if step else 0.0}


def check_exact(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    dense = build(args, device, torch.float32)
    model = copy.deepcopy(dense)
    outcome = convert(model, "naive")
    ids = torch.randint(2, args.vocab, (2, args.prompt), device=device)
    result: dict[str, Any] = {"converted": sum(v == "converted" for v in outcome.values())}
    modes = ["eager", "static"] + (["compiled"] if device.type == "cuda" or args.compile else [])
    for mode in modes:
        try:
            ref = generate(dense, ids, args.new_exact, mode, device)
            out = generate(model, ids, args.new_exact, mode, device)
            result[mode] = {**first_mismatch(out, ref, args.prompt),
                            "logits_rel_err": rel(torch.stack(out.logits).float(),
                                                  torch.stack(ref.logits).float())}
        except Exception as err:  # report and go on: the other modes still say something
            result[mode] = {"error": f"{type(err).__name__}: {err}",
                            "trace": traceback.format_exc(limit=6)}
        torch._dynamo.reset()
    return result


def check_rank24(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    result: dict[str, Any] = {}
    ids = torch.randint(2, args.vocab, (3, args.prompt + 1), device=device)  # a partial tile
    modes = [m for m in args.modes
             if m == "eager" or device.type == "cuda" or args.compile]
    for label, basis in (("fitted", "fitted"), ("random_causal", random_causal_basis())):
        model = build(args, device, torch.float32)
        convert(model, basis, 24 if isinstance(basis, str) else None)
        rows: dict[str, Any] = {}
        for mode in modes + ["no_state"]:
            try:
                if mode == "no_state":
                    generation.disable_incremental(model)
                out = generate(model, ids, args.new_exact, "eager" if mode == "no_state"
                               else mode, device)
                with torch.no_grad():
                    full = model(out.sequences, use_cache=False).logits
                steps = torch.stack(out.logits, 1)
                start = ids.shape[1] - 1
                rows[mode] = rel(steps, full[:, start:start + steps.shape[1]])
            except Exception as err:
                rows[mode] = {"error": f"{type(err).__name__}: {err}",
                              "trace": traceback.format_exc(limit=6)}
            torch._dynamo.reset()
        result[label] = {"incremental_vs_full_rel_err": rows, "pass": all(
            isinstance(v, float) and v < 1e-4 for k, v in rows.items() if k != "no_state")}
    return result


def timed_generate(model: Any, ids: torch.Tensor, new: int, mode: str,
                   device: torch.device) -> float:
    generate(model, ids, new, mode, device)  # warm-up (compiles, captures graphs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    generate(model, ids, new, mode, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def check_speed(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dense = build(args, device, dtype)
    model = copy.deepcopy(dense)
    convert(model, "fitted", 24)
    modes = [m for m in args.modes
             if m == "eager" or device.type == "cuda" or args.compile]
    result: dict[str, Any] = {"dtype": str(dtype), "prompt": args.prompt, "new": args.new}
    for batch in args.batches:
        ids = torch.randint(2, args.vocab, (batch, args.prompt), device=device)
        for mode in modes:
            row: dict[str, Any] = {}
            for label, m in (("dense", dense), ("stl_r24", model)):
                try:
                    total = timed_generate(m, ids, args.new, mode, device)
                    prefill = timed_generate(m, ids, 1, mode, device)
                    row[label] = {"s": total, "tokens_per_s": batch * args.new / total,
                                  "prefill_s": prefill,
                                  "decode_tokens_per_s": batch * (args.new - 1)
                                  / max(total - prefill, 1e-9)}
                except Exception as err:
                    row[label] = {"error": f"{type(err).__name__}: {err}",
                                  "trace": traceback.format_exc(limit=6)}
                torch._dynamo.reset()
            if all("tokens_per_s" in v for v in row.values()):
                row["stl_over_dense"] = (row["stl_r24"]["tokens_per_s"]
                                         / row["dense"]["tokens_per_s"])
            result[f"batch{batch}_{mode}"] = row
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("gpu_generation_check.py needs CUDA; use --smoke on CPU")
    device = torch.device("cpu" if args.smoke else "cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    import transformers

    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (smoke)",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "commit": os.environ.get("STL_COMMIT", "unknown"),
        "model": {k: getattr(args, k) for k in ("hidden", "layers", "heads", "kv_heads",
                                                "intermediate", "vocab", "init")}}
    for step, fn in (("exact", check_exact), ("rank24", check_rank24), ("speed", check_speed)):
        if step in args.skip:
            continue
        start = time.perf_counter()
        try:
            report[step] = fn(args, device)
        except Exception as err:
            report[step] = {"error": f"{type(err).__name__}: {err}",
                            "trace": traceback.format_exc()}
        report[step + "_s"] = round(time.perf_counter() - start, 1)
        print(json.dumps({step: report[step]}, default=str), flush=True)
    out = Path(args.out or os.environ.get("OUT") or "out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_generation.json").write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps(report, default=str))
    return report


if __name__ == "__main__":
    main()
