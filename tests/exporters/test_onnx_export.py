"""ONNX export of STL models (swap_linears_ and stl_compile output, fused and unfused) and
ONNX Runtime parity; graph structure (folded constants, no custom ops); options; bad input."""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import warnings

import onnx
import pytest
import torch
from stl_helpers import rel_err
from torch import nn

import stl_compiler as stl
from stl_compiler.exporters import export_onnx, onnx_op_types, unsupported_tensorrt_ops
from stl_compiler.exporters._program import export_program, unwrap
from stl_compiler.models import MLP, DecoderLM, ViTEncoder
from stl_compiler.runtime import ort_session
from stl_compiler.runtime.ops import decode, encode

TOL = 1e-4  # float32 relative error, ORT vs the torch STL module
# max_cost_ratio=None: convert whatever it costs (these tiny models cost more in STL than
# dense); the tests check the export, not the cost guard. RANK24 tiles tokens on the causal
# decoder too (allow_non_causal): the export, not causality (tests/test_causality.py).
EXACT = stl.STLConfig(basis="strassen", tile=4, min_dim=1, max_cost_ratio=None)
RANK24 = stl.STLConfig(basis="random", tile=4, rank=24, min_dim=1, max_cost_ratio=None,
                       row_grouping="tokens", allow_non_causal=True)


def mlp() -> MLP:
    return MLP([32, 64, 24]).eval()


def _tokens(batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, 64, (batch, seq))


#: The repo's models (stl_compiler.models), one block deep: name → (model, inputs(batch, seq),
#: whether attention is SDPA).
MODELS = {
    "mlp": (lambda: MLP([32, 64, 48, 16], ["gelu", "relu"]),
            lambda b, s: (torch.randn(b, s, 32),), False),
    "vit": (lambda: ViTEncoder(image_size=16, patch=4, dim=32, depth=1, heads=2, mlp_dim=64),
            lambda b, s: (torch.randn(b, 3, 16, 16),), False),
    "decoder": (lambda: DecoderLM(vocab=64, dim=32, depth=1, heads=2, kv_heads=1, mlp_dim=64),
                lambda b, s: (_tokens(b, s),), True),
}


def _ort_vs_torch(path, module, *inputs) -> float:
    (got,) = ort_session(path).run(*inputs)
    with torch.no_grad():
        want = module(*inputs)
    return rel_err(got, want)


def _converted(model: nn.Module, config: stl.STLConfig) -> nn.Module:
    stl.swap_linears_(model, config)
    return model.eval()


@pytest.fixture(scope="module")
def exact_mlp(tmp_path_factory):
    """``(dense MLP, its exact-basis STL conversion, that model's ONNX path)``, shared."""
    dense = mlp()
    model = _converted(copy.deepcopy(dense), EXACT)
    path = export_onnx(model, torch.randn(2, 6, 32), tmp_path_factory.mktemp("mlp") / "m.onnx")
    return dense, model, path


def test_mlp_swap_linears_parity(exact_mlp):
    dense, model, path = exact_mlp
    for shape in [(3, 7, 32), (5, 13, 32), (1, 4, 32)]:
        x = torch.randn(shape)
        assert _ort_vs_torch(path, model, x) < TOL
        assert _ort_vs_torch(path, dense, x) < TOL  # an exact basis keeps the dense outputs
    ops = onnx_op_types(path)
    assert all("::" not in op for op in ops), ops  # standard domain only
    assert "MatMul" in ops


# --- stl_compile output, fused and unfused ----------------------------------------------


