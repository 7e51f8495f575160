"""TensorRT and torch-tensorrt paths.

TensorRT cannot be installed here, so the builder and the runner are checked against a fake
``tensorrt`` module that implements exactly the documented Python API calls (an undocumented
call fails with AttributeError), the op coverage against the parser's published support table,
and the missing-install errors. Tests needing the real TensorRT skip with that reason.
"""

from __future__ import annotations

import sys
import types
import warnings

import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

import stl_compiler as stl
from stl_compiler.exporters import (
    TensorRTRunner,
    build_tensorrt_engine,
    compile_with_torch_tensorrt,
    export_onnx,
    tensorrt_supported_ops,
    unsupported_tensorrt_ops,
)

try:
    import tensorrt  # noqa: F401

    HAVE_TENSORRT = torch.cuda.is_available()
except ImportError:
    HAVE_TENSORRT = False
NEEDS_TENSORRT = pytest.mark.skipif(
    not HAVE_TENSORRT, reason="needs TensorRT and a CUDA GPU: pip install "
                              "'stl-compiler[tensorrt]' (TensorRT cannot be installed here)")


def _onnx_model(path, elem_type=TensorProto.FLOAT, ops=("MatMul",), domain=""):
    """A small model ``x (batch, 4) → y (batch, 3)`` whose nodes have the given op types."""
    w = helper.make_tensor("w", elem_type, [4, 3], [0.0] * 12)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y0"])]
    for i, op in enumerate(ops[1:]):
        nodes.append(helper.make_node(op, [f"y{i}"], [f"y{i + 1}"], domain=domain))
    nodes.append(helper.make_node("Identity", [f"y{len(ops) - 1}"], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", elem_type,
                                                                          ["batch", 4])],
                              [helper.make_tensor_value_info("y", elem_type, ["batch", 3])], [w])
    opsets = [helper.make_opsetid("", 18)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    onnx.save(helper.make_model(graph, opset_imports=opsets, ir_version=9), path)
    return path


# --- the support table --------------------------------------------------------------------


def test_support_table_names_its_source():
    table = tensorrt_supported_ops()
    assert table["source"].startswith("https://github.com/onnx/onnx-tensorrt/")
    assert table["tensorrt_version"]
    for op in ("MatMul", "Reshape", "Transpose", "Pad", "Slice", "Gemm", "Gelu", "Softmax"):
        assert op in table["supported"]
    assert not set(table["supported"]) & set(table["unsupported"])


def test_unsupported_ops_are_reported(tmp_path):
    assert unsupported_tensorrt_ops(_onnx_model(tmp_path / "ok.onnx", ops=("MatMul", "Relu"))) \
        == {}
    bad = _onnx_model(tmp_path / "bad.onnx", ops=("MatMul", "Unique"))
    assert unsupported_tensorrt_ops(bad) == {"Unique": 1}
    custom = _onnx_model(tmp_path / "custom.onnx", ops=("MatMul", "Encode"), domain="stl")
    assert unsupported_tensorrt_ops(custom) == {"stl::Encode": 1}


def test_stl_model_graph_is_tensorrt_parseable(tmp_path):
    """Every op of an exported STL model (fused sites included) is in the parser's table;
    the ONNX parity tests check the same on every model they export."""
    model = nn.Sequential(nn.Linear(32, 64), nn.SiLU(), nn.Linear(64, 24)).eval()
    example = torch.randn(2, 6, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = stl.STLConfig(basis="strassen", min_dim=1, max_cost_ratio=None)
        compiled = stl.stl_compile(model, (example,), config, backend="eager")
    assert len(compiled.stl_report.converted) == 2
    path = export_onnx(compiled, example, tmp_path / "m.onnx")
    assert unsupported_tensorrt_ops(path) == {}


# --- a fake tensorrt module with the documented API -----------------------------------------


def fake_tensorrt(calls: list, *, fp16_flag: bool = True, parse_ok: bool = True,
                  build_ok: bool = True) -> types.ModuleType:
    """``tensorrt`` as documented ("The Build Phase", TensorRT Python API), recording calls.
    ``fp16_flag=False`` mimics TensorRT 11 (strongly typed only: no BuilderFlag.FP16)."""
    trt = types.ModuleType("tensorrt")

    class Logger:
        WARNING = "WARNING"

        def __init__(self, severity):
            calls.append(("Logger", severity))

    class Tensor:
        def __init__(self, name, shape):
            self.name, self.shape = name, shape

    class Network:
        def __init__(self):
            self.inputs = []

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, index):
            return self.inputs[index]

    class OnnxParser:
        def __init__(self, network, logger):
            calls.append(("OnnxParser",))
            self.network = network
            self.num_errors = 0 if parse_ok else 1

        def parse_from_file(self, path):
            calls.append(("parse_from_file", path))
            for value in onnx.load(path).graph.input:
                dims = tuple(d.dim_value if d.HasField("dim_value") else -1
                             for d in value.type.tensor_type.shape.dim)
                self.network.inputs.append(Tensor(value.name, dims))
            return parse_ok

        def get_error(self, index):
            return "In node 0: unsupported op"

    class Profile:
        def set_shape(self, name, min, opt, max):  # noqa: A002 - the documented names
            calls.append(("set_shape", name, min, opt, max))

    class Config:
        def set_memory_pool_limit(self, pool, size):
            calls.append(("set_memory_pool_limit", pool, size))

        def set_flag(self, flag):
            calls.append(("set_flag", flag))

        def add_optimization_profile(self, profile):
            calls.append(("add_optimization_profile",))

    class Builder:
        def __init__(self, logger):
            calls.append(("Builder",))

        def create_network(self, flags):
            calls.append(("create_network", flags))
            return Network()

        def create_builder_config(self):
            calls.append(("create_builder_config",))
            return Config()

        def create_optimization_profile(self):
            calls.append(("create_optimization_profile",))
            return Profile()

        def build_serialized_network(self, network, config):
            calls.append(("build_serialized_network",))
            return b"fake-plan" if build_ok else None

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, OnnxParser
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
    trt.BuilderFlag = types.SimpleNamespace(**({"FP16": "FP16"} if fp16_flag else {}))
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    return trt


PROFILE = {"min_shapes": {"x": (1, 4)}, "opt_shapes": {"x": (8, 4)},
           "max_shapes": {"x": (32, 4)}}


@pytest.mark.parametrize("elem_type,fp16,strongly_typed", [
    (TensorProto.FLOAT, True, False),  # FP32 model + fp16: weakly typed, BuilderFlag.FP16
    (TensorProto.FLOAT, False, True),
    (TensorProto.FLOAT16, True, True),  # FP16 export: strongly typed, FP16 as exported
])
def test_builder_follows_documented_api(tmp_path, monkeypatch, elem_type, fp16, strongly_typed):
    calls = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(calls))
    onnx_path = _onnx_model(tmp_path / "m.onnx", elem_type=elem_type)
    engine = build_tensorrt_engine(onnx_path, tmp_path / "out" / "m.plan", fp16=fp16,
                                   workspace=1 << 20, **PROFILE)
    assert engine.read_bytes() == b"fake-plan"
    expected = [
        ("Logger", "WARNING"), ("Builder",), ("create_network", 2 if strongly_typed else 0),
        ("OnnxParser",), ("parse_from_file", str(onnx_path)), ("create_builder_config",),
        ("set_memory_pool_limit", "WORKSPACE", 1 << 20),
        *([] if strongly_typed else [("set_flag", "FP16")]),
        ("create_optimization_profile",), ("set_shape", "x", (1, 4), (8, 4), (32, 4)),
        ("add_optimization_profile",), ("build_serialized_network",),
    ]
    assert calls == expected


