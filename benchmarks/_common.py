"""Helpers shared by the benchmark scripts (device checks, timing, JSON, 2:4 pruning).

Each script puts this folder on ``sys.path`` and imports what it needs from here; scripts never
import each other. Timing conventions: ``bench_ms`` is the median of ``triton.testing.do_bench``
(CUDA events, L2 flushed before each run); ``wall_ms`` is the steady-state wall-clock of calls
issued back to back (what a user's loop sees, host overhead included); ``gpu_kernel_ms`` is the
sum of the GPU kernels' durations per call (torch.profiler). Host overhead = wall - GPU kernel
time: the time the GPU waits for the host.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from stl_compiler.models import DecoderBlock, EncoderBlock

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TILE = 4
DTYPE = torch.bfloat16


def bench(fn: Callable[[], object], rep: int = 200) -> float:
    """Median time of ``fn`` in ms (do_bench: CUDA events, L2 flushed before each run)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=rep, return_mode="median"))


def graphed(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` captured once into a CUDA graph; returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up outside capture: compiles the kernels, creates the cuBLAS handles
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus written."""
    src = torch.randn(2**28, device="cuda", dtype=DTYPE)  # 512 MiB
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def prune_2_4(w: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest-magnitude entries of every 4 consecutive ones in a row."""
    groups = w.reshape(-1, 4)
    keep = groups.abs().topk(2, dim=1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, keep, True)
    return (groups * mask).reshape(w.shape)



def device_or_exit(smoke: bool, script: str) -> torch.device:
    """CUDA for a real run (exit with a clear message without it); CPU for ``--smoke``."""
    if smoke:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        sys.exit(f"{script} needs a CUDA GPU (torch.cuda.is_available() is False). "
                 f"Run `python benchmarks/{script}.py --smoke` for the CPU smoke test.")
    try:
        import triton  # noqa: F401
    except ImportError as err:
        sys.exit(f"{script} needs triton on CUDA (timing and STL kernels): {err}")
    from stl_compiler.runtime import triton_kernels

    if triton_kernels.kernels() is None:
        sys.exit(f"{script}: the STL Triton kernels cannot be imported, so the STL ops would "
                 f"fall back to the slow aten composites; fix that first")
    return torch.device("cuda")


def bench_ms(fn: Callable[[], object], device: torch.device, runs: int = 20) -> float:
    """Median time of ``fn`` in ms: ``do_bench`` on CUDA (>= ``runs`` timed runs, L2
    flushed before each), ``perf_counter`` over 3 runs on CPU (smoke only)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        estimate = max(start.elapsed_time(end), 1e-3)
        return float(do_bench(fn, warmup=max(25.0, 3 * estimate),
                              rep=max(200.0, runs * estimate), return_mode="median"))
    times = []
    for _ in range(3):
        start_s = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start_s) * 1e3)
    return statistics.median(times)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def first_call_s(fn: Callable[[], object], device: torch.device) -> tuple[Any, float]:
    """Run ``fn`` once (this compiles a torch.compile'd module); its output and seconds."""
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖out − ref‖ / ‖ref‖`` in float32 (inf when ``out`` is not finite)."""
    out, ref = out.float(), ref.float()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm()).item()


def free_memory(device: torch.device) -> None:
    """Drop compiled graphs and cached blocks between rows."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def environment(device: torch.device) -> dict:
    """Device, versions, date and commit of this run."""
    env = {"device": "cpu (smoke)", "torch": torch.__version__, "cuda": torch.version.cuda,
           "python": platform.python_version(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "commit": os.environ.get("STL_COMMIT") or _git_commit()}
    if device.type == "cuda":
        import triton

        props = torch.cuda.get_device_properties(0)
        env.update(device=torch.cuda.get_device_name(0), sms=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2**30, 1), triton=triton.__version__)
    return env


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def print_env(env: dict) -> None:
    print(f"device {env['device']} | torch {env['torch']} | triton {env.get('triton', '-')} | "
          f"{env['date']} | commit {env['commit']}", flush=True)


def sparsify_linears_(model: nn.Module, semi_structured: bool) -> dict[str, str]:
    """Magnitude 2:4-prune every ``nn.Linear`` weight of ``model`` in place.

    With ``semi_structured`` (CUDA) the weight becomes ``to_sparse_semi_structured`` of the
    pruned weight (cuSPARSELt); otherwise (CPU smoke) it stays a dense tensor holding the
    pruned values. Returns ``{layer name: error}`` for layers whose conversion failed (left
    dense, unpruned), keyed by name and weight shape.
    """
    errors: dict[str, str] = {}
    if semi_structured:
        from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

        SparseSemiStructuredTensor._FORCE_CUTLASS = False  # cuSPARSELt, as bench_layer.py
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        pruned = prune_2_4(module.weight.detach())
        try:
            weight = to_sparse_semi_structured(pruned) if semi_structured else pruned
        except (RuntimeError, ValueError, TypeError, NotImplementedError) as err:
            errors[f"{name} {tuple(module.weight.shape)}"] = f"{type(err).__name__}: {err}"
            continue
        module.weight = nn.Parameter(weight, requires_grad=False)
    return errors


def stl_graph_ops(module: nn.Module) -> dict[str, int]:
    """How many ``stl::*`` and bmm nodes the rewritten graph of an ``stl_compile`` result has."""
    gm = getattr(module, "_orig_mod", module)
    counts: Counter[str] = Counter()
    for node in getattr(gm, "graph", torch.fx.Graph()).nodes:
        name = str(node.target)
        if name.startswith("stl."):
            counts[name.split(".")[1]] += 1
        elif name in ("aten.bmm.default", "aten.baddbmm.default"):
            counts["bmm"] += 1
    return dict(sorted(counts.items()))


def boundary_summary(report: Any) -> dict[str, int]:
    """Boundary counts by fusion kind from an ``STLReport``."""
    return dict(sorted(Counter(b.kind for b in report.boundaries).items()))


def report_json(report: Any) -> dict:
    return json.loads(report.to_json())


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str))


def out_dir(value: str | None) -> Path:
    return Path(value or os.environ.get("OUT") or "out")




def wall_ms(fn: Callable[[], object], device: torch.device, calls: int = 20) -> float:
    """Steady-state wall-clock per call in ms: ``calls`` calls back to back, one sync at the end
    (median of 3 such loops). The host's launch overhead shows here when it exceeds GPU time."""
    fn()
    synchronize(device)
    loops = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize(device)
        loops.append((time.perf_counter() - start) * 1e3 / calls)
    return statistics.median(loops)


def gpu_kernel_ms(fn: Callable[[], object], device: torch.device, calls: int = 5) -> float | None:
    """Sum of the durations of the GPU kernels one call launches, in ms (torch.profiler over
    ``calls`` calls); None on CPU. Kernels of a replayed CUDA graph are counted too."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    total_us = sum(getattr(e, "self_device_time_total", 0.0) for e in prof.key_averages())
    return total_us / 1e3 / calls


def kernel_breakdown(fn: Callable[[], object], device: torch.device, calls: int = 3,
                     top: int = 30) -> list[dict] | None:
    """The ``top`` GPU kernels of one call by total time: ``{"kernel", "ms", "launches"}`` per
    call (torch.profiler over ``calls`` calls); None on CPU."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    rows = [{"kernel": e.key[:160], "ms": e.self_device_time_total / 1e3 / calls,
             "launches": e.count / calls}
            for e in prof.key_averages() if getattr(e, "self_device_time_total", 0.0) > 0]
    return sorted(rows, key=lambda r: -r["ms"])[:top]


def timing_row(fn: Callable[[], object], device: torch.device, runs: int) -> dict:
    """What every benchmark row reports: do_bench median, wall-clock, GPU-kernel time and the
    host overhead (wall - GPU kernel time, clipped at 0)."""
    ms = bench_ms(fn, device, runs)
    wall = wall_ms(fn, device)
    gpu = gpu_kernel_ms(fn, device)
    return {"ms": ms, "wall_ms": wall, "gpu_ms": gpu,
            "host_ms": None if gpu is None else max(0.0, wall - gpu)}


@dataclass
class ModelSpec:
    """One benchmarked stack."""

    name: str
    kind: str  # "decoder" | "encoder"
    layers: int
    dim: int
    mlp_dim: int
    heads: int
    kv_heads: int
    batch: int
    seq: int
    norm_first: bool = True

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


class Stack(nn.Module):
    """Blocks applied in sequence to hidden states ``(batch, seq, dim)``."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def build(spec: ModelSpec, device: torch.device) -> tuple[nn.Module, Tensor]:
    """The dense stack (bf16, eval, no grad) and a random input, reproducible."""
    torch.manual_seed(0)
    if spec.kind == "decoder":
        blocks = [DecoderBlock(spec.dim, spec.heads, spec.kv_heads, spec.mlp_dim)
                  for _ in range(spec.layers)]
    else:
        blocks = [EncoderBlock(spec.dim, spec.heads, spec.mlp_dim, norm_first=spec.norm_first)
                  for _ in range(spec.layers)]
        for block in blocks:
            block.attn.use_sdpa = True  # flash attention, in every column
    model = Stack(blocks).to(device=device, dtype=DTYPE).eval()
    model.requires_grad_(False)
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(spec.batch, spec.seq, spec.dim, device=device, dtype=DTYPE, generator=gen)
    return model, x
