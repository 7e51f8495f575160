"""``stl::gemm_decode`` (the fused STL GEMM) against float64 references.

``TestInterpreted`` runs in CI: the kernel package is loaded as a separate copy while
``TRITON_INTERPRET=1`` is set, so its kernels run on CPU tensors under Triton's interpreter;
outputs are NaN-poisoned first, so an element no program writes fails. ``TestCUDA`` runs the
compiled kernel (explicit configs of both decode kinds and the autotuner) on a GPU. The op's
own behaviour (errors, fake, autograd, decomposition, CPU composite) is tested on CPU.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from stl_compiler.runtime import ops, stl_gemm

pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
#: (batch, tile-rows a, K/4, M/4, rank, rows cropped, cols cropped, activation, bias):
#: block remainders of the interpreter's 16 × 16 × 16 blocks (a, K/4, M/4 not multiples of
#: 16, and more than one block each way), partial tiles cropped, batch dims (P = B·a tile-rows
#: straddle blocks), ranks 16, 24, 49 (the tensor-core decode's second group partly empty), a
#: bias shorter than the padded width.
CASES = [
    ((), 5, 7, 9, 24, 1, 2, "gelu", True),
    ((2,), 9, 17, 18, 16, 0, 0, "none", False),
    ((2, 3), 3, 5, 4, 49, 3, 1, "silu", True),
    ((), 17, 3, 5, 24, 2, 3, "relu", True),
]


def _load_interpreted() -> ModuleType:
    """The ``gemm_decode`` module of a copy of the kernel package decorated under
    TRITON_INTERPRET=1 (its ``common`` is the copy's, so the helpers are interpreted too)."""
    name = "stl_compiler.runtime._gemm_decode_interpreted"
    if name in sys.modules:
        return sys.modules[name].gemm_decode
    package = Path(ops.__file__).with_name("triton")
    spec = importlib.util.spec_from_file_location(name, package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        kernel = importlib.import_module(f"{name}.gemm_decode")
    except BaseException:
        del sys.modules[name]
        raise
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    assert module.KERNEL_DEVICE == "cpu"
    return kernel


def _poison(impl: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    def poisoned(shape, like):
        return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)

    monkeypatch.setattr(impl.common, "new_output", poisoned)


def _operands(case, dtype, device, gen=None):
    batch, a, kt, mt, rank, crop_rows, crop_cols, activation, has_bias = case

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device)

    xh, wh, d = rand(rank, *batch, a, kt), rand(rank, kt, mt), rand(rank, 16)
    bias = rand(mt * 4 - crop_cols) if has_bias else None
    return (xh, wh, d, bias, activation, 0.75, 4, a * 4 - crop_rows, mt * 4 - crop_cols)


def _reference(args) -> torch.Tensor:
    return stl_gemm.gemm_decode_aten(*[a.detach().double().cpu() if isinstance(a, torch.Tensor)
                                       else a for a in args])


def _check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.shape == ref.shape and out.dtype == dtype
    out = out.detach().double().cpu()
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) or non-finite outputs"
    err = ((out - ref).norm() / ref.norm()).item()
    assert err < TOL[dtype], f"relative error {err:.2e} >= {TOL[dtype]:.0e} ({dtype})"


