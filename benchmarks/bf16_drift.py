"""bf16 drift on the device: how far a model in bf16 is from itself in fp32, dense vs STL.

Issue 15's measure: ‖out_bf16 − out_fp32‖ / ‖out_fp32‖ of one model's main output (BERT's last
hidden state, Llama's logits), the bf16 model being the fp32 model cast to bf16 (same
weights, same basis). Two transformers models with random weights (seeded; hidden 256, 2
layers, 4 heads, vocab 1000), tokens (4, 64). Columns, each at rank 24 on every linear:

- dense;
- STL ``basis="fitted"`` (minimum α, token grouping) and ``basis="fitted-bf16"`` (the
  bf16-conditioned bases), token grouping (``allow_non_causal=True`` on the Llama: drift is
  what is measured here, not causality);
- on the Llama also the default causal grouping (shipped causal basis).

Paths: ``eager`` (``swap_linears_``; on CUDA the STL layers run the Triton kernels),
``inductor`` (``torch.compile`` for dense, ``stl_compile`` for STL, each compiled from the
fp32 and from the bf16 model) and ``onnx-fp16`` (the swapped model exported with
``export_onnx`` in float32 and in float16, both run by ONNX Runtime's CPU provider: fp16, the
half format ONNX deployments use, against fp32). Also reported: each STL column's fp32
distance to the dense fp32 model (its approximation error, for the α side of the trade-off).

Usage (CUDA machine)::

    python benchmarks/bf16_drift.py [--out DIR]

writes ``DIR/bf16_drift.json``; ``--smoke`` runs the eager path on the CPU;
``--paths onnx-fp16`` needs onnx and onnxruntime, not a GPU.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import device_or_exit, environment, out_dir, print_env, write_json  # noqa: E402

import stl_compiler as stl  # noqa: E402

RANK = 24


def models() -> dict[str, nn.Module]:
    import transformers as tf

    torch.manual_seed(0)
    bert = tf.BertModel(tf.BertConfig(hidden_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=1024,
                                      vocab_size=1000, attn_implementation="sdpa"))
    torch.manual_seed(1)
    llama = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=256, intermediate_size=688,
                                               num_hidden_layers=2, num_attention_heads=4,
                                               num_key_value_heads=4, vocab_size=1000,
                                               use_cache=False, attn_implementation="sdpa"))
    return {"bert": bert.eval(), "llama": llama.eval()}


def main_output(out: Any) -> torch.Tensor:
    for key in ("logits", "last_hidden_state"):
        if hasattr(out, key):
            return getattr(out, key)
    return out if isinstance(out, torch.Tensor) else out[0]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def configs(name: str) -> dict[str, stl.STLConfig | None]:
    tokens = {"targets": ("linear",), "row_grouping": "tokens", "allow_non_causal": True}
    columns: dict[str, stl.STLConfig | None] = {
        "dense": None,
        "stl fitted": stl.STLConfig(rank=RANK, basis="fitted", **tokens),
        "stl fitted-bf16": stl.STLConfig(rank=RANK, basis="fitted-bf16", **tokens)}
    if name == "llama":
        columns["stl causal (default)"] = stl.STLConfig(rank=RANK, targets=("linear",))
    return columns


def onnx_outputs(model: nn.Module, config: stl.STLConfig | None, tokens: torch.Tensor
                 ) -> dict[str, torch.Tensor]:
    """The main output in fp32 and in fp16 of ``model`` (converted by ``config``) exported to
    ONNX and run by ONNX Runtime on the CPU."""
    from stl_compiler.exporters import export_onnx
    from stl_compiler.runtime import ort_session

    variant = copy.deepcopy(model).cpu()
    if config is not None:
        stl.swap_linears_(variant, config)
    outputs = {}
    with tempfile.TemporaryDirectory() as folder:
        for dtype in (torch.float32, torch.float16):
            path = export_onnx(variant, (tokens.cpu(),), f"{folder}/{dtype}.onnx",
                                   dynamic_shapes=None, dtype=dtype)
            outputs[str(dtype)] = ort_session(path, ["CPUExecutionProvider"]).run(
                tokens.cpu())[0].float()
    return outputs


def run(model: nn.Module, config: stl.STLConfig | None, path: str, tokens: torch.Tensor
        ) -> dict[str, torch.Tensor]:
    """The main output in fp32 and in half precision (bf16; fp16 for ONNX) of ``model``
    converted by ``config``, keyed by dtype name."""
    if path == "onnx-fp16":
        return onnx_outputs(model, config, tokens)
    outputs = {}
    for dtype in (torch.float32, torch.bfloat16):
        variant = copy.deepcopy(model).to(dtype)
        if path == "eager":
            if config is not None:
                stl.swap_linears_(variant, config)
            call = variant
        elif config is None:
            call = torch.compile(variant)
        else:
            call = stl.stl_compile(variant, (tokens,), config, dynamic_shapes=None)
        with torch.no_grad():
            outputs[str(dtype)] = main_output(call(tokens)).float()
    return outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paths", nargs="+", default=["eager", "inductor"],
                        choices=("eager", "inductor", "onnx-fp16"))
    parser.add_argument("--models", nargs="+", default=["bert", "llama"],
                        choices=("bert", "llama"))
    parser.add_argument("--out", default=None)
    parser.add_argument("--smoke", action="store_true", help="eager path on the CPU")
    args = parser.parse_args()
    device = device_or_exit(args.smoke, "bf16_drift")
    paths = ["eager"] if args.smoke and args.paths == parser.get_default("paths") else args.paths
    if args.smoke and "inductor" in paths:
        parser.error("--smoke runs on the CPU: --paths eager and/or onnx-fp16")
    env = environment(device)
    print_env(env)
    rows = []
    for name, model in models().items():
        if name not in args.models:
            continue
        model = model.to(device)
        tokens = torch.randint(0, 1000, (4, 64), device=device,
                               generator=torch.Generator(device=device).manual_seed(2))
        for path in paths:
            dense32 = None
            for column, config in configs(name).items():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out = run(model, config, path, tokens)
                fp32 = out.pop("torch.float32")
                (half_dtype, half), = out.items()
                dense32 = fp32 if config is None else dense32
                row = {"model": name, "path": path, "column": column, "half": half_dtype,
                       "half_vs_fp32": relative(half, fp32),
                       "fp32_vs_dense_fp32": relative(fp32, dense32)}
                rows.append(row)
                print(f"{name:6s} {path:9s} {column:22s} {half_dtype[6:]} vs fp32 "
                      f"{row['half_vs_fp32']:.4f}  fp32 vs dense fp32 "
                      f"{row['fp32_vs_dense_fp32']:.4f}", flush=True)
    for row in rows:
        dense = next(r for r in rows if r["model"] == row["model"] and r["path"] == row["path"]
                     and r["column"] == "dense")
        row["drift_x_dense"] = row["half_vs_fp32"] / dense["half_vs_fp32"]
    path = out_dir(args.out) / "bf16_drift.json"
    write_json(path, {"environment": env, "rank": RANK, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
