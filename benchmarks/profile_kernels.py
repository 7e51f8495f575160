"""Where a compiled stack's time goes: host CPU time per call and GPU time per kernel.

Builds the ``bench_model.py`` stack (``_common.build``; default: DiT-XL-like, 8 layers, hidden
1152, MLP 4608, 16×256 tokens, bf16), compiles it dense (``torch.compile``) and STL
(``stl_compile``, r=24, token grouping, every linear, default fusions), and for each reports:

- ``cpu_call_ms``: median CPU time of one call (the Python call returns before the GPU is
  done; synchronised before and after each call, so this is the host's launch work alone);
- ``call_to_sync_ms``: median time from the call to the GPU being done;
- ``kernels_per_call`` and a torch.profiler table (``host_<column>.txt``, sorted by self CPU
  time) with each kernel's GPU time.

Usage (CUDA machine)::

    python benchmarks/profile_kernels.py [--layers 8] [--out DIR]

writes ``DIR/profile_kernels.json`` and the two tables. ``--smoke`` runs it on the CPU at
tiny sizes (the code path only).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402  (after the path fix above)
    ModelSpec,
    build,
    device_or_exit,
    environment,
    out_dir,
    print_env,
    synchronize,
    write_json,
)

import stl_compiler as stl  # noqa: E402


def host_times(model: torch.nn.Module, x: torch.Tensor, device: torch.device, calls: int
               ) -> dict[str, float]:
    cpu, total = [], []
    for _ in range(calls):
        synchronize(device)
        start = time.perf_counter()
        model(x)
        returned = time.perf_counter()
        synchronize(device)
        cpu.append(returned - start)
        total.append(time.perf_counter() - start)
    return {"cpu_call_ms": 1e3 * statistics.median(cpu),
            "call_to_sync_ms": 1e3 * statistics.median(total)}


def kernel_table(model: torch.nn.Module, x: torch.Tensor, device: torch.device, calls: int
                 ) -> tuple[str, float]:
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(calls):
            model(x)
        synchronize(device)
    averages = prof.key_averages()
    kernels = sum(e.count for e in averages if e.device_type == torch.autograd.DeviceType.CUDA)
    return averages.table(sort_by="self_cpu_time_total", row_limit=40), kernels / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rank", type=int, default=24)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--out", default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU")
    args = parser.parse_args()
    device = device_or_exit(args.smoke, "profile_kernels")
    spec = (ModelSpec("dit", "encoder", 2, 48, 192, 4, 4, 2, 16) if args.smoke else
            ModelSpec("dit", "encoder", args.layers, 1152, 4608, 16, 16, 16, 256))
    env = environment(device)
    print_env(env)
    model, x = build(spec, device)
    config = stl.STLConfig(tile=4, rank=args.rank, targets=("linear",), allow_non_causal=True)
    columns = {"dense": torch.compile(model),
               "stl": stl.stl_compile(model, (x,), config, dynamic_shapes=None)}
    out = out_dir(args.out)
    result: dict = {"environment": env, "settings": vars(args) | {"spec": spec.__dict__}}
    with torch.no_grad():
        for name, compiled in columns.items():
            for _ in range(3):
                compiled(x)
            row = host_times(compiled, x, device, args.calls)
            table, row["kernels_per_call"] = kernel_table(compiled, x, device, 5)
            (out / f"host_{name}.txt").parent.mkdir(parents=True, exist_ok=True)
            (out / f"host_{name}.txt").write_text(table)
            result[name] = row
            print(name, {k: round(v, 3) for k, v in row.items()}, flush=True)
    write_json(out / "profile_kernels.json", result)
    print(f"wrote {out / 'profile_kernels.json'}")


if __name__ == "__main__":
    main()