class TestInterpreted:
    @pytest.fixture
    def impl(self):
        return _load_interpreted()

    @pytest.mark.parametrize("decode", ["fma", "tc"])
    @pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[1]}x{c[2]}x{c[3]}r{c[4]}")
    def test_matches_float64(self, impl, monkeypatch, case, decode):
        _poison(impl, monkeypatch)
        args = _operands(case, torch.float32, "cpu")
        config = (*impl.INTERPRETER_CONFIG[:-1], decode)
        _check(impl.gemm_decode(*args, config=config), _reference(args), torch.float32)

    @pytest.mark.parametrize("decode", ["fma", "tc"])
    def test_bf16(self, impl, monkeypatch, decode):
        _poison(impl, monkeypatch)
        args = _operands(CASES[0], torch.bfloat16, "cpu")
        config = (*impl.INTERPRETER_CONFIG[:-1], decode)
        _check(impl.gemm_decode(*args, config=config), _reference(args), torch.bfloat16)

    @pytest.mark.parametrize("activation", sorted(ops.ACTIVATIONS))
    def test_activations(self, impl, monkeypatch, activation):
        _poison(impl, monkeypatch)
        case = ((), 2, 3, 5, 24, 1, 3, activation, True)
        args = _operands(case, torch.float32, "cpu")
        _check(impl.gemm_decode(*args), _reference(args), torch.float32)

    def test_op_takes_the_kernel(self, impl, monkeypatch):
        """The op's body launches the kernel on tensors of the kernel's device (CPU for this
        copy) and falls back to the composite for what it does not take."""
        calls = []
        launcher = impl.gemm_decode
        monkeypatch.setattr(impl, "gemm_decode", lambda *a: calls.append(1) or launcher(*a))
        monkeypatch.setattr(stl_gemm, "kernel_module", lambda: impl)
        args = _operands(CASES[0], torch.float32, "cpu")
        _check(torch.ops.stl.gemm_decode(*args), _reference(args), torch.float32)
        assert calls == [1]
        big = _operands(((), 2, 3, 4, 65, 0, 0, "none", False), torch.float32, "cpu")
        _check(torch.ops.stl.gemm_decode(*big), _reference(big), torch.float32)
        assert calls == [1], "rank 65 > MAX_RANK must take the composite"