def _stl_compile(model: nn.Module, args: tuple, config: stl.STLConfig, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "converted nothing" is checked below instead
        compiled = stl.stl_compile(model, args, config, backend="eager", **kwargs)
    assert compiled.stl_report.converted
    return compiled


@pytest.mark.parametrize("name,config,fuse", [
    ("mlp", EXACT, True), ("mlp", RANK24, False), ("vit", EXACT, True), ("vit", RANK24, False),
    ("decoder", RANK24, True),
], ids=["mlp-strassen-fused", "mlp-rank24-unfused", "vit-strassen-fused",
        "vit-rank24-unfused", "decoder-rank24-fused"])
def test_stl_compile_eager_parity(tmp_path, name, config, fuse):
    """The repo's models through stl_compile(backend="eager"), exported, in ORT."""
    build, inputs, uses_sdpa = MODELS[name]
    dense = build().eval()
    # The exact basis converts every matmul (attention too); rank 24 the linear layers
    # only, so that swap_linears_ (eager, any input shape) gives the same model.
    config = dataclasses.replace(
        config, fuse=fuse, decompose_sdpa=uses_sdpa,
        targets=("linear", "matmul") if config is EXACT else ("linear",))
    example = inputs(2, 6)
    compiled = _stl_compile(dense, example, config)
    fused_ops = {"stl.decode_act_encode.default", "stl.decode_glu_encode.default",
                 "stl.reencode.default", "stl.decode_norm_encode.default"}
    targets = {str(n.target) for n in compiled.graph.nodes}
    assert bool(fused_ops & targets) == fuse
    # Fused, every block's residual + norm (and with the exact basis, softmax) is a row strip.
    assert ("stl.decode_norm_encode.default" in targets) == (fuse and name != "mlp")
    assert ("stl.decode_softmax_encode.default" in targets) == (fuse and name == "vit")
    path = export_onnx(compiled, example, tmp_path / f"{name}.onnx")
    assert all("::" not in op for op in onnx_op_types(path))
    assert unsupported_tensorrt_ops(path) == {}
    # The GraphModule's own shape guards admit shapes like the example's only; the ONNX
    # graph takes any: there the reference is the dense model (exact basis) or swap_linears_.
    assert _ort_vs_torch(path, compiled, *inputs(3, 7)) < TOL
    eager = dense if config.basis == "strassen" else _converted(copy.deepcopy(dense), config)
    for batch, seq in [(5, 13), (1, 2), (4, 8)]:
        assert _ort_vs_torch(path, eager, *inputs(batch, seq)) < TOL


def test_algebraic_boundary_has_no_decoded_tensor(tmp_path):
    """Linear → Linear with tile-aligned static shapes fuses algebraically (paper Alg. 2): the
    decode of the first and the encode of the second become one r×r matrix, which the
    exporter folds into a constant: no decoded tensor between the two sites."""
    dense = nn.Sequential(nn.Linear(32, 64, bias=False), nn.Linear(64, 16, bias=False)).eval()
    example = torch.randn(2, 8, 32)
    compiled = _stl_compile(dense, (example,), EXACT, dynamic_shapes=None)
    assert [b.kind for b in compiled.stl_report.boundaries] == ["algebraic"]
    path = export_onnx(compiled, example, tmp_path / "pair.onnx", dynamic_shapes=None)
    assert _ort_vs_torch(path, compiled, example) < TOL
    assert _ort_vs_torch(path, dense, example) < TOL
    # encode x, GEMM, re-encode (r×r), GEMM, decode; unfused: ..., decode, encode, ...
    assert onnx_op_types(path)["MatMul"] == 5
    graph = onnx.load(str(path)).graph
    rank = compiled.stl_report.converted[0].rank
    assert [i for i in graph.initializer if list(i.dims) == [rank, rank]], \
        "the r×r re-encoding matrix was not folded into an initializer"
    decoded = [v.name for v in graph.value_info
               if [d.dim_value for d in v.type.tensor_type.shape.dim] == [2, 8, 64]]
    assert not decoded, f"the decoded (2, 8, 64) hidden activation is in the graph: {decoded}"


class EncodesWeightAtRunTime(nn.Module):
    """A site whose weight is encoded in forward (``encode(Wᵀ, ew)``): export must store the
    encoded weight, not the dense one."""

    def __init__(self, basis: stl.STLBasis, d_in: int = 128, d_out: int = 256) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in))
        ex, ew, d = basis.to(torch.float32)
        self.register_buffer("ex", ex)
        self.register_buffer("ew", ew)
        self.register_buffer("d", d)
        self.tile = basis.tile

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tile
        w_encoded = encode(self.weight.t(), self.ew, t)
        return decode(encode(x, self.ex, t) @ w_encoded.unsqueeze(1), self.d, t, x.shape[-2],
                      self.weight.shape[0])