def test_fp32_model_fp16_needs_fp16_export_on_strongly_typed_tensorrt(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt([], fp16_flag=False))
    with pytest.raises(ValueError, match="dtype=torch.float16"):
        build_tensorrt_engine(_onnx_model(tmp_path / "m.onnx"), tmp_path / "m.plan", **PROFILE)
    assert not (tmp_path / "m.plan").exists()


@pytest.mark.parametrize("profile,match", [
    ({}, "give its shape in min_shapes"),
    ({**PROFILE, "max_shapes": {"x": (32, 5)}}, "does not fit"),
    ({**PROFILE, "min_shapes": {"x": (9, 4)}}, "min <= opt <= max"),
])
def test_bad_profiles(tmp_path, monkeypatch, profile, match):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt([]))
    with pytest.raises(ValueError, match=match):
        build_tensorrt_engine(_onnx_model(tmp_path / "m.onnx"), tmp_path / "m.plan", **profile)
    assert not (tmp_path / "m.plan").exists()


@pytest.mark.parametrize("parse_ok,build_ok,match", [
    (False, True, "(?s)could not parse.*unsupported op"), (True, False, "failed to build")])
def test_parser_and_builder_failures(tmp_path, monkeypatch, parse_ok, build_ok, match):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt([], parse_ok=parse_ok,
                                                               build_ok=build_ok))
    with pytest.raises(RuntimeError, match=match):
        build_tensorrt_engine(_onnx_model(tmp_path / "m.onnx"), tmp_path / "m.plan", **PROFILE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_unparseable_graph_is_refused_before_building(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(calls))
    bad = _onnx_model(tmp_path / "bad.onnx", ops=("MatMul", "Unique"))
    with pytest.raises(ValueError, match="does not support.*Unique"):
        build_tensorrt_engine(bad, tmp_path / "m.plan", **PROFILE)
    assert calls == []


def test_missing_onnx_file(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt([]))
    with pytest.raises(FileNotFoundError, match="ONNX model not found"):
        build_tensorrt_engine(tmp_path / "nope.onnx", tmp_path / "m.plan")


def test_runner_needs_cuda(tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only error")
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt([]))
    engine = tmp_path / "m.plan"
    engine.write_bytes(b"fake-plan")
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        TensorRTRunner(engine)
    with pytest.raises(FileNotFoundError, match="TensorRT engine not found"):
        TensorRTRunner(tmp_path / "missing.plan")


# --- missing installs --------------------------------------------------------------------


def test_missing_tensorrt_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt → ImportError
    onnx_path = _onnx_model(tmp_path / "m.onnx")
    with pytest.raises(ImportError, match=r"stl-compiler\[tensorrt\]"):
        build_tensorrt_engine(onnx_path, tmp_path / "m.plan", **PROFILE)
    engine = tmp_path / "m.plan"
    engine.write_bytes(b"x")
    with pytest.raises(ImportError, match=r"stl-compiler\[tensorrt\]"):
        TensorRTRunner(engine)


def test_stl_compile_tensorrt_backend_without_torch_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)
    model = nn.Sequential(nn.Linear(32, 32)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ImportError, match=r"stl-compiler\[tensorrt\]"):
            stl.stl_compile(model, (torch.randn(2, 6, 32),), stl.STLConfig(min_dim=1),
                            backend="tensorrt")


