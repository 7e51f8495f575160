"""The STL ops are ``torch.library.triton_op``s whose CUDA path torch.compile can see.

Checked on CPU (CI has no GPU): each op is traced the way AOTAutograd traces it for Inductor
(``make_fx`` with symbolic shapes under functionalization) on fake CUDA tensors. The graph
must hold the Triton launches themselves (``triton_kernel_wrapper_functional`` of the op's
kernel) and no ``stl::`` op: an op whose CUDA kernel were registered with ``register_kernel``
would stay an opaque call, i.e. a call back into Python on every run of compiled code. The
activation dims must stay symbolic (grids computed from SymInts, no specialization). The
device machine checks the same end to end (``benchmarks/gpu_triton_op_check.py``).
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch._library import triton as triton_library
from torch._library.custom_ops import OPDEFS
from torch._subclasses.functional_tensor import FunctionalTensorMode, dispatch_functionalize
from torch.fx.experimental.proxy_tensor import make_fx

from stl_compiler.runtime import ops, triton_kernels

pytest.importorskip("triton")

OPS = ["encode", "decode", "decode_epilogue", "decode_act_encode", "decode_glu_encode",
       "decode_norm_encode", "decode_softmax_encode", "reencode"]


def test_ops_are_triton_ops():
    """A ``triton_op`` decomposes into its body under functionalization (how torch.compile
    sees its kernels); a ``custom_op`` does not. Each op names its kernels to torch."""
    for name in OPS:
        rules = OPDEFS[f"stl::{name}"]._torch_dispatch_fns
        assert FunctionalTensorMode in rules, f"stl::{name} is not a triton_op"
    impl = triton_kernels.kernels()
    for name, kernels in impl.KERNELS.items():
        assert triton_library.get_triton_kernels_for_op(f"stl::{name}") == list(kernels)


def _calls(n: int, k: int, batch: int, device: str) -> dict:
    """Each op's arguments for activations of ``batch × n × k`` (tile 4, rank 24, partial
    tiles), the tensors created with ``torch.empty`` (values do not matter for a trace)."""
    def t(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, dtype=dtype, device=device)

    a, c = (n + 3) // 4, (k + 3) // 4
    enc, d, ex, bias = t(24, batch, a, c), t(24, 16), t(72, 16), t(k)
    scores, padding = t(24, batch, 2, a, a), t(batch, 1, 1, n, dtype=torch.bool)  # 2 heads
    return {
        "encode": (t(batch, n, k), d, 4),
        "decode": (enc, d, 4, n, k),
        "decode_epilogue": (enc, d, bias, "gelu", 0.5, 4, n, k),
        "decode_act_encode": (enc, d, bias, ex, "silu", 1.0, 4, n, k),
        "decode_glu_encode": (enc, d, None, enc, d, bias, ex, "silu", 1.0, 4, n, k),
        "decode_norm_encode": (enc, d, bias, t(batch, n, k), "rms", t(k), None, 1e-6, ex, "sum",
                               4, n, k),
        "decode_softmax_encode": (scores, d, 0.25, padding, True, ex, 4, n, n),
        "reencode": (enc, d, bias, ex, 1.0, 4, n, k),
    }


def _trace(name: str, device: str) -> torch.fx.GraphModule:
    """``stl::<name>`` traced with symbolic batch, rows and cols (37, 50 and 3: partial tiles,
    distinct sizes so each is its own symbol) on ``device``."""
    def run(rows, cols, batch):
        return getattr(torch.ops.stl, name)(*_calls(rows.shape[0], cols.shape[0],
                                                     batch.shape[0], device)[name])

    sizes = (torch.empty(37), torch.empty(50), torch.empty(3))
    return make_fx(dispatch_functionalize(run), tracing_mode="symbolic")(*sizes)


@pytest.fixture
def quiet_and_sized(monkeypatch, caplog):
    """No GPU here: a fixed SM count, and the launch's mutation analysis (it compiles the
    kernel for the local GPU) falls back to "every pointer is written", with a warning."""
    monkeypatch.setattr(triton_kernels.kernels().common, "sm_count", lambda device: 132)
    caplog.set_level(logging.ERROR, logger="torch._dynamo")


@pytest.mark.parametrize("name", [n for n in OPS if n != "reencode"])
def test_cuda_path_traces_to_triton_launches(name, quiet_and_sized):
    graph = _trace(name, "cuda").graph
    launches = [n for n in graph.nodes
                if n.target is torch.ops.higher_order.triton_kernel_wrapper_functional]
    assert launches, f"stl::{name} on CUDA did not trace to its Triton kernel:\n{graph}"
    assert not [n for n in graph.nodes if "stl." in str(n.target)], str(graph)
    # The grid follows the symbolic sizes: computed from SymInts, not specialized.
    grid = launches[0].kwargs["grid"][0]
    assert any(isinstance(g, torch.fx.Node) for g in grid), f"constant grid {grid}"
    shape_env = next(n for n in graph.nodes if n.op == "placeholder").meta["val"].fake_mode \
        .shape_env
    sizes = [s.node.expr for n in graph.nodes if n.op == "placeholder"
             for s in n.meta["val"].shape]
    assert all(not shape_env.replace(s).is_number for s in sizes), \
        f"a size was specialized: {[shape_env.replace(s) for s in sizes]}"


@pytest.mark.parametrize("name", OPS)
def test_cpu_path_traces_to_aten(name):
    """CPU tensors (and ``stl::reencode`` everywhere) take the aten composite, which
    torch.compile sees as plain aten ops."""
    graph = _trace(name, "cpu").graph
    targets = {str(n.target) for n in graph.nodes if n.op == "call_function"}
    assert not [t for t in targets if "stl." in t or "triton" in t], targets
    assert any("aten.mm" in t or "aten.bmm" in t or "aten.matmul" in t
               or "aten.einsum" in t for t in targets), targets


def test_eager_ops_match_composites():
    """Eagerly the op body runs the composite on CPU, outputs contiguous."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 13, generator=gen).transpose(-1, -2)
    basis = torch.randn(24, 16, generator=gen)
    out = ops.encode(x, basis, 4)
    assert out.is_contiguous() and torch.equal(out, ops.encode_aten(x, basis, 4))