def test_weights_stored_pre_encoded(tmp_path):
    basis = stl.bases.strassen(4)
    model = EncodesWeightAtRunTime(basis).eval()  # 32k weights: above the optimizer's
    example = torch.randn(2, 8, 128)               # default folding limit (8k inputs)
    path = export_onnx(model, example, tmp_path / "w.onnx",
                       dynamic_shapes=({0: torch.export.Dim.AUTO},))
    shapes = [[d for d in i.dims if d != 1] for i in onnx.load(str(path)).graph.initializer]
    assert [basis.rank, 128 // 4, 256 // 4] in shapes
    assert [256, 128] not in shapes and [128, 256] not in shapes
    assert _ort_vs_torch(path, model, torch.randn(5, 8, 128)) < TOL


# --- options ---------------------------------------------------------------------------


def test_graph_io_names_dims_and_checker(exact_mlp):
    _, _, path = exact_mlp
    onnx.checker.check_model(str(path), full_check=True)
    graph = onnx.load(str(path)).graph

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    assert [(v.name, dims(v)) for v in graph.input] == [("x", ["batch", "sequence", 32])]
    assert [(v.name, dims(v)) for v in graph.output] == [("output", ["batch", "sequence", 24])]
    assert not [i for i in graph.initializer if list(i.dims) == [24, 64]]  # no dense weight


def test_static_shapes(tmp_path):
    path = export_onnx(nn.Linear(8, 4), torch.randn(2, 6, 8), tmp_path / "m.onnx",
                       dynamic_shapes=None)
    (value,) = onnx.load(str(path)).graph.input
    assert [d.dim_value for d in value.type.tensor_type.shape.dim] == [2, 6, 8]


def test_size_one_example_dims_warn(exact_mlp):
    with pytest.warns(UserWarning, match="size 1"):
        export_program(exact_mlp[1], torch.randn(1, 6, 32))


def test_fp16_export(tmp_path, exact_mlp):
    model = exact_mlp[1]
    example = torch.randn(2, 6, 32)
    path = export_onnx(model, example, tmp_path / "half.onnx", dtype=torch.float16)
    graph = onnx.load(str(path)).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert {i.data_type for i in graph.initializer if i.data_type in (1, 10)} == \
        {onnx.TensorProto.FLOAT16}
    assert next(model.parameters()).dtype == torch.float32  # the caller's module is untouched
    x = torch.randn(3, 5, 32)
    (got,) = ort_session(path).run(x.half())
    assert got.dtype == torch.float16
    with torch.no_grad():
        assert rel_err(got.float(), model(x)) < 5e-3


def test_external_data(tmp_path):
    model = nn.Linear(32, 16)
    path = export_onnx(model, torch.randn(2, 6, 32), tmp_path / "ext.onnx", external_data=True)
    assert sorted(os.listdir(tmp_path)) == ["ext.onnx", "ext.onnx.data"]
    graph = onnx.load(str(path), load_external_data=False).graph
    assert onnx.TensorProto.EXTERNAL in {i.data_location for i in graph.initializer}
    onnx.checker.check_model(str(path), full_check=True)
    assert _ort_vs_torch(path, model, torch.randn(3, 7, 32)) < TOL


def test_unwraps_torch_compile_wrapper(exact_mlp):
    model = exact_mlp[1]
    assert unwrap(torch.compile(model)) is model
    with pytest.raises(TypeError, match="nn.Module"):
        unwrap(lambda x: x)


# --- bad input: clear errors, nothing half-written --------------------------------------


def test_unwritable_directory(tmp_path, exact_mlp):
    model = exact_mlp[1]
    if os.geteuid() == 0:  # root writes through permission bits: use a read-only fs
        target = "/proc/stl-compiler-test/m.onnx"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "m.onnx"
    with pytest.raises(PermissionError, match="output directory"):
        export_onnx(model, torch.randn(2, 6, 32), target)
    assert not os.path.exists(target)


def test_failed_export_leaves_nothing(tmp_path):
    class Broken(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.export refuses it
                return x
            return -x

    with pytest.raises(Exception):  # noqa: B017 - torch.export's own error type
        export_onnx(Broken(), torch.randn(2, 6, 32), tmp_path / "b.onnx")
    assert os.listdir(tmp_path) == []


def test_failure_after_writing_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous")

    def failing_check(*args, **kwargs):
        raise onnx.checker.ValidationError("simulated checker failure")

    monkeypatch.setattr(onnx.checker, "check_model", failing_check)
    with pytest.raises(onnx.checker.ValidationError):
        export_onnx(nn.Linear(8, 4), torch.randn(2, 6, 8), path)
    assert path.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["m.onnx"]


def test_op_types_of_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="ONNX model not found"):
        onnx_op_types(tmp_path / "missing.onnx")


@torch.library.custom_op("stl_exporter_test::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    return 2 * x


@_twice.register_fake
def _(x):
    return torch.empty_like(x)


def test_custom_op_without_decomposition(tmp_path):
    class UsesCustomOp(nn.Module):
        def forward(self, x):
            return _twice(x)

    with pytest.raises(RuntimeError, match="no aten decomposition.*stl_exporter_test.twice"):
        export_onnx(UsesCustomOp(), torch.randn(2, 6, 8), tmp_path / "c.onnx")
    assert os.listdir(tmp_path) == []


def test_output_path_is_a_directory(tmp_path):
    (tmp_path / "model.onnx").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        export_onnx(nn.Linear(8, 4), torch.randn(2, 6, 8), tmp_path / "model.onnx")
    assert os.listdir(tmp_path) == ["model.onnx"]


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, "float16"])
def test_unsupported_dtype(tmp_path, dtype):
    with pytest.raises(ValueError, match=r"dtype must be one of torch.float32, torch.float16, "
                                         r"torch.bfloat16, torch.float64 .*got"):
        export_onnx(nn.Linear(8, 4), torch.randn(2, 6, 8), tmp_path / "m.onnx", dtype=dtype)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("opset", [7, 17, 99, True, "18"])
