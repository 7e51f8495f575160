"""Small models for compiler tests: each case builds a model, example inputs and inputs of
other batch/sequence sizes (to check dynamic shapes). Built from code, no downloads."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from stl_compiler.models import MLP, DecoderLM, ViTEncoder


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    args: Callable[[int, int], tuple]  # (batch, seq) -> positional inputs
    kwargs: Callable[[int, int], dict[str, Any]] = field(default=lambda b, s: {})
    uses_sdpa: bool = False
    example: tuple[int, int] = (2, 8)
    other: tuple[int, int] = (3, 12)


def output_tensor(out: Any) -> torch.Tensor:
    """The main tensor of a model output (plain tensor, tuple, or transformers ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        if hasattr(out, key):
            return getattr(out, key)
    return out[0]


def _tokens(batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, 96, (batch, seq))


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        use_cache=False))


def _bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4,
                                max_position_embeddings=64))


def _hf_vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(
        image_size=32, patch_size=8, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_labels=10))


CASES = {
    "mlp": Case("mlp", lambda: MLP([32, 64, 48, 16], ["gelu", "relu"]),
                lambda b, s: (torch.randn(b, s, 32),)),
    "vit": Case("vit", lambda: ViTEncoder(image_size=16, patch=4, dim=32, depth=2, heads=2,
                                          mlp_dim=64),
                lambda b, s: (torch.randn(b, 3, 16, 16),)),
    "decoder": Case("decoder", lambda: DecoderLM(vocab=96, dim=32, depth=2, heads=4,
                                                 kv_heads=2, mlp_dim=64),
                    lambda b, s: (_tokens(b, s),), uses_sdpa=True),
    "torch_encoder_layer": Case(
        "torch_encoder_layer",
        lambda: nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True),
        lambda b, s: (torch.randn(b, s, 32),), uses_sdpa=True),
    "llama": Case("llama", _llama, lambda b, s: (), lambda b, s: {"input_ids": _tokens(b, s)},
                  uses_sdpa=True),
    "bert": Case("bert", _bert, lambda b, s: (), lambda b, s: {"input_ids": _tokens(b, s)},
                 uses_sdpa=True),
    "hf_vit": Case("hf_vit", _hf_vit, lambda b, s: (torch.randn(b, 3, 32, 32),),
                   uses_sdpa=True),
}


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    # bos/eos inside the tiny vocabulary (transformers warns about the default 50256)
    return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=1, n_head=2,
                                      n_positions=64, bos_token_id=0, eos_token_id=0,
                                      use_cache=False))


def _hf_swin() -> nn.Module:
    from transformers import SwinConfig, SwinModel

    # 32x32 images, 2x2 patches, 4x4 windows: 16x16 then 8x8 tokens, shifted windows in both
    return SwinModel(SwinConfig(image_size=32, patch_size=2, embed_dim=32, depths=[1, 1],
                                num_heads=[2, 2], window_size=4, mlp_ratio=2.0))


#: Models that only the dynamic-shape tests use (tests/test_dynamic_shapes.py): they
#: specialized batch 1 away before (transformers' masking guards ``batch != 1``).
SERVING_CASES = {
    "gpt2": Case("gpt2", _gpt2, lambda b, s: (_tokens(b, s),), uses_sdpa=True),
    "hf_swin": Case("hf_swin", _hf_swin, lambda b, s: (torch.randn(b, 3, 32, 32),),
                    uses_sdpa=True),
}
