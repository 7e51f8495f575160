"""The one script the device machine runs: kernel tests, a block-shape sweep, the layer bench.

Steps (each can be skipped), results written under ``$OUT`` (or ``--out``):

1. ``tests``: the CUDA class of ``tests/runtime/test_triton_kernels.py`` (pytest, in a
   subprocess; log in ``tests.log``);
2. ``sweep``: encode / decode / decode_act_encode at one large shape for several block shapes,
   achieved bandwidth against the device-to-device copy, registers and spills
   (``sweep.json``);
3. ``bench``: ``benchmarks/bench_layer.py`` (``layer_bench.json``).

Usage: ``STL_COMMIT=$(git rev-parse HEAD) python benchmarks/gpu_check.py [--skip tests sweep]
[--bench-args "--ranks 24"]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_layer  # noqa: E402  (after the path fix above)

from stl_compiler.runtime import ops, triton_kernels  # noqa: E402

#: Block shapes (BI, BJ, num_warps) tried per padded rank in the sweep.
SWEEP = {
    16: [(4, 32, 4), (8, 32, 4), (16, 32, 4), (8, 32, 8), (16, 32, 8), (8, 64, 8)],
    32: [(2, 32, 4), (4, 32, 4), (8, 32, 4), (16, 32, 4), (8, 32, 8), (16, 32, 8), (4, 64, 4),
         (8, 64, 8), (2, 64, 4), (32, 16, 8)],
    64: [(2, 32, 4), (4, 32, 4), (4, 32, 8), (8, 32, 8), (2, 64, 4), (4, 64, 8)],
}
#: The fused decode→act→encode kernel holds two accumulators: smaller blocks.
SWEEP_FUSED = [(2, 32, 4), (4, 32, 4), (4, 32, 8), (8, 32, 8), (2, 64, 4), (8, 16, 4)]


def run_tests(out: Path, timeout: int) -> None:
    """The CUDA kernel tests, 8 pytest workers (compiles run in parallel)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "8",
           "tests/runtime/test_triton_kernels.py", "-k", "TestCUDA"]
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        log = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        log = f"TIMEOUT after {timeout}s\n{err.stdout or ''}"
    (out / "tests.log").write_text(log)
    print(f"tests ({time.time() - start:.0f}s):", log.strip().splitlines()[-1], flush=True)


def _last_compiled(kernel) -> dict:
    """Registers, spills and shared memory of the kernel's most recently compiled variant."""
    for cache in kernel.device_caches.values():
        compiled = list(cache[0].values())
        if compiled:
            last = compiled[-1]
            return {"regs": last.n_regs, "spills": last.n_spills, "shared": last.metadata.shared}
    return {}


def _sweep_rank(impl, x: torch.Tensor, rank: int, bandwidth: float, deadline: float
                ) -> list[dict]:
    """Every sweep block shape of each kernel for one rank; the tables restored after."""
    t, rp = 4, impl.padded_rank(rank)
    basis = torch.randn(rank, t * t, device="cuda", dtype=x.dtype) / t
    xh = ops.encode(x, basis, t)
    n = x.shape[-1]
    plain_bytes = x.numel() * x.element_size()
    cases = [("encode", lambda: ops.encode(x, basis, t), impl._encode_kernel,
              plain_bytes * (1 + rank / t**2)),
             ("decode", lambda: ops.decode(xh, basis, t), impl._decode_kernel,
              plain_bytes * (1 + rank / t**2))]
    if rp == 32:
        cases.append(("fused", lambda: ops.decode_act_encode(xh, basis, None, basis, "gelu", 1.0,
                                                             t, n, n),
                      impl._decode_act_encode_kernel, plain_bytes * 2 * rank / t**2))
    rows = []
    for kind, fn, kernel, nbytes in cases:
        default = impl.CONFIGS[kind][rp]
        for config in (SWEEP_FUSED if kind == "fused" else SWEEP[rp]):
            if time.time() > deadline:
                break
            impl.CONFIGS[kind][rp] = config
            fn()
            info = _last_compiled(kernel)
            ms = bench_layer.bench(fn)
            gbs = nbytes / ms / 1e6
            row = {"kernel": kind, "rank": rank, "config": config, "ms": ms, "gbs": gbs,
                   "frac_copy": gbs * 1e9 / bandwidth, **info}
            rows.append(row)
            print(f"  {kind:<7} r={rank:<3} BI,BJ,warps={config!s:<13} {ms:8.4f} ms "
                  f"{gbs:6.0f} GB/s ({row['frac_copy']:.2f} of copy) {info}", flush=True)
        impl.CONFIGS[kind][rp] = default
    return rows


def sweep(out: Path, n: int, budget_s: float) -> None:
    """Bandwidth of each kernel for each block shape at ``x (n, n)`` bf16."""
    impl = triton_kernels.kernels()
    bandwidth = bench_layer.copy_bandwidth()
    print(f"sweep at n={n}: copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    deadline = time.time() + budget_s
    rows = [row for rank in (24, 16, 49) for row in _sweep_rank(impl, x, rank, bandwidth,
                                                                  deadline)]
    results = {"n": n, "copy_gbs": bandwidth / 1e9, "rows": rows}
    (out / "sweep.json").write_text(json.dumps(results, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")))
    parser.add_argument("--skip", nargs="*", default=[], choices=["tests", "sweep", "bench"])
    parser.add_argument("--test-timeout", type=int, default=240)
    parser.add_argument("--sweep-n", type=int, default=8192)
    parser.add_argument("--sweep-budget", type=float, default=120.0)
    parser.add_argument("--bench-args", default="", help="extra bench_layer.py arguments")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        sys.exit("gpu_check needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name(0)} | torch {torch.__version__} | "
          f"commit {os.environ.get('STL_COMMIT', 'unknown')}", flush=True)
    if "tests" not in args.skip:
        run_tests(args.out, args.test_timeout)
    if "sweep" not in args.skip:
        sweep(args.out, args.sweep_n, args.sweep_budget)
    if "bench" not in args.skip:
        bench_layer.main([*shlex.split(args.bench_args), "--out", str(args.out)])


if __name__ == "__main__":
    main()