def test_unsupported_opset(tmp_path, opset):
    with pytest.raises(ValueError, match=r"opset must be an int from 18 to \d+ .*got"):
        export_onnx(nn.Linear(8, 4), torch.randn(2, 6, 8), tmp_path / "m.onnx", opset=opset)
    assert os.listdir(tmp_path) == []


def test_opset_fallback_is_an_error(tmp_path, monkeypatch):
    """torch writes its lowest opset when asked for a lower one, with only a log line: if
    that ever happens for an opset we accept, export_onnx refuses instead of lying."""
    monkeypatch.setattr("stl_compiler.exporters.onnx.supported_opsets", lambda: range(17, 24))
    padding = nn.ConstantPad1d((0, 3), 0.0)  # Pad (as in STL sites): no opset-17 adapter
    with pytest.raises(RuntimeError, match="wrote opset 18 instead of the requested 17"):
        export_onnx(padding, torch.randn(2, 6, 8), tmp_path / "m.onnx", opset=17)
    assert os.listdir(tmp_path) == []


def test_example_the_model_cannot_run(tmp_path):
    """The eager error, not torch.export's symbolic-shape puzzle; nothing written."""
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU())
    with pytest.raises(ValueError, match=r"the model fails on the example input \(input: "
                                         r"float32\[2, 6, 31\]\): RuntimeError: mat1 and mat2 "
                                         r"shapes cannot be multiplied") as error:
        export_onnx(model, torch.randn(2, 6, 31), tmp_path / "m.onnx")
    assert isinstance(error.value.__cause__, RuntimeError)
    with pytest.raises(ValueError, match=r"\(input 0: float32\[2, 6, 32\], input 1: "
                                         r"float32\[2, 6, 32\]\) do not fit Sequential.forward"
                                         r"\(input\): too many positional arguments"):
        export_onnx(model, (torch.randn(2, 6, 32), torch.randn(2, 6, 32)), tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []
    assert model.training  # the eager check leaves the caller's mode as it was


class WarnsInForward(nn.Linear):
    def forward(self, x):
        warnings.warn("the model's own warning", UserWarning, stacklevel=2)
        return super().forward(x)


def test_torch_internal_chatter_is_muted(tmp_path):
    """torch's pytree FutureWarning and the exporter's torchvision log lines are dropped;
    the model's own warnings still show."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    registration.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            export_onnx(WarnsInForward(8, 4), torch.randn(2, 6, 8), tmp_path / "m.onnx")
    finally:
        registration.removeHandler(handler)
    messages = [str(w.message) for w in caught]
    assert "the model's own warning" in messages
    assert not [m for m in messages if "LeafSpec" in m], messages
    assert not [r for r in records if "torchvision" in r.getMessage()]
