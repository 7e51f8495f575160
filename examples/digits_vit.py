"""A small vision transformer on scikit-learn's 8×8 digits: dense vs STL (class 1 and converted).

    .venv/bin/python examples/digits_vit.py [--ranks 16 24 32 40 49] [--steps 600]

(A) train from scratch with every linear layer an STL layer (encoders/decoders trained too);
(B) convert the trained dense model: plain encoding with the fitted basis, + calibration on
256 training images, + distillation from the dense model with 10% of the training steps.
Prints test accuracy (%) per rank and writes examples/digits_vit.json.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from _common import Block, compare_ranks, parse_args, report, train
from sklearn.datasets import load_digits
from torch import nn


class DigitsViT(nn.Module):
    """2×2 patches (16 tokens of 4 pixels), 2 blocks of width 64, mean-pooled head."""

    def __init__(self, dim: int = 64, depth: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(4, dim)                      # stays dense: in_features < 16
        self.pos = nn.Parameter(torch.randn(16, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, 2) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)  # head: out < 16, dense

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = images.view(-1, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(-1, 16, 4)
        x = self.blocks(self.embed(patches) + self.pos)
        return self.head(self.norm(x).mean(dim=1))


def main() -> None:
    args = parse_args(__doc__, "examples/digits_vit.json")
    steps = args.steps or 600
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train_idx, test_idx = perm[:1347], perm[1347:]

    def batches(seed: int = args.seed):
        gen = torch.Generator().manual_seed(seed)
        while True:
            idx = train_idx[torch.randint(len(train_idx), (128,), generator=gen)]
            yield images[idx], labels[idx]

    def loss_fn(model, batch):
        return F.cross_entropy(model(batch[0]), batch[1])

    @torch.no_grad()
    def accuracy(model):
        model.eval()
        pred = model(images[test_idx]).argmax(-1)
        return 100.0 * float((pred == labels[test_idx]).float().mean())

    torch.manual_seed(args.seed)
    init = DigitsViT()
    dense = copy.deepcopy(init)
    seconds = train(dense, batches(), loss_fn, steps, lr=3e-3)
    dense_acc = accuracy(dense)
    print(f"dense: {dense_acc:.2f}% ({seconds:.0f}s, {steps} steps)", flush=True)
    calib = [images[train_idx[i:i + 64]] for i in range(0, 256, 64)]
    distill_steps = steps // 10
    stream = batches(args.seed + 1)
    distill_batches = [next(stream)[0] for _ in range(distill_steps)]
    results = compare_ranks(args.ranks, init, dense, "tokens", batches, loss_fn, steps, calib,
                            distill_batches, accuracy, ".2f", jobs=args.jobs)
    report("digits ViT, test accuracy", "accuracy %", dense_acc, results, args.out,
           {"steps": steps, "distill_steps": distill_steps, "seed": args.seed})


if __name__ == "__main__":
    main()
