"""Small reference models built in code (no downloads), used by the demo, tests, examples and
benchmarks: an MLP, a ViT-style encoder and a Llama-style decoder. Plain modules, no tricks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MLP", "ViTEncoder", "DecoderLM"]


class MLP(nn.Module):
    """Linear → act → Linear → … with the given widths and activations (one per hidden)."""

    def __init__(self, widths: list[int], activations: list[str] | None = None) -> None:
        super().__init__()
        acts = activations or ["gelu"] * (len(widths) - 2)
        if len(acts) != len(widths) - 2:
            raise ValueError(f"need {len(widths) - 2} activations, got {len(acts)}")
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.activations = acts

    def forward(self, x: Tensor) -> Tensor:
        for layer, act in zip(self.layers[:-1], self.activations):
            x = getattr(F, act)(layer(x))
        return self.layers[-1](x)


class Attention(nn.Module):
    """Multi-head self-attention with explicit QKᵀ and AV matmuls (or SDPA)."""

    def __init__(self, dim: int, heads: int, *, causal: bool = False, use_sdpa: bool = False,
                 kv_heads: int | None = None, bias: bool = True) -> None:
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads or heads
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim, bias=bias)
        self.k = nn.Linear(dim, self.kv_heads * self.head_dim, bias=bias)
        self.v = nn.Linear(dim, self.kv_heads * self.head_dim, bias=bias)
        self.out = nn.Linear(dim, dim, bias=bias)
        self.causal, self.use_sdpa = causal, use_sdpa

    def forward(self, x: Tensor) -> Tensor:
        batch, seq, dim = x.shape
        split = lambda t, h: t.reshape(batch, seq, h, self.head_dim).transpose(1, 2)
        q = split(self.q(x), self.heads)
        k, v = split(self.k(x), self.kv_heads), split(self.v(x), self.kv_heads)
        if self.use_sdpa:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal,
                                               enable_gqa=self.kv_heads != self.heads)
        else:
            groups = self.heads // self.kv_heads
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
            scores = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5
            if self.causal:
                keep = torch.ones(seq, seq, dtype=torch.bool, device=x.device).tril()
                scores = scores.masked_fill(~keep, float("-inf"))
            o = scores.softmax(-1) @ v
        return self.out(o.transpose(1, 2).reshape(batch, seq, dim))


class EncoderBlock(nn.Module):
    """Transformer encoder block: attention and a GELU MLP, each with a residual and a
    LayerNorm; pre-norm (ViT, DiT) by default, post-norm (BERT) with ``norm_first=False``."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, *, norm_first: bool = True) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.fc1, self.fc2 = nn.Linear(dim, mlp_dim), nn.Linear(mlp_dim, dim)
        self.norm_first = norm_first

    def mlp(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))

    def forward(self, x: Tensor) -> Tensor:
        if self.norm_first:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x))
        return self.norm2(x + self.mlp(x))


class ViTEncoder(nn.Module):
    """ViT-style classifier: linear patch embedding, pre-norm blocks, mean-pooled head.

    Input ``(B, C, H, W)`` images; patches are flattened and embedded by a Linear, so every
    matmul of the model is a Linear or an attention matmul.
    """

    def __init__(self, image_size: int = 32, patch: int = 4, channels: int = 3, dim: int = 64,
                 depth: int = 2, heads: int = 4, mlp_dim: int = 128, classes: int = 10) -> None:
        super().__init__()
        self.patch = patch
        tokens = (image_size // patch) ** 2
        self.embed = nn.Linear(channels * patch * patch, dim)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(EncoderBlock(dim, heads, mlp_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, images: Tensor) -> Tensor:
        b, c, _, _ = images.shape
        p = self.patch
        patches = images.unfold(2, p, p).unfold(3, p, p)  # B, C, H/p, W/p, p, p
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(b, -1, c * p * p)
        x = self.embed(patches) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class DecoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.attn = Attention(dim, heads, causal=True, use_sdpa=True, kv_heads=kv_heads,
                              bias=False)
        self.gate = nn.Linear(dim, mlp_dim, bias=False)
        self.up = nn.Linear(dim, mlp_dim, bias=False)
        self.down = nn.Linear(mlp_dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class DecoderLM(nn.Module):
    """Llama-style causal LM: RMSNorm, SDPA attention (GQA), SwiGLU MLP, untied head."""

    def __init__(self, vocab: int = 256, dim: int = 64, depth: int = 2, heads: int = 4,
                 kv_heads: int = 2, mlp_dim: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(DecoderBlock(dim, heads, kv_heads, mlp_dim)
                                    for _ in range(depth))
        self.norm = RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))
