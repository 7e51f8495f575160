"""Issue 14, item 5: the char LM converted (B: convert + calibrate + distill) across ranks, with
causal token tiles beside the row-separable batch recipe.

    OMP_NUM_THREADS=1 .venv/bin/python tools/causal_char_lm_ranks.py --log \
        [--ranks 16 24 32 40 48] [--recipes causal batch] \
        [--out docs/results/causal_char_lm_ranks.json]
    .venv/bin/python tools/causal_char_lm_ranks.py --smoke --out /tmp/smoke.json   # seconds

Trains examples/char_lm.py's dense model (its seed, data, 1000 steps, lr 3e-3), then for each
rank and recipe converts a copy, calibrates it and distils it, and measures the held-out
perplexity after each stage (overall, and by tile row: the predictions made at positions
``a mod 4``). Both recipes run the same calibration data (the example's 8 training batches,
``calibrate(steps=2, teacher=dense, target="teacher")``) and the same distillation (the
example's recipe: the next ``steps // 10`` training batches, one step each, all parameters,
lr 1.2e-2 with 10% warmup, KL on the logits + each block's output MSE):

- ``causal``: ``row_grouping="causal"`` (a tile = 4 consecutive tokens of one sequence), the
  shipped causal basis ``bases.causal(4, r)``; calibration starts from it
  (``basis="converted"``).
- ``batch``: ``row_grouping="batch"`` (a tile = the same position of 4 sequences), the
  row-separable basis; calibration restarts from random row vectors
  (``basis="row_separable"``): examples/char_lm.py's recipe up to rank 40, here at every rank.

Calibration and distillation keep each layer causal / row-separable (``fit.support_masks``);
after distillation every layer's ``keeps_causality`` is recorded and, at ``--check-ranks``,
the model is checked by perturbing a token: in float64 no earlier logit of that sequence and
no logit of its batch-mates may change (bit for bit), in float32 by at most 1e-6 (relative
to the logits' scale). Writes the results, provenance and settings to ``--out`` (and, with
``--log``, the printed output to ``--out`` with ``.log``).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "examples"))
sys.path.insert(0, os.path.dirname(__file__))

from _common import commit, tee_to_log, train  # noqa: E402
from causal_char_lm import perplexity_by_row  # noqa: E402
from char_lm import (  # noqa: E402
    BATCH,
    CONTEXT,
    VOCAB,
    CharLM,
    batches,
    loss_fn,
    perplexity,
    split_text,
    validation_batches,
)

import stl_compiler as stl  # noqa: E402
from stl_compiler import bases  # noqa: E402
from stl_compiler.fit import calibrate, distill  # noqa: E402
from stl_compiler.fit.fitting import basis_pivots  # noqa: E402
from stl_compiler.tiling import row_separable  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("causal", "batch", "causal-rowsep")
GROUPING = {"causal": "causal", "batch": "batch", "causal-rowsep": "causal"}
#: Issue 14's targets: distilled perplexity within this fraction of dense, by rank.
TARGETS = {24: 0.10, 32: 0.05}
FULL = dict(ranks=[16, 24, 32, 40, 48], steps=1000, dim=64, depth=2, heads=4, calib_batches=8,
            calib_steps=2, lr=1.2e-2, val_batches=None,
            out="docs/results/causal_char_lm_ranks.json")
SMOKE = dict(ranks=[24], steps=40, dim=32, depth=1, heads=2, calib_batches=2, calib_steps=1,
             lr=3e-3, val_batches=2, out="/tmp/causal_char_lm_ranks_smoke.json")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=None)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    parser.add_argument("--steps", type=int, default=None, help="dense training steps")
    parser.add_argument("--distill-steps", type=int, default=None,
                        help="distillation steps (default: steps // 10)")
    parser.add_argument("--lr", type=float, default=None,
                        help="distillation peak lr (1.2e-2, examples/char_lm.py's)")
    parser.add_argument("--calib-steps", type=int, default=None, help="calibration rounds")
    parser.add_argument("--calib-batches", type=int, default=None)
    parser.add_argument("--val-batches", type=int, default=None,
                        help="held-out batches (default: all of examples/char_lm.py's)")
    parser.add_argument("--dim", type=int, default=None)
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--check-ranks", type=int, nargs="*", default=None,
                        help="ranks whose distilled models get the perturbation check "
                             "(default: every rank)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (a test of the code)")
    parser.add_argument("--out", default=None, help="JSON results file")
    parser.add_argument("--log", action="store_true", help="also write the output to OUT.log")
    args = parser.parse_args(argv)
    for key, value in (SMOKE if args.smoke else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.ranks = sorted(set(args.ranks))
    if args.check_ranks is None:
        args.check_ranks = args.ranks
    if args.distill_steps is None:
        args.distill_steps = max(args.steps // 10, 2)
    return args


def config(recipe: str, rank: int) -> stl.STLConfig:
    basis = bases.causal(4, rank) if recipe == "causal" else row_separable(4, rank)
    return stl.STLConfig(rank=rank, basis=basis, row_grouping=GROUPING[recipe],
                         max_cost_ratio=None)


def stl_layers(model: nn.Module) -> list[stl.STLLinear]:
    return [m for m in model.modules() if isinstance(m, stl.STLLinear)]


@torch.no_grad()
def perturbation_check(model: nn.Module, tokens: torch.Tensor, position: int) -> dict:
    """Change token ``position`` of sequence 0 of ``tokens`` (``(8, S)``); in float64 and float32:
    the largest change of the logits at earlier positions of sequence 0 and of the other
    sequences (must be 0 / tiny), and of the later positions of sequence 0 (must not be 0)."""
    later = tokens.clone()
    later[0, position] = (later[0, position] + 1) % VOCAB
    result = {"position": position}
    for dtype, name in ((torch.float64, "float64"), (torch.float32, "float32")):
        copy_ = copy.deepcopy(model).to(dtype).eval()
        a, b = copy_(tokens), copy_(later)
        scale = float(a.abs().max())
        result[name] = {"earlier": float((a[0, :position] - b[0, :position]).abs().max()),
                        "batch_mates": float((a[1:] - b[1:]).abs().max()),
                        "later": float((a[0, position:] - b[0, position:]).abs().max()),
                        "logit_scale": scale}
    f64, f32 = result["float64"], result["float32"]
    result["causal"] = (f64["earlier"] == 0 and f64["batch_mates"] == 0 and f64["later"] > 0
                        and f32["earlier"] <= 1e-6 * f32["logit_scale"]
                        and f32["batch_mates"] <= 1e-6 * f32["logit_scale"])
    return result


def cross_row_share(layers: list[stl.STLLinear]) -> float:
    """How much the product terms mix tile rows: the share of the squared entries of every
    term's ``ex`` and ``d`` row vector that lies outside that vector's largest tile row,
    pooled over ``layers`` (0 for a row-separable basis)."""
    outside = total = 0.0
    with torch.no_grad():
        for layer in layers:
            for m in (layer.ex, layer.d):
                energy = m.detach().double().square().reshape(m.shape[0], layer.tile, -1).sum(-1)
                outside += float(energy.sum() - energy.amax(1).sum())
                total += float(energy.sum())
    return round(max(outside / total, 0.0), 4)


def evaluate(model: nn.Module, val: tuple[torch.Tensor, ...]) -> dict:
    return {"ppl": perplexity(model, val), "by_row": perplexity_by_row(model, val)}


def run_recipe(recipe: str, rank: int, dense: nn.Module, args: argparse.Namespace, data: dict,
               blocks: list[str]) -> dict:
    """Convert, calibrate, distil one copy of ``dense``; perplexity after each stage."""
    times, start = {}, time.perf_counter()
    student, cfg = copy.deepcopy(dense), config(recipe, rank)
    stl.swap_linears_(student, cfg, keep_reference=True)
    layers = stl_layers(student)
    row = {"recipe": recipe, "rank": rank, "grouping": GROUPING[recipe],
           "basis": f"bases.causal(4, {rank})" if recipe == "causal"
           else f"row_separable(4, {rank})", "layers": len(layers),
           "terms_per_pivot_row": [basis_pivots(cfg.basis).count(a) for a in range(4)]
           if recipe == "causal" else [rank // 4] * 4}
    start_basis = "converted" if recipe == "causal" else "row_separable"
    row["calibration_start"] = start_basis
    row["cross_row_share"] = {"converted": cross_row_share(layers)}
    row["converted"] = evaluate(student, data["val"])
    times["convert"] = time.perf_counter() - start
    start = time.perf_counter()
    table = calibrate(student, data["calib"], steps=args.calib_steps, teacher=dense,
                      target="teacher", basis=start_basis, seed=args.seed, progress=False)
    times["calibrate"] = time.perf_counter() - start
    row["calibrated"] = evaluate(student, data["val"])
    row["calibration"] = [{k: (round(v, 4) if isinstance(v, float) else v)
                           for k, v in r.items() if k != "rank"} for r in table.rows]
    start = time.perf_counter()
    curve = distill(student, dense, data["distill"], steps=args.distill_steps, lr=args.lr,
                    params="all", warmup=args.distill_steps // 10, features=blocks,
                    progress=False)
    times["distill"] = time.perf_counter() - start
    row["distilled"] = evaluate(student, data["val"])
    row["distill_loss_first_last"] = [round(curve[0], 4), round(curve[-1], 4)]
    row["keeps_causality"] = all(m.keeps_causality for m in layers)
    row["cross_row_share"]["distilled"] = cross_row_share(layers)
    if rank in args.check_ranks:
        tokens = data["val"][0][:8, :-1]
        row["perturbation_check"] = perturbation_check(student, tokens,
                                                       min(37, tokens.shape[1] - 2))
    row["seconds"] = {k: round(v, 1) for k, v in times.items()}
    ratio = row["distilled"]["ppl"] / data["dense_ppl"]
    row["distilled_vs_dense"] = round(ratio, 4)
    check = row.get("perturbation_check", {}).get("causal", "-")
    print(f"{recipe:>13} r={rank:<2}  converted {row['converted']['ppl']:8.3f}  calibrated "
          f"{row['calibrated']['ppl']:7.3f}  distilled {row['distilled']['ppl']:6.3f} "
          f"(x{ratio:.3f})  by row {row['distilled']['by_row']}  keeps causality "
          f"{row['keeps_causality']}  perturbation check {check}  "
          f"({', '.join(f'{k} {v:.0f}s' for k, v in times.items())})", flush=True)
    return row


def targets(rows: list[dict], dense_ppl: float) -> list[dict]:
    out = []
    for row in rows:
        if row["rank"] in TARGETS:
            limit = TARGETS[row["rank"]]
            ratio = row["distilled"]["ppl"] / dense_ppl
            out.append({"recipe": row["recipe"], "rank": row["rank"],
                        "target": f"within {limit:.0%} of dense ({dense_ppl * (1 + limit):.3f})",
                        "distilled": round(row["distilled"]["ppl"], 3),
                        "over_dense": f"{ratio - 1:+.1%}", "met": ratio <= 1 + limit,
                        "missed_by": None if ratio <= 1 + limit
                        else f"{ratio - 1 - limit:.1%} of dense "
                             f"({row['distilled']['ppl'] - dense_ppl * (1 + limit):.3f})"})
    return out


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    wall = time.perf_counter()
    result = {"command": " ".join(shlex.quote(a) for a in
                                  ["OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", ""),
                                   ".venv/bin/python", *sys.argv]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "commit": commit(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "settings": {k: v for k, v in vars(args).items() if k not in ("out", "log")}}
    result["settings"].update(
        context=CONTEXT, batch=BATCH, dense_lr=3e-3, distill_warmup=args.distill_steps // 10,
        distill_params="all", distill_features="every block's output (MSE) + logits (KL)",
        distill_budget=f"{args.distill_steps} steps of batch {BATCH} = "
                       f"{args.distill_steps / args.steps:.0%} of the dense training steps",
        calibrate=f"steps={args.calib_steps}, teacher=dense, target='teacher', "
                  f"basis='converted' (causal) / 'row_separable' (batch), "
                  f"{args.calib_batches} batches")
    print(f"commit {result['commit']} | torch {torch.__version__} | {result['command']}",
          flush=True)
    train_text, val_text = split_text()
    val = validation_batches(val_text)[: args.val_batches]
    torch.manual_seed(args.seed)
    dense = CharLM(args.dim, args.depth, args.heads)
    seconds = train(dense, batches(train_text, args.seed), loss_fn, args.steps, lr=3e-3)
    dense_ppl = perplexity(dense, val)
    result.update(dense={"ppl": dense_ppl, "by_row": perplexity_by_row(dense, val),
                         "train_s": round(seconds, 1), "steps": args.steps},
                  held_out={"windows": sum(len(b) for b in val), "tokens_predicted":
                            sum(b[:, 1:].numel() for b in val)})
    print(f"dense: perplexity {dense_ppl:.3f} by row {result['dense']['by_row']} "
          f"({seconds:.0f}s, {args.steps} steps)", flush=True)
    stream = batches(train_text, args.seed + 1)  # the example's calibration, then distillation
    data = {"val": val, "dense_ppl": dense_ppl,
            "calib": [next(stream)[:, :-1] for _ in range(args.calib_batches)]}
    data["distill"] = [next(stream)[:, :-1] for _ in range(args.distill_steps)]
    blocks = [f"blocks.{name}" for name, _ in dense.blocks.named_children()]
    rows = []
    for rank in args.ranks:
        for recipe in args.recipes:
            rows.append(run_recipe(recipe, rank, dense, args, data, blocks))
    result["rows"] = rows
    result["targets"] = targets(rows, dense_ppl)
    result["wall_s"] = round(time.perf_counter() - wall, 1)
    print(f"\nheld-out perplexity, dense {dense_ppl:.3f}; distillation {args.distill_steps} "
          f"steps ({args.distill_steps / args.steps:.0%} of the dense training steps)")
    print(f"{'rank':>4} {'recipe':>13} {'converted':>10} {'calibrated':>11} {'distilled':>10} "
          f"{'x dense':>8}")
    for row in rows:
        print(f"{row['rank']:>4} {row['recipe']:>13} {row['converted']['ppl']:>10.3f} "
              f"{row['calibrated']['ppl']:>11.3f} {row['distilled']['ppl']:>10.3f} "
              f"{row['distilled_vs_dense']:>8.3f}")
    for t in result["targets"]:
        print(f"target r={t['rank']} {t['recipe']}: {t['target']}: {t['distilled']} "
              f"({t['over_dense']}) -> {'met' if t['met'] else 'MISSED by ' + t['missed_by']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=1)
        handle.write("\n")
    print(f"wrote {args.out}" + (" (and .log)" if args.log else "") +
          f" in {result['wall_s']:.0f}s", flush=True)
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with tee_to_log(Path(args.out).with_suffix(".log") if args.log else None):
        return run(args)


if __name__ == "__main__":
    main()
