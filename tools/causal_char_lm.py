"""Causal token bases on a real causal model: the character LM of examples/char_lm.py.

    .venv/bin/python tools/causal_char_lm.py [--ranks 24] [--rhos 0.5 0.9] \
        [--json docs/results/causal_char_lm.json]

Trains the dense model (1000 steps, as the example), measures how alike neighbouring tokens
are at the input of every linear layer (uncentered lag-k correlation
``E[x_i · x_{i+k}] / E[|x|²]``, over positions of one sequence), then converts it with
``row_grouping="causal"`` (tiles of 4 consecutive tokens) at each rank with: the
row-separable basis, the shipped ``bases.causal`` basis when there is one, and causal bases
fitted to ``token_moments(4, rho)`` for each ``rho`` (as shipped: restarts 4, 500 sweeps), with
the default ``min_row_terms`` and with 0 (the pivot search may then leave a row without terms
of its own). For each: validation perplexity of the plain conversion and after
``calibrate(steps=2, teacher=dense)`` on 8 training batches, overall and by tile row (the
predictions made at positions ``a mod 4``); about 2 min per basis. With distillation, across
ranks and beside the batch recipe: tools/causal_char_lm_ranks.py.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "examples"))

from char_lm import (  # noqa: E402
    CharLM,
    batches,
    loss_fn,
    perplexity,
    split_text,
    validation_batches,
)

import stl_compiler as stl  # noqa: E402
from stl_compiler import bases  # noqa: E402
from stl_compiler.fit import calibrate, fit_basis  # noqa: E402
from stl_compiler.fit.alpha import token_moments  # noqa: E402
from stl_compiler.fit.fitting import basis_pivots  # noqa: E402
from stl_compiler.tiling import row_separable  # noqa: E402


def lag_correlations(model: nn.Module, batch: torch.Tensor, lags: int = 3) -> dict:
    """Per linear layer: uncentered correlation of its input at lags 1..``lags``."""
    out, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            def hook(_m, args, _o, name=name):
                x = args[0].double()  # (B, S, K)
                energy = float(x.square().sum(-1).mean())
                out[name] = [round(float((x[:, k:] * x[:, :-k]).sum(-1).mean()) / energy, 3)
                             for k in range(1, lags + 1)]
            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(batch)
    for h in hooks:
        h.remove()
    return out


@torch.no_grad()
def perplexity_by_row(model: nn.Module, val: tuple[torch.Tensor, ...]) -> list[float]:
    """Validation perplexity of the predictions made at positions ``a mod 4`` (tile row a),
    for a = 0..3."""
    total, count = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    for batch in val:
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                               reduction="none").view(batch.shape[0], -1).double()
        for a in range(4):
            total[a] += loss[:, a::4].sum()
            count[a] += loss[:, a::4].numel()
    return [round(math.exp(float(t / c)), 3) for t, c in zip(total, count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[24])
    parser.add_argument("--rhos", type=float, nargs="+", default=[0.5, 0.9])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    train_text, val_text = split_text()
    val = validation_batches(val_text)
    torch.manual_seed(0)
    dense = CharLM()
    stream = batches(train_text, 0)
    start = time.perf_counter()
    opt = torch.optim.AdamW(dense.parameters(), 3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=args.steps,
                                                pct_start=0.1)
    dense.train()
    for _ in range(args.steps):
        loss = loss_fn(dense, next(stream))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    dense.eval()
    result = {"dense": perplexity(dense, val), "train_s": time.perf_counter() - start}
    calib_stream = batches(train_text, 1)
    calib = [next(calib_stream)[:, :-1] for _ in range(8)]
    result["lag_correlation"] = lag_correlations(dense, calib[0])
    print(json.dumps(result), flush=True)
    result["ranks"] = {}
    for rank in args.ranks:
        candidates = {"row_separable": row_separable(4, rank)}
        if rank in bases.causal_ranks(4):
            candidates["shipped causal"] = bases.causal(4, rank)
        for rho in args.rhos:
            for least, label in ((None, ""), (0, ", min_row_terms=0")):
                basis = fit_basis(4, rank, data=token_moments(4, rho), support="causal",
                                  restarts=4, steps=500, min_row_terms=least)[0]
                if not any(all(torch.equal(a, b) for a, b in zip(basis.matrices, c.matrices))
                           for c in candidates.values()):  # the shipped one is not fitted twice
                    candidates[f"causal rho={rho}{label}"] = basis
        rows = {}
        for label, basis in candidates.items():
            config = stl.STLConfig(rank=rank, basis=basis, row_grouping="causal",
                                   max_cost_ratio=None)
            student = copy.deepcopy(dense)
            stl.swap_linears_(student, config, keep_reference=True)
            plain, plain_rows = perplexity(student, val), perplexity_by_row(student, val)
            calibrate(student, calib, steps=2, teacher=dense, progress=False)
            rows[label] = {"plain": plain, "calibrated": perplexity(student, val),
                           "plain_by_row": plain_rows,
                           "calibrated_by_row": perplexity_by_row(student, val),
                           "terms_per_pivot_row": [basis_pivots(basis).count(a)
                                                   for a in range(4)],
                           "causal": all(stl.tiling.is_causal(m) for m in student.modules()
                                         if isinstance(m, stl.STLLinear))}
            print(rank, label, json.dumps(rows[label]), flush=True)
        result["ranks"][str(rank)] = rows
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)
            handle.write("\n")


if __name__ == "__main__":
    main()
