"""bf16 vs fp32 difference of one linear layer, dense and STL, on CPU (bf16 emulation).

    git show HEAD:stl_compiler/data/fitted_t4_r24.safetensors > /tmp/old_r24.safetensors
    .venv/bin/python tools/bf16_layer_error.py --basis fitted /tmp/old_r24.safetensors dps48

One ``nn.Linear(256, 256)`` with Gaussian weights (std 1/16) and a (4096, 256) Gaussian input;
each layer (dense, and ``STLLinear.from_linear`` with each basis) is run in float32 and, cast
to bfloat16, on the bfloat16-rounded input. Reported: ‖y_bf16 − y_fp32‖ / ‖y_fp32‖ (how much
running the same layer in bf16 changes its output) and, for STL, ‖y_fp32 − dense_fp32‖ /
‖dense_fp32‖ (the approximation error). Torch CPU bf16 matmuls, not a GPU: the accumulation
precision of the device kernels differs, so this is a first lever measurement only.
Basis arguments: ``fitted`` (the shipped basis of ``--rank``), ``dps48``, ``strassen``, or a
safetensors file written by ``STLBasis.save``.
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn

from stl_compiler import STLLinear, bases


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--basis", nargs="+", default=["fitted"])
    parser.add_argument("--rank", type=int, default=24)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| layer | bf16 vs fp32 (same layer) | fp32 STL vs fp32 dense |\n|---|---|---|")
    for spec in ["dense", *args.basis]:
        drift, approx = [], []
        for seed in range(args.seeds):
            gen = torch.Generator().manual_seed(seed)
            linear = nn.Linear(256, 256)
            with torch.no_grad():
                linear.weight.copy_(torch.randn(256, 256, generator=gen) / 16)
                linear.bias.copy_(torch.randn(256, generator=gen) / 16)
            x = torch.randn(4096, 256, generator=gen)
            if spec == "dense":
                layer = linear
            else:
                basis = (bases.load(spec) if os.path.exists(spec)
                         else bases.resolve(spec, 4, args.rank))
                layer = STLLinear.from_linear(linear, basis)
            with torch.no_grad():
                dense = linear(x)
                y32 = layer(x)
                y16 = layer.to(torch.bfloat16)(x.bfloat16())
            drift.append(relative(y16, y32))
            approx.append(relative(y32, dense))
        name = spec if not os.path.exists(spec) else os.path.basename(spec)
        mean = sum(drift) / len(drift)
        print(f"| {name} | {mean:.4f} ({min(drift):.4f}-{max(drift):.4f}) | "
              f"{sum(approx) / len(approx):.4f} |", flush=True)


if __name__ == "__main__":
    main()
