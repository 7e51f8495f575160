"""Triton kernels of the STL ops against float64 references.

``TestInterpreted`` runs in CI: the kernels of ``stl_compiler/runtime/_triton_impl.py`` are
loaded as a separate module copy while ``TRITON_INTERPRET=1`` is set (``triton.jit`` reads it
when it decorates), so they run on CPU tensors under Triton's interpreter whatever was imported
before. ``TestCUDA`` runs the compiled kernels through the registered ops on a GPU (the device
machine: ``benchmarks/gpu_check.py``) and checks gradients against the aten path.

Every run fills its output with NaN first (through ``_new_output``), so an element no program
writes fails the check.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch

from stl_compiler.runtime import ops

pytest.importorskip("triton")
# The sigmoid of a large negative fp32 overflows exp() to inf and correctly gives 0; numpy (the
# interpreter) warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
ACTIVATIONS = sorted(ops.ACTIVATIONS)


def _load_interpreted() -> ModuleType:
    """A copy of ``_triton_impl`` whose kernels were decorated under TRITON_INTERPRET=1."""
    name = "stl_compiler.runtime._triton_impl_interpreted"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(ops.__file__).with_name("_triton_impl.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec.loader.exec_module(module)
    finally:
        # Only this copy is interpreted; anything decorated later compiles as usual.
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    sys.modules[name] = module
    return module


def _poison(impl: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    def poisoned(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)

    monkeypatch.setattr(impl, "_new_output", poisoned)


def _check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.shape == ref.shape and out.dtype == dtype
    out = out.detach().double().cpu()
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) or non-finite outputs"
    err = ((out - ref).norm() / ref.norm()).item()
    assert err < TOL[dtype], f"relative error {err:.2e} >= {TOL[dtype]:.0e} ({dtype})"


def _rand(gen: torch.Generator, *shape: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device)


def _ref(fn: Callable, *args):
    """``fn`` on float64 CPU copies of the tensor arguments."""
    return fn(*[a.detach().double().cpu() if isinstance(a, torch.Tensor) else a for a in args])


# Shapes: tiles per dim that are and are not multiples of the block sizes (BI ≤ 8, BJ ≤ 128),
# partial tiles (sizes not multiples of t=4: encode pads them, decode crops them), several
# batch shapes, ranks below / at / between the padded widths 16, 32, 64.
ENCODE_CASES = [((), 4, 4, 7), ((2,), 35, 163, 24), ((2, 3), 20, 132, 16), ((), 130, 27, 49),
                ((2,), 36, 263, 40), ((), 1, 2, 16)]
#: (batch, tile-rows a, tile-cols c, rank, rows cropped, cols cropped)
DECODE_CASES = [((), 1, 1, 7, 0, 0), ((2,), 9, 41, 24, 1, 3), ((2, 3), 5, 33, 16, 0, 2),
                ((), 33, 7, 49, 3, 0), ((2,), 9, 66, 32, 2, 1)]


def _encode_case(impl, call, gen, device, dtype, batch, n, k, rank, strided):
    if strided:  # a transposed view, as row_grouping="batch" hands over
        x = _rand(gen, n, *batch, k, dtype=dtype, device=device).movedim(0, -2)
    else:
        x = _rand(gen, *batch, n, k, dtype=dtype, device=device)
    basis = _rand(gen, rank, 16, dtype=dtype, device=device)
    _check(call(impl.encode, ops.encode, x, basis, 4), _ref(ops.encode_aten, x, basis, 4), dtype)


def _decode_case(impl, call, gen, device, dtype, batch, a, c, rank, crop_rows, crop_cols,
                 activation, bias_len):
    enc = _rand(gen, rank, *batch, a, c, dtype=dtype, device=device)
    d = _rand(gen, rank, 16, dtype=dtype, device=device)
    rows, cols = a * 4 - crop_rows, c * 4 - crop_cols
    if activation == "none" and bias_len is None:
        args = (enc, d, 4, rows, cols)
        _check(call(impl.decode, ops.decode, *args), _ref(ops.decode_aten, *args), dtype)
        return
    bias = None if bias_len is None else _rand(gen, bias_len, dtype=dtype, device=device)
    args = (enc, d, bias, activation, 0.75, 4, rows, cols)
    _check(call(impl.decode_epilogue, ops.decode_epilogue, *args),
           _ref(ops.decode_epilogue_aten, *args), dtype)


def _act_encode_case(impl, call, gen, device, dtype, batch, a, c, rank, activation, rank2):
    enc = _rand(gen, rank, *batch, a, c, dtype=dtype, device=device)
    d = _rand(gen, rank, 16, dtype=dtype, device=device)
    ex = _rand(gen, rank2, 16, dtype=dtype, device=device)
    bias = _rand(gen, c * 4 - 3, dtype=dtype, device=device)
    args = (enc, d, bias, ex, activation, 0.5, 4, a * 4 - 1, c * 4 - 3)
    _check(call(impl.decode_act_encode, ops.decode_act_encode, *args),
           _ref(ops.decode_act_encode_aten, *args), dtype)


def _glu_case(impl, call, gen, device, dtype, batch, a, c, rank, activation, rank2):
    gate = _rand(gen, rank, *batch, a, c, dtype=dtype, device=device)
    up = _rand(gen, rank2, *batch, a, c, dtype=dtype, device=device)
    gate_d = _rand(gen, rank, 16, dtype=dtype, device=device)
    up_d = _rand(gen, rank2, 16, dtype=dtype, device=device)
    ex = _rand(gen, rank, 16, dtype=dtype, device=device)
    up_bias = _rand(gen, c * 4, dtype=dtype, device=device)
    args = (gate, gate_d, None, up, up_d, up_bias, ex, activation, 1.5, 4, a * 4 - 2, c * 4)
    _check(call(impl.decode_glu_encode, ops.decode_glu_encode, *args),
           _ref(ops.decode_glu_encode_aten, *args), dtype)


def _launch(launcher, op, *args):
    """Call the kernel launcher directly (CPU tensors under the interpreter)."""
    return launcher(*args)


def _dispatch(launcher, op, *args):
    """Call the registered op: on CUDA tensors it dispatches to the Triton kernels."""
    return op(*args)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


class _KernelChecks:
    """The kernel checks, shared by the interpreter (CPU) and CUDA classes."""

    device: str
    call: Callable

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("case", ENCODE_CASES, ids=str)
    def test_encode(self, impl, dtype, case):
        gen = torch.Generator().manual_seed(hash(case) % 2**31)
        _encode_case(impl, self.call, gen, self.device, dtype, *case, strided=False)

    def test_encode_strided_input(self, impl):
        gen = torch.Generator().manual_seed(1)
        _encode_case(impl, self.call, gen, self.device, torch.float32, (3,), 12, 40, 24,
                     strided=True)

    @pytest.mark.parametrize("per_sm", [1, 3])
    def test_looping_programs(self, impl, monkeypatch, per_sm):
        """Fewer programs than blocks: each program loops over blocks, prefetching the next."""
        for kind in ("encode", "decode", "fused"):
            table = {rp: (*config[:3], per_sm, *config[4:])
                     for rp, config in impl.CONFIGS[kind].items()}
            monkeypatch.setitem(impl.CONFIGS, kind, table)
        gen = torch.Generator().manual_seed(per_sm)
        for batch, n, k, rank in ENCODE_CASES[1:3]:
            _encode_case(impl, self.call, gen, self.device, torch.float32, batch, n, k, rank,
                         strided=False)
        for batch, a, c, rank, crop_rows, crop_cols in DECODE_CASES[1:3]:
            _decode_case(impl, self.call, gen, self.device, torch.float32, batch, a, c, rank,
                         crop_rows, crop_cols, "relu", c * 4)
            _act_encode_case(impl, self.call, gen, self.device, torch.float32, batch, a, c,
                             rank, "gelu", 40)
            _glu_case(impl, self.call, gen, self.device, torch.float32, batch, a, c, rank,
                      "silu", 16)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("case", DECODE_CASES, ids=str)
    def test_decode(self, impl, dtype, case):
        gen = torch.Generator().manual_seed(hash(case) % 2**31)
        _decode_case(impl, self.call, gen, self.device, dtype, *case, "none", None)

    @pytest.mark.parametrize("activation", ACTIVATIONS)
    def test_decode_epilogue(self, impl, activation):
        gen = torch.Generator().manual_seed(2)
        for dtype in (torch.float32, torch.bfloat16):
            _decode_case(impl, self.call, gen, self.device, dtype, (2,), 9, 41, 24, 1, 2,
                         activation, 41 * 4 - 5)
        _decode_case(impl, self.call, gen, self.device, torch.float32, (), 6, 35, 49, 0, 3,
                     activation, None)

    @pytest.mark.parametrize("activation", ["none", "gelu", "silu", "sigmoid"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    def test_decode_act_encode(self, impl, activation, dtype):
        gen = torch.Generator().manual_seed(3)
        _act_encode_case(impl, self.call, gen, self.device, dtype, (2,), 9, 37, 24,
                         activation, 40)
        _act_encode_case(impl, self.call, gen, self.device, dtype, (), 17, 5, 49,
                         activation, 16)

    @pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    def test_decode_glu_encode(self, impl, activation, dtype):
        gen = torch.Generator().manual_seed(4)
        _glu_case(impl, self.call, gen, self.device, dtype, (2,), 9, 37, 24,
                  activation, 16)
        _glu_case(impl, self.call, gen, self.device, dtype, (), 5, 33, 40,
                  activation, 49)


class TestInterpreted(_KernelChecks):
    """The kernels under Triton's interpreter, on CPU tensors (runs in CI)."""

    device = "cpu"
    call = staticmethod(_launch)

    @pytest.fixture
    def impl(self, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
        module = _load_interpreted()
        _poison(module, monkeypatch)
        return module


needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: the compiled kernels run on the device machine "
           "(python benchmarks/gpu_check.py); CI checks them under the interpreter instead")


