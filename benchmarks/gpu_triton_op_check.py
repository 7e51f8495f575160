"""Device check: the STL ops' CUDA path is visible to Inductor, CUDA-graph safe, and right.

Run in the repository root of a CUDA machine (no arguments):

    PYTHONPATH=$PWD python3 benchmarks/gpu_triton_op_check.py

1. ``tests``: the CUDA class of ``tests/runtime/test_triton_kernels.py`` and the trace tests
   of ``tests/runtime/test_triton_op.py`` (pytest, in a subprocess).
2. ``inductor``: an STLLinear MLP under ``torch.compile`` and an ``stl_compile``'d pre-norm
   encoder block (row-strip norm, softmax strip, fused activation): Inductor's generated code
   launches our Triton kernels itself and calls no ``torch.ops.stl`` op; outputs match eager.
3. ``graphs``: the compiled MLP captured in a CUDA graph by hand (``torch.cuda.graph``) and
   through ``mode="reduce-overhead"``, replayed with fresh inputs, equal to eager.
4. ``grads``: gradients of an STLLinear under ``torch.compile`` (forward and backward code
   free of ``torch.ops.stl`` calls) equal eager's.
5. ``overhead`` (printed, not checked): wall-clock per call of the compiled encoder block vs
   the GPU-kernel time the profiler sees.

Exit status 0 when every check passed. Timings are one run's; nothing here is a benchmark.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time

import torch
from torch._inductor.utils import run_and_get_code

from stl_compiler import STLConfig, STLLinear, bases, stl_compile
from stl_compiler.models import EncoderBlock
from stl_compiler.runtime import triton_kernels

FAILURES: list[str] = []


def check(ok: bool, what: str) -> None:
    print(("PASS " if ok else "FAIL ") + what, flush=True)
    if not ok:
        FAILURES.append(what)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def kernel_names() -> set[str]:
    return {k.fn.__name__ for found in triton_kernels.kernels().KERNELS.values() for k in found}


def launches(code: list[str]) -> tuple[set[str], list[str]]:
    """Our kernels named in Inductor's generated code, and its lines calling ``stl`` ops."""
    text = "\n".join(code)
    return ({k for k in kernel_names() if k in text},
            [line.strip() for line in text.splitlines() if "torch.ops.stl." in line])


def stl_mlp(device: str = "cuda") -> torch.nn.Module:
    torch.manual_seed(0)
    dense = [torch.nn.Linear(96, 160), torch.nn.Linear(160, 96)]
    return torch.nn.Sequential(STLLinear.from_linear(dense[0], bases.strassen(4)),
                               torch.nn.GELU(),
                               STLLinear.from_linear(dense[1], bases.strassen(4))).to(device)


def run_tests() -> None:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           "tests/runtime/test_triton_kernels.py", "-k", "TestCUDA or test_triton_op",
           "tests/runtime/test_triton_op.py"]
    if importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", "8"]
    print("$", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, text=True, capture_output=True)
    print(done.stdout[-3000:], done.stderr[-2000:], flush=True)
    check(done.returncode == 0, "pytest: TestCUDA kernels and the triton_op trace tests")


def check_inductor() -> None:
    mlp = stl_mlp().eval()
    x = torch.randn(4, 37, 96, device="cuda")
    compiled = torch.compile(mlp, fullgraph=True)
    with torch.no_grad():
        out, code = run_and_get_code(compiled, x)
        ref = mlp(x)
    found, calls = launches(code)
    check({"_encode_kernel", "_decode_kernel"} <= found and not calls,
          f"STLLinear MLP: Inductor launches {sorted(found)}, stl op calls {calls[:3]}")
    check(rel(out, ref) < 1e-5, f"STLLinear MLP compiled vs eager: rel {rel(out, ref):.1e}")

    torch.manual_seed(1)
    block = EncoderBlock(128, 4, 512).cuda().eval().to(torch.bfloat16)
    x = torch.randn(8, 65, 128, device="cuda", dtype=torch.bfloat16)
    config = dict(rank=24, decompose_sdpa=True, targets=("linear", "matmul"))
    if hasattr(STLConfig, "max_cost_ratio"):
        config["max_cost_ratio"] = None  # this block is small: convert every site anyway
    eager = stl_compile(block, (x,), STLConfig(**config), backend="eager")
    compiled = stl_compile(block, (x,), STLConfig(**config), backend="inductor")
    with torch.no_grad():
        out, code = run_and_get_code(compiled, x)
        ref = eager(x)
    found, calls = launches(code)
    wanted = {"_decode_norm_encode_kernel", "_decode_softmax_encode_kernel"}
    check(wanted <= found and not calls,
          f"stl_compile'd encoder block: Inductor launches {sorted(found)}, "
          f"stl op calls {calls[:3]}")
    check(rel(out, ref) < 2e-2, f"encoder block inductor vs eager (bf16): rel {rel(out, ref):.1e}")
    check(torch.isfinite(out).all().item(), "encoder block output finite")
    overhead(compiled, x)


