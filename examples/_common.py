"""Shared helpers of the accuracy examples: conversion variants, training loop, tables."""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

import stl_compiler as stl
from stl_compiler.fit import calibrate, distill


class Block(nn.Module):
    """Pre-norm transformer block (fused QKV, SDPA attention, GELU MLP) of both examples."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, causal: bool = False) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, s, dim))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))

RANKS = (16, 24, 32, 40, 49)


def parse_args(doc: str, out: str, ranks: tuple[int, ...] = RANKS) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=list(ranks))
    parser.add_argument("--steps", type=int, default=None, help="training steps (dense and A)")
    parser.add_argument("--out", default=out, help="JSON results file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1,
                        help="ranks run in parallel processes (one thread each)")
    args = parser.parse_args()
    args.ranks = sorted(set(args.ranks))
    torch.set_num_threads(1)
    return args


#: The exact row of each grouping: Strassen's rank-49 basis mixes the rows of a tile, so with
#: "batch" (rows are different sequences) the exact basis is the row-separable naive one.
EXACT = {"tokens": ("strassen", 49), "batch": ("naive", 64)}


def config(rank: int, row_grouping: str) -> stl.STLConfig:
    """The fitted basis below the grouping's exact rank (:data:`EXACT`), the exact basis at it
    (with "batch", "fitted" is the row-separable basis of the rank). The cost guard is off:
    the examples measure accuracy at every rank, on layers too narrow for STL to save FLOPs."""
    name, exact = EXACT[row_grouping]
    return stl.STLConfig(rank=rank, basis=name if rank == exact else "fitted",
                         row_grouping=row_grouping, max_cost_ratio=None)


def to_stl(model: nn.Module, rank: int, row_grouping: str, keep_reference: bool = False
           ) -> nn.Module:
    """A converted deep copy of ``model`` (every nn.Linear with in/out >= 16)."""
    student = copy.deepcopy(model)
    stl.swap_linears_(student, config(rank, row_grouping), keep_reference=keep_reference)
    return student


def train(model: nn.Module, batches: Iterator, loss_fn: Callable, steps: int, lr: float
          ) -> float:
    """AdamW with a cosine schedule; returns seconds spent."""
    start = time.perf_counter()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(steps):
        loss = loss_fn(model, next(batches))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return time.perf_counter() - start


def convert_variants(dense: nn.Module, rank: int, row_grouping: str, calib: list,
                     distill_batches: list, distill_steps: int, evaluate: Callable,
                     lr: float, calib_options: dict | None = None,
                     distill_options: dict | None = None) -> dict:
    """(B): plain encoding, + calibration, + distillation (from the calibrated model).

    ``calib_options`` / ``distill_options``: extra keyword arguments of :func:`calibrate`
    (``steps=2`` unless given; the dense model is the teacher) and :func:`distill`."""
    plain = to_stl(dense, rank, row_grouping)
    result = {"plain": evaluate(plain)}
    calibrated = to_stl(dense, rank, row_grouping, keep_reference=True)
    table = calibrate(calibrated, calib, **{"steps": 2, "teacher": dense, "progress": False,
                                            **(calib_options or {})})
    result["calibrated"] = evaluate(calibrated)
    result["calibration"] = table.rows
    distill(calibrated, dense, distill_batches, steps=distill_steps,
            **{"lr": lr, "progress": False, **(distill_options or {})})
    result["distilled"] = evaluate(calibrated)
    return result


def compare_ranks(ranks: list[int], init: nn.Module, dense: nn.Module, row_grouping: str,
                  batches: Callable[[], Iterator], loss_fn: Callable, steps: int, calib: list,
                  distill_batches: list, metric: Callable[[nn.Module], float], fmt: str,
                  recipe: Callable[[int], tuple[dict, dict]] | None = None, jobs: int = 1
                  ) -> dict:
    """Per rank: (A) train from scratch with STL, (B) convert ``dense`` plain, + calibration,
    + distillation; ``metric`` of each, printed as it goes. ``recipe(rank)``: the
    ``(calib_options, distill_options)`` of :func:`convert_variants` at that rank (default:
    ``calibrate(steps=2)``, ``distill(lr=2e-4)`` on the STL parameters). ``jobs > 1`` runs
    the ranks in that many forked processes; every rank starts from the same random state,
    so a rank's numbers do not depend on ``jobs`` or on the other ranks."""
    rng_state = torch.get_rng_state()

    def one_rank(rank: int) -> dict:
        torch.set_rng_state(rng_state)
        scratch = to_stl(init, rank, row_grouping)
        train(scratch, batches(), loss_fn, steps, lr=3e-3)
        row = {"scratch": metric(scratch)}
        calib_options, distill_options = recipe(rank) if recipe else ({}, {})
        row.update(convert_variants(dense, rank, row_grouping, calib, distill_batches,
                                    len(distill_batches), metric, 2e-4, calib_options,
                                    distill_options))
        print(f"rank {rank}: " + ", ".join(f"{k}={v:{fmt}}" for k, v in row.items()
                                          if isinstance(v, float)), flush=True)
        return row

    if jobs <= 1:
        return {rank: one_rank(rank) for rank in ranks}
    global _RANK_JOB
    _RANK_JOB = one_rank  # forked workers inherit it; closures do not pickle
    with multiprocessing.get_context("fork").Pool(min(jobs, len(ranks))) as pool:
        rows = pool.map(_run_rank_job, ranks, chunksize=1)
    return dict(zip(ranks, rows))


_RANK_JOB: Callable[[int], dict] | None = None


def _run_rank_job(rank: int) -> dict:
    return _RANK_JOB(rank)


def report(title: str, metric: str, dense: float, results: dict, path: str, extra: dict
           ) -> None:
    """Print the (A)/(B) table and write everything to ``path``."""
    print(f"\n{title} ({metric}); dense: {dense:.4g}")
    print(f"{'rank':>5} {'A: scratch':>11} {'B: plain':>9} {'B: +calib':>10} "
          f"{'B: +distill':>12}")
    for rank, row in results.items():
        print(f"{rank:>5} {row['scratch']:>11.4g} {row['plain']:>9.4g} "
              f"{row['calibrated']:>10.4g} {row['distilled']:>12.4g}")
    with open(path, "w") as handle:
        json.dump({"metric": metric, "dense": dense, "ranks": results, **extra}, handle,
                  indent=1)
    print(f"wrote {path}")