@pytest.mark.gpu
@needs_cuda
class TestCUDA(_KernelChecks):
    """The compiled kernels through the registered ops on CUDA, and their gradients."""

    device = "cuda"
    call = staticmethod(_dispatch)

    @pytest.fixture
    def impl(self, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
        from stl_compiler.runtime import triton_kernels

        module = triton_kernels.kernels()
        assert module is not None, "triton is not importable on this CUDA machine"
        _poison(module, monkeypatch)
        return module

    def test_dispatches_to_triton(self, impl, monkeypatch):
        calls = []
        inner = impl._new_output
        monkeypatch.setattr(impl, "_new_output", lambda *a: calls.append(a) or inner(*a))
        x = torch.randn(8, 16, device="cuda", dtype=torch.bfloat16)
        basis = torch.randn(24, 16, device="cuda", dtype=torch.bfloat16)
        ops.decode(ops.encode(x, basis, 4), basis, 4, 8, 16)
        assert len(calls) == 2

    @pytest.mark.parametrize("name", ["encode", "decode", "decode_epilogue",
                                      "decode_act_encode", "decode_glu_encode"])
    def test_gradients_match_aten(self, impl, name):
        gen = torch.Generator().manual_seed(5)
        r = lambda *shape: _rand(gen, *shape, dtype=torch.float32, device="cuda")  # noqa: E731
        a, c = 6, 10
        cases = {
            "encode": (ops.encode, ops.encode_aten, (r(2, a * 4 - 1, c * 4 - 3), r(24, 16), 4)),
            "decode": (ops.decode, ops.decode_aten,
                       (r(24, 2, a, c), r(24, 16), 4, a * 4 - 2, c * 4 - 1)),
            "decode_epilogue": (ops.decode_epilogue, ops.decode_epilogue_aten,
                                (r(24, 2, a, c), r(24, 16), r(c * 4 - 2), "gelu", 0.5, 4,
                                 a * 4, c * 4 - 3)),
            "decode_act_encode": (ops.decode_act_encode, ops.decode_act_encode_aten,
                                  (r(24, 2, a, c), r(24, 16), r(c * 4), r(16, 16), "silu",
                                   0.5, 4, a * 4 - 1, c * 4 - 2)),
            "decode_glu_encode": (ops.decode_glu_encode, ops.decode_glu_encode_aten,
                                  (r(24, 2, a, c), r(24, 16), None, r(16, 2, a, c), r(16, 16),
                                   r(c * 4), r(24, 16), "silu", 1.0, 4, a * 4, c * 4 - 3)),
        }
        op, composite, args = cases[name]
        args = [v.requires_grad_() if isinstance(v, torch.Tensor) else v for v in args]
        out = op(*args)
        grad_out = torch.randn_like(out)
        tensors = [v for v in args if isinstance(v, torch.Tensor)]
        grads = torch.autograd.grad(out, tensors, grad_out)
        ref_args = [v.detach().double().cpu().requires_grad_() if isinstance(v, torch.Tensor)
                    else v for v in args]
        ref_out = composite(*ref_args)
        ref_tensors = [v for v in ref_args if isinstance(v, torch.Tensor)]
        ref_grads = torch.autograd.grad(ref_out, ref_tensors, grad_out.double().cpu())
        _check(out, ref_out.detach(), torch.float32)
        for grad, ref in zip(grads, ref_grads):
            _check(grad, ref, torch.float32)

    def test_compiled_stl_linear(self, impl):
        from stl_compiler import STLLinear, bases

        torch.manual_seed(6)
        linear = torch.nn.Linear(64, 96, device="cuda")
        layer = STLLinear.from_linear(linear, bases.strassen(4))
        x = torch.randn(3, 20, 64, device="cuda")
        compiled = torch.compile(layer, fullgraph=True)
        with torch.no_grad():
            _check(compiled(x), linear(x).double().cpu(), torch.float32)