def check_graphs() -> None:
    mlp = stl_mlp().eval()
    compiled = torch.compile(mlp, fullgraph=True)
    static_x = torch.randn(4, 37, 96, device="cuda")
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                compiled(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = compiled(static_x)
        worst = 0.0
        for _ in range(3):
            fresh = torch.randn_like(static_x)
            static_x.copy_(fresh)
            graph.replay()
            worst = max(worst, rel(static_out, mlp(fresh)))
    check(worst < 1e-5, f"torch.cuda.graph capture + replay with fresh inputs: rel {worst:.1e}")

    reduce = torch.compile(stl_mlp().eval(), mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        worst = 0.0
        for _ in range(5):
            fresh = torch.randn(4, 37, 96, device="cuda")
            out = reduce(fresh).clone()
            worst = max(worst, rel(out, reduce._orig_mod(fresh)))
    check(worst < 1e-5, f'mode="reduce-overhead" replays vs eager: rel {worst:.1e}')


def check_grads() -> None:
    torch.manual_seed(2)
    layer = STLLinear.from_linear(torch.nn.Linear(96, 72), bases.fitted(4, 24)).cuda()
    x = torch.randn(3, 29, 96, device="cuda", requires_grad=True)
    grad = torch.randn(3, 29, 72, device="cuda")
    params = [p for p in layer.parameters() if p.requires_grad]

    def grads(fn):
        out = fn(x)
        return torch.autograd.grad(out, [x, *params], grad)

    ref = grads(layer)
    compiled = torch.compile(layer, fullgraph=True)
    got, code = run_and_get_code(lambda: grads(compiled))
    found, calls = launches(code)
    check(not calls and "_encode_kernel" in found,
          f"STLLinear fwd+bwd under torch.compile: launches {sorted(found)}, stl calls "
          f"{calls[:3]}")
    worst = max(rel(g, r) for g, r in zip(got, ref))
    check(worst < 1e-4, f"STLLinear gradients compiled vs eager ({len(ref)} tensors): "
          f"rel {worst:.1e}")


def overhead(fn, x) -> None:
    """Wall-clock per call (50 calls, one sync) vs the summed CUDA kernel time per call."""
    with torch.no_grad():
        for _ in range(5):
            fn(x)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(50):
            fn(x)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / 50 * 1e6
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                fn(x)
            torch.cuda.synchronize()
    gpu = sum(e.device_time_total for e in prof.key_averages()) / 10
    print(f"INFO encoder block (8x65x128 bf16, r=24) compiled: wall {wall:.0f} us/call, "
          f"GPU kernels {gpu:.0f} us/call", flush=True)


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("gpu_triton_op_check.py needs a CUDA GPU")
    if triton_kernels.kernels() is None:
        sys.exit("the STL Triton kernels cannot be imported (is triton installed?)")
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    for step in (run_tests, check_inductor, check_graphs, check_grads):
        try:
            step()
        except Exception as err:  # report every step, then fail
            import traceback

            traceback.print_exc()
            check(False, f"{step.__name__} raised {type(err).__name__}: {err}")
    print(f"{len(FAILURES)} failed: {FAILURES}" if FAILURES else "ALL PASSED", flush=True)
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()