def test_torch_tensorrt_gets_a_plain_aten_program(monkeypatch):
    received = {}

    def compile(program, **options):  # noqa: A001 - torch_tensorrt.dynamo.compile
        received.update(options, program=program)
        return "trt-module"

    fake = types.ModuleType("torch_tensorrt")
    fake.dynamo = types.SimpleNamespace(compile=compile)
    monkeypatch.setitem(sys.modules, "torch_tensorrt", fake)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)).eval()
    config = stl.STLConfig(basis="strassen", min_dim=1, max_cost_ratio=None)
    assert set(stl.swap_linears_(model, config).values()) == {"converted"}
    x = torch.randn(2, 6, 32)
    assert compile_with_torch_tensorrt(model, (x,), workspace_size=1 << 20) == "trt-module"
    targets = {str(n.target) for n in received["program"].graph.nodes
               if n.op == "call_function"}
    assert not [t for t in targets if t.startswith("stl.")], targets
    assert received["arg_inputs"] == [x] and received["workspace_size"] == 1 << 20


# --- with the real TensorRT (skipped here) -------------------------------------------------


@NEEDS_TENSORRT
def test_real_engine_matches_torch(tmp_path):
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 24)).eval()
    stl.swap_linears_(model, stl.STLConfig(basis="strassen", min_dim=1, max_cost_ratio=None))
    path = export_onnx(model, torch.randn(2, 6, 32), tmp_path / "m.onnx")
    engine = build_tensorrt_engine(path, tmp_path / "m.plan", fp16=False,
                                   min_shapes={"input": (1, 1, 32)},
                                   opt_shapes={"input": (4, 16, 32)},
                                   max_shapes={"input": (8, 64, 32)})
    x = torch.randn(3, 7, 32)
    (got,) = TensorRTRunner(engine)(x.cuda()).values()
    with torch.no_grad():
        want = model(x)
    assert (got.cpu() - want).norm() / want.norm() < 1e-3
