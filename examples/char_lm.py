"""A character-level causal LM on Python's standard library sources: dense vs STL.

    .venv/bin/python examples/char_lm.py [--ranks 16 24 32 40 44 48 64] [--steps 1000] [--jobs 7]

Every STL layer uses ``row_grouping="batch"``: a tile's rows are the same position of 4
different sequences, so no token ever sees another position of its own sequence (with
"tokens" an inexact basis would leak future characters into the prediction). "batch" needs a
row-separable basis (no product term mixes the 4 sequences of a tile): "fitted" is then
``stl_compiler.tiling.row_separable(4, rank)`` (ranks multiple of 4), and the exact row is the
naive basis (rank 64; Strassen's rank 49 mixes rows). Calibration and distillation keep the
layers row-separable.
(A) train from scratch with STL; (B) convert the trained dense model: plain encoding,
+ calibration on 8 training batches, + distillation with 10% of the training steps.
Conversion recipe (tools/char_lm_experiments.py measured it, when "fitted" was still the general
fitted basis at ranks 44-48): up to rank 40 the calibration restarts every layer from
``stl_compiler.fit.row_separable_basis`` (random row vectors) and fits each layer to the dense
model's own activations; ranks 44-48 start from the converted basis. Distillation trains all
parameters (lr 1.2e-2 up to rank 40, 1e-3 above, 10 warmup steps) on the logits' KL plus each
block's output MSE; rank 64 (exact) keeps the plain STL-only recipe.
Prints validation perplexity per rank and writes examples/char_lm.json. ``--bf16-cuda`` adds
a table of the same models evaluated in bf16 on the CUDA device.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from _common import (  # noqa: F401  (FILES, load_text: the corpus, re-exported for tools/)
    EXACT,
    FILES,
    VOCAB,
    Block,
    bf16_cuda,
    compare_ranks,
    load_text,
    parse_args,
    report,
    split_text,
    train,
)
from torch import nn

CONTEXT, BATCH = 64, 32


class CharLM(nn.Module):
    def __init__(self, dim: int = 64, depth: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.pos = nn.Parameter(torch.randn(CONTEXT, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, 4, causal=True) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        return self.head(self.norm(self.blocks(x)))


def recipe(rank: int, blocks: list[str], warmup: int) -> tuple[dict, dict]:
    """(calibrate, distill) keyword arguments of the conversion (B) at ``rank``; ``blocks``:
    the transformer blocks' names, whose outputs distillation matches too; ``warmup``:
    distillation warmup steps (10% of them)."""
    if rank % 4 == 0 and rank <= 40:
        return ({"basis": "row_separable", "target": "teacher"},
                {"params": "all", "lr": 1.2e-2, "warmup": warmup, "features": blocks})
    if rank < EXACT["batch"][1]:
        return {}, {"params": "all", "lr": 1e-3, "warmup": warmup, "features": blocks}
    return {}, {}


def batches(train_text: torch.Tensor, seed: int) -> Iterator[torch.Tensor]:
    """Random training windows of ``CONTEXT + 1`` characters, ``BATCH`` at a time."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        start = torch.randint(len(train_text) - CONTEXT - 1, (BATCH,), generator=gen)
        yield torch.stack([train_text[s:s + CONTEXT + 1] for s in start.tolist()])


def loss_fn(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Next-character cross-entropy."""
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))


def validation_batches(val_text: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """32 batches of consecutive, non-overlapping validation windows."""
    starts = torch.arange(0, len(val_text) - CONTEXT - 1, CONTEXT)[: 32 * BATCH]
    return torch.stack([val_text[s:s + CONTEXT + 1] for s in starts.tolist()]).split(BATCH)


@torch.no_grad()
def perplexity(model: nn.Module, val: tuple[torch.Tensor, ...]) -> float:
    model.eval()
    return math.exp(sum(float(loss_fn(model, b)) for b in val) / len(val))


def main() -> None:
    args = parse_args(__doc__, "examples/char_lm.json", (16, 24, 32, 40, 44, 48, 64))
    steps = args.steps or 1000
    train_text, val_text = split_text()
    val = validation_batches(val_text)

    def train_batches(seed: int = args.seed) -> Iterator[torch.Tensor]:
        return batches(train_text, seed)

    def metric(model: nn.Module) -> float:
        return perplexity(model, val)

    torch.manual_seed(args.seed)
    init = CharLM()
    dense = copy.deepcopy(init)
    seconds = train(dense, train_batches(), loss_fn, steps, lr=3e-3)
    dense_ppl = metric(dense)
    extra_metrics = {"bf16_cuda": bf16_cuda(metric)} if args.bf16_cuda else {}
    print(f"dense: perplexity {dense_ppl:.3f} ({seconds:.0f}s, {steps} steps, "
          f"{len(train_text)} train / {len(val_text)} val chars)", flush=True)
    stream = train_batches(args.seed + 1)
    calib = [next(stream)[:, :-1] for _ in range(8)]
    distill_steps = steps // 10
    distill_batches = [next(stream)[:, :-1] for _ in range(distill_steps)]
    blocks = [f"blocks.{name}" for name, _ in dense.blocks.named_children()]
    recipes = {rank: recipe(rank, blocks, distill_steps // 10) for rank in args.ranks}
    results = compare_ranks(args.ranks, init, dense, "batch", train_batches, loss_fn, steps,
                            calib, distill_batches, metric, ".3f", recipes.get, args.jobs,
                            extra_metrics)
    # after the ranks: their worker processes are forked, which needs CUDA untouched until then
    dense_extra = {name: fn(dense) for name, fn in extra_metrics.items()}
    report("char LM, validation perplexity (row_grouping='batch')", "perplexity", dense_ppl,
           results, args.out, {"steps": steps, "distill_steps": distill_steps,
                               "seed": args.seed, "files": FILES,
                               "recipe": recipes}, dense_extra)


if __name__ == "__main__":
    main()
