"""The main job (``make demo``): convert a small transformer to STL and show what it costs.

1. Swap its Linear layers for STLLinear with an exact basis (Strassen, rank 49: no error, but
   more FLOPs than dense, so it converts only with the cost guard off) and with a rank-24
   fitted basis: max error against the original, FLOP ratio per layer and in total.
2. ``stl_compile`` the model (attention matmuls too): the conversion report, then dense vs STL
   timings through torch.compile on this machine.
3. Export the STL model to ONNX and run it in ONNX Runtime at another batch size: the parity
   error against the torch STL module.

Everything is built in code; nothing is downloaded.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time

import torch

from . import STLConfig, STLLinear, bases, stl_compile, swap_linears_
from .models import ViTEncoder


def _timeit(fn, *args, repeats: int = 10) -> float:
    with torch.no_grad():
        fn(*args)
        start = time.perf_counter()
        for _ in range(repeats):
            fn(*args)
    return (time.perf_counter() - start) / repeats * 1e3


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def swap_section(model: torch.nn.Module, images: torch.Tensor) -> None:
    print("== 1. STLLinear in place of nn.Linear (eager) ==")
    with torch.no_grad():
        reference = model(images)
    tokens = images.shape[0] * (images.shape[-1] // model.patch) ** 2
    # Strassen's exact rank 49 costs 49/64 + 49/k + 49/m of dense: more than dense at these
    # widths, so the cost guard (max_cost_ratio=0.8) would keep every layer dense.
    variants = (("exact (strassen, r=49, max_cost_ratio=None)",
                 STLConfig(basis="strassen", max_cost_ratio=None)),
                ("fitted, r=24", STLConfig(rank=24, basis="fitted")))
    for label, config in variants:
        stl_model = copy.deepcopy(model)
        outcome = swap_linears_(stl_model, config)
        with torch.no_grad():
            out = stl_model(images)
        print(f"\n{label}: max |STL - dense| on the logits = {_max_err(out, reference):.3e} "
              f"(logits scale {float(reference.abs().max()):.2f})")
        print(f"  {'layer':<22} {'in->out':>10} {'FLOPs STL/dense':>16}")
        dense_total = stl_total = 0.0
        for name, layer in stl_model.named_modules():
            if isinstance(layer, STLLinear):
                rows = tokens if name != "head" else images.shape[0]
                ratio = layer.flop_ratio(rows)
                dense_total += rows * layer.in_features * layer.out_features * 2
                stl_total += ratio * rows * layer.in_features * layer.out_features * 2
                print(f"  {name:<22} {layer.in_features:>4}->{layer.out_features:<5} "
                      f"{ratio:>16.3f}")
        print(f"  {'total':<22} {'':>10} {stl_total / dense_total:>16.3f}")
        for name, result in outcome.items():
            if result != "converted":
                print(f"  {name}: {result}")


def compile_section(model: torch.nn.Module, images: torch.Tensor) -> torch.nn.Module:
    print("\n== 2. stl_compile (rank 24, fitted basis; Linear and attention matmul sites) ==")
    start = time.perf_counter()
    compiled = stl_compile(model, (images,), STLConfig(rank=24, min_dim=16), backend="inductor")
    with torch.no_grad():
        compiled(images)
    print(f"(capture + passes + torch.compile: {time.perf_counter() - start:.1f} s)")
    print(compiled.stl_report)
    dense = torch.compile(model)
    t_dense, t_stl = _timeit(dense, images), _timeit(compiled, images)
    device = torch.cuda.get_device_name() if images.is_cuda else "CPU"
    print(f"\ntime per batch on {device} ({torch.get_num_threads()} threads): dense "
          f"{t_dense:.2f} ms, STL {t_stl:.2f} ms, dense/STL = {t_dense / t_stl:.2f}x")
    print("(a model this small is bound by overheads, not FLOPs: the GPU benchmarks in "
          "docs/benchmarks.md are where speed is measured)")
    return compiled


def export_section(model: torch.nn.Module, images: torch.Tensor) -> None:
    print("\n== 3. ONNX export, run in ONNX Runtime ==")
    try:
        from .exporters import export_onnx
        from .runtime import ort_session
    except ImportError as err:  # the onnx extra is optional
        print(f"skipped: {err}")
        return
    stl_model = stl_compile(model, (images,), STLConfig(rank=24, min_dim=16, measure_error=False),
                            backend="eager")
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(stl_model, (images,), os.path.join(tmp, "vit_stl.onnx"))
        session = ort_session(path)
        other = torch.randn(3, *images.shape[1:])  # another batch size than the export's
        (ort_out,) = session.run(other)
        with torch.no_grad():
            torch_out = stl_model(other)
        size = os.path.getsize(path) / 1e6
    err = float((ort_out - torch_out).norm() / torch_out.norm())
    print(f"exported {size:.1f} MB of standard ONNX ops; ONNX Runtime ({session.provider}) vs "
          f"torch STL module at batch 3: rel. error {err:.2e}")


def main() -> None:
    torch.manual_seed(0)
    model = ViTEncoder(image_size=32, patch=4, dim=256, depth=1, heads=4, mlp_dim=1024).eval()
    images = torch.randn(8, 3, 32, 32)
    print(f"model: ViT-style encoder, {sum(p.numel() for p in model.parameters())} parameters, "
          f"input {tuple(images.shape)}; basis r=24 alpha = {bases.fitted(4, 24).alpha:.3f} "
          f"(mean squared error per entry on Gaussian 4x4 tiles)\n")
    swap_section(model, images)
    compile_section(model, images)
    export_section(model, images)


if __name__ == "__main__":
    main()