class TestOp:
    def test_cpu_composite_equals_unfused_ops(self):
        """On CPU the op is today's bmm → decode_epilogue, op for op."""
        xh, wh, d, bias, act, scale, tile, rows, cols = _operands(CASES[2], torch.float32, "cpu")
        yh = torch.bmm(xh.reshape(xh.shape[0], -1, xh.shape[-1]), wh)
        yh = yh.reshape(*xh.shape[:-1], wh.shape[-1])
        unfused = ops.decode_epilogue(yh, d, bias, act, scale, tile, rows, cols)
        fused = torch.ops.stl.gemm_decode(xh, wh, d, bias, act, scale, tile, rows, cols)
        assert torch.equal(fused, unfused)

    def test_exact_basis_equals_dense(self):
        from stl_compiler.bases import strassen

        ex, ew, d = strassen(4).to(torch.float64)
        x, w = torch.randn(2, 9, 20, dtype=torch.float64), torch.randn(20, 13,
                                                                         dtype=torch.float64)
        xh, wh = ops.encode(x, ex, 4), ops.encode(w, ew, 4)
        out = torch.ops.stl.gemm_decode(xh, wh, d, None, "none", 1.0, 4, 9, 13)
        torch.testing.assert_close(out, x @ w, rtol=1e-10, atol=1e-10)

    @pytest.mark.parametrize("bad, match", [
        ({"wh": (24, 6, 9)}, "does not match xh"),
        ({"wh": (16, 7, 9)}, "does not match xh"),
        ({"d": (24, 9)}, "d must be"),
        ({"rows": 25}, "does not fit"),
        ({"cols": 32}, "does not fit"),
        ({"activation": "swish"}, "unknown activation"),
    ])
    def test_errors(self, bad, match):
        xh, wh, d = torch.randn(24, 5, 7), torch.randn(24, 7, 9), torch.randn(24, 16)
        kwargs = {"activation": "none", "rows": 19, "cols": 34}
        wh = torch.randn(bad["wh"]) if "wh" in bad else wh
        d = torch.randn(bad["d"]) if "d" in bad else d
        kwargs.update({k: v for k, v in bad.items() if k not in ("wh", "d")})
        with pytest.raises(ValueError, match=match):
            torch.ops.stl.gemm_decode(xh, wh, d, None, kwargs["activation"], 1.0, 4,
                                      kwargs["rows"], kwargs["cols"])

    def test_opcheck(self):
        """Fake implementation, autograd registration and schema, as torch checks them."""
        args = _operands(((2,), 3, 4, 5, 16, 1, 2, "gelu", True), torch.float64, "cpu")
        for a in args[:4]:
            a.requires_grad_(True)
        torch.library.opcheck(torch.ops.stl.gemm_decode.default, args, test_utils=(
            "test_schema", "test_autograd_registration", "test_faketensor"))

    def test_gradients_match_numerical(self):
        args = list(_operands(((), 2, 3, 3, 16, 1, 2, "tanh", True), torch.float64, "cpu"))
        for i in range(4):
            args[i] = args[i].requires_grad_(True)
        assert torch.autograd.gradcheck(lambda *t: torch.ops.stl.gemm_decode(*t, *args[4:]),
                                        tuple(args[:4]))

    def test_decomposition_removes_the_op(self):
        class Site(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.wh = torch.nn.Parameter(torch.randn(24, 5, 3))
                self.d = torch.nn.Buffer(torch.randn(24, 16))

            def forward(self, xh):
                return torch.ops.stl.gemm_decode(xh, self.wh, self.d, None, "relu", 1.0, 4, 14,
                                                 11)

        site, xh = Site(), torch.randn(24, 4, 5)
        program = torch.export.export(site, (xh,)).run_decompositions(ops.DECOMPOSITIONS)
        targets = {n.target for n in program.graph.nodes if n.op == "call_function"}
        assert torch.ops.stl.gemm_decode.default not in targets
        torch.testing.assert_close(program.module()(xh), site(xh))


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@CUDA
class TestCUDA:
    @pytest.mark.parametrize("config, dtype", [
        ((32, 32, 64, 8, 3, "fma"), torch.bfloat16), ((64, 32, 64, 8, 3, "fma"), torch.bfloat16),
        ((64, 32, 64, 8, 3, "fma"), torch.float16), ((64, 32, 64, 8, 3, "fma"), torch.float32),
        ((32, 32, 64, 4, 3, "tc"), torch.bfloat16), ((64, 32, 64, 8, 3, "tc"), torch.bfloat16),
    ], ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v)[6:])
    @pytest.mark.parametrize("case", CASES + [((), 514, 320, 100, 24, 3, 1, "gelu", True)],
                             ids=lambda c: f"{c[1]}x{c[2]}x{c[3]}r{c[4]}")
    def test_compiled_matches_float64(self, monkeypatch, case, config, dtype):
        impl = stl_gemm.kernel_module()
        _poison(impl, monkeypatch)
        args = _operands(case, dtype, "cuda")
        _check(impl.gemm_decode(*args, config=config), _reference(args), dtype)

    def test_op_autotuned(self):
        args = _operands(((4,), 257, 320, 160, 24, 0, 0, "none", True), torch.bfloat16, "cuda")
        _check(torch.ops.stl.gemm_decode(*args), _reference(args), torch.bfloat16)

    def test_gradients(self):
        args = list(_operands(((2,), 9, 20, 17, 24, 1, 2, "gelu", True), torch.float32,
                              "cuda"))
        leaves = [a.requires_grad_(True) for a in args[:4]]
        torch.ops.stl.gemm_decode(*args).square().sum().backward()
        ref = [a.detach().double().requires_grad_(True) for a in args[:4]]
        stl_gemm.gemm_decode_aten(*ref, *args[4:]).square().sum().backward()
        for got, want in zip(leaves, ref):
            _check(got.grad, want.grad.cpu(), torch.float32)

    def test_torch_compile_and_cuda_graph(self):
        args = _operands(((2,), 65, 64, 48, 24, 1, 0, "silu", True), torch.bfloat16, "cuda")
        compiled = torch.compile(lambda *a: torch.ops.stl.gemm_decode(*a), fullgraph=True)
        _check(compiled(*args), _reference(args), torch.bfloat16)
        xh = args[0].clone()
        graph = torch.cuda.CUDAGraph()
        torch.ops.stl.gemm_decode(xh, *args[1:])  # autotune outside the capture
        with torch.cuda.graph(graph):
            out = torch.ops.stl.gemm_decode(xh, *args[1:])
        xh.copy_(torch.randn_like(xh))
        graph.replay()
        _check(out, _reference((xh, *args[1:])), torch.bfloat16)
