"""The digits ViT of ``make demo`` and ``examples/digits_vit.py``: scikit-learn's 8×8 digits, a
small vision transformer, its training loop and test accuracy.

Public (not a private helper of the demo) so that ``python -m stl_compiler.demo`` runs from an
installed package and the examples can rely on it: they import the same pieces
(``examples/_common.py`` re-exports :class:`Block` and :func:`train`). Needs scikit-learn for
the data (:func:`load`); nothing is downloaded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Block", "DigitsViT", "Digits", "load", "loss_fn", "train"]


class Block(nn.Module):
    """Pre-norm transformer block (fused QKV, SDPA attention, GELU MLP) of the examples."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, causal: bool = False) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, s, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, s, dim))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class DigitsViT(nn.Module):
    """2×2 patches (16 tokens of 4 pixels), 2 blocks of width 64, mean-pooled head."""

    def __init__(self, dim: int = 64, depth: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(4, dim)                      # stays dense: in_features < 16
        self.pos = nn.Parameter(torch.randn(16, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, 2) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)  # head: out < 16, dense

    def forward(self, images: Tensor) -> Tensor:
        patches = images.view(-1, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(-1, 16, 4)
        x = self.blocks(self.embed(patches) + self.pos)
        return self.head(self.norm(x).mean(dim=1))


@dataclass(frozen=True)
class Digits:
    """The 1797 images (``(N, 8, 8)`` floats in [0, 1]) and labels, split 1347 train / 450
    test by a fixed permutation (seed 0)."""

    images: Tensor
    labels: Tensor
    train_idx: Tensor
    test_idx: Tensor

    def batches(self, seed: int = 0, size: int = 128) -> Iterator[tuple[Tensor, Tensor]]:
        """An endless stream of ``(images, labels)`` training batches drawn with replacement
        by a generator seeded with ``seed``."""
        gen = torch.Generator().manual_seed(seed)
        while True:
            idx = self.train_idx[torch.randint(len(self.train_idx), (size,), generator=gen)]
            yield self.images[idx], self.labels[idx]

    def calibration(self, count: int = 256, size: int = 64) -> list[Tensor]:
        """The first ``count`` training images in batches of ``size`` (calibration inputs)."""
        return [self.images[self.train_idx[i:i + size]] for i in range(0, count, size)]

    def test_images(self) -> Tensor:
        return self.images[self.test_idx]

    def accuracy_of(self, logits: Tensor) -> float:
        """Test accuracy (%) of logits ``(450, 10)`` computed on :meth:`test_images`."""
        pred = torch.as_tensor(logits).argmax(-1)
        return 100.0 * float((pred == self.labels[self.test_idx]).float().mean())

    @torch.no_grad()
    def accuracy(self, model: Callable[[Tensor], Tensor]) -> float:
        """Test accuracy (%) of ``model`` (an nn.Module is put in eval mode first; the output
        of ``stl_compile`` is left as it is: it was captured in eval mode)."""
        if isinstance(model, nn.Module) and getattr(model, "stl_report", None) is None:
            model.eval()
        return self.accuracy_of(model(self.test_images()))


def load() -> Digits:
    """scikit-learn's digits, scaled to [0, 1], with the fixed train / test split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError("the digits data comes with scikit-learn: pip install scikit-learn"
                          ) from err
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    return Digits(images, labels, perm[:1347], perm[1347:])


def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Cross-entropy of ``model`` on an ``(images, labels)`` batch."""
    return F.cross_entropy(model(batch[0]), batch[1])


def train(model: nn.Module, batches: Iterator, loss_fn: Callable, steps: int, lr: float
          ) -> float:
    """AdamW with a one-cycle (cosine) schedule; returns seconds spent."""
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
