"""stl_compiler.runtime.ort_session: providers, optimized model, checked inputs."""

from __future__ import annotations

import logging
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper

from stl_compiler.runtime import ORTSession, ort_session


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """``y = x @ w + ids[:, None]``: a float input (batch, 4) and an int64 input (batch,)."""
    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]),
         helper.make_node("Unsqueeze", ["ids", "axes"], ["ids2"]),
         helper.make_node("Cast", ["ids2"], ["idsf"], to=TensorProto.FLOAT),
         helper.make_node("Add", ["xw", "idsf"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor("w", TensorProto.FLOAT, [4, 3], w.flatten()),
         helper.make_tensor("axes", TensorProto.INT64, [1], [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    path = tmp_path_factory.mktemp("ort") / "m.onnx"
    onnx.save(model, path)
    return path


def _expected(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return x @ torch.arange(12, dtype=torch.float32).reshape(4, 3) + ids[:, None].float()


def test_runs_with_torch_and_numpy_inputs(model_path, caplog):
    with caplog.at_level(logging.INFO, logger="stl_compiler.runtime.ort"):
        session = ort_session(model_path)
    assert session.provider == "CPUExecutionProvider"  # the only one in this onnxruntime
    assert "CPUExecutionProvider" in caplog.text
    assert "x: float32['batch', 4]" in repr(session)
    x, ids = torch.randn(5, 4), torch.arange(5)
    (y,) = session.run(x, ids)
    assert isinstance(y, torch.Tensor) and torch.allclose(y, _expected(x, ids))
    (y,) = session(ids=ids.numpy(), x=x.numpy())
    assert torch.allclose(y, _expected(x, ids))


def test_prefers_tensorrt_then_cuda(model_path, monkeypatch):
    seen = {}

    class FakeSession:
        def __init__(self, path, options, providers, disabled_optimizers):
            seen["providers"] = providers

        def get_providers(self):
            return seen["providers"]

        def get_inputs(self):
            return []

        get_outputs = get_inputs

    available = ["CUDAExecutionProvider", "CPUExecutionProvider", "AzureExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: available)
    monkeypatch.setattr(onnxruntime, "InferenceSession", FakeSession)
    session = ort_session(model_path)
    assert seen["providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert session.provider == "CUDAExecutionProvider"
    available.insert(0, "TensorrtExecutionProvider")
    assert ort_session(model_path).provider == "TensorrtExecutionProvider"


def test_unavailable_provider(model_path):
    with pytest.raises(ValueError, match="not available.*CPUExecutionProvider"):
        ort_session(model_path, providers=["CUDAExecutionProvider"])


def test_saves_optimized_model(model_path, tmp_path):
    out = tmp_path / "sub" / "optimized.onnx"
    session = ort_session(model_path, optimized_model_path=out, optimization_level="extended")
    assert isinstance(session, ORTSession)
    onnx.checker.check_model(onnx.load(out))
    assert [p.name for p in tmp_path.joinpath("sub").iterdir()] == ["optimized.onnx"]


def test_missing_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="ONNX model not found"):
        ort_session(tmp_path / "nope.onnx")


def test_bad_optimization_level(model_path):
    with pytest.raises(ValueError, match="optimization_level"):
        ort_session(model_path, optimization_level="max")


@pytest.mark.parametrize("inputs,named,error,match", [
    ((torch.randn(5, 4, 1), torch.arange(5)), {}, ValueError, r"'x' must have rank 2 \(batch, 4\)"),
    ((torch.randn(5, 3), torch.arange(5)), {}, ValueError, "'x' dim 1 must be 4"),
    ((torch.randn(5, 4).double(), torch.arange(5)), {}, TypeError,
     "'x' must have dtype float32, got float64"),
    ((torch.randn(5, 4), torch.arange(5).int()), {}, TypeError,
     r"'ids' must have dtype int64, got int32.*torch.int64"),
    ((torch.randn(5, 4),), {}, ValueError, r"missing model inputs \['ids'\]"),
    ((torch.randn(5, 4), torch.arange(5), 1), {}, ValueError, "takes 2 inputs"),
    ((torch.randn(5, 4), torch.arange(5)), {"mask": 1}, ValueError, "no input 'mask'"),
    ((torch.randn(5, 4), torch.arange(5)), {"x": 1}, ValueError, "both positionally"),
    (([[0.0] * 4], torch.arange(1)), {}, TypeError, "torch.Tensor or numpy array"),
])
def test_bad_run_inputs(model_path, inputs, named, error, match):
    with pytest.raises(error, match=match):
        ort_session(model_path).run(*inputs, **named)


@pytest.mark.parametrize("content,match", [
    (b"def make():\n    return 1\n", "is not an ONNX model .it does not parse as one"),
    (b"", "is not an ONNX model .it holds no graph"),
])
def test_not_an_onnx_file(tmp_path, content, match):
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match) as error:
        ort_session(path)
    assert str(path) in str(error.value) and "export_onnx" in str(error.value)


def test_onnx_runtime_load_errors_name_the_file(model_path, tmp_path, monkeypatch):
    """Without the onnx package the file reaches ONNX Runtime, whose parse error is also
    reported as a ValueError naming the file."""
    monkeypatch.setitem(sys.modules, "onnx", None)
    path = tmp_path / "bad.onnx"
    path.write_bytes(b"\x08\x07garbage")
    with pytest.raises(ValueError, match=f"ONNX Runtime cannot load {path} as a model"):
        ort_session(path)
    assert ort_session(model_path).provider == "CPUExecutionProvider"


_HALF_BERT = """
import warnings, torch, transformers as tf
import stl_compiler as stl
from stl_compiler.exporters import export_onnx
from stl_compiler.runtime import ort_session
warnings.simplefilter("ignore")
torch.manual_seed(0)
model = tf.BertModel(tf.BertConfig(hidden_size=256, num_hidden_layers=1, num_attention_heads=4,
                                   intermediate_size=1024, vocab_size=100,
                                   attn_implementation="sdpa")).eval()
stl.swap_linears_(model, stl.STLConfig(rank=24, targets=("linear",)))
tokens = torch.randint(0, 100, (2, 16))
with torch.no_grad():
    reference = model(tokens).last_hidden_state
path = export_onnx(model, (tokens,), "{path}", dynamic_shapes=None, dtype=torch.float16)
out = ort_session(path, ["CPUExecutionProvider"]).run(tokens)[0]
error = float((out.double() - reference.double()).norm() / reference.double().norm())
assert out.dtype == torch.float16 and error < 2e-2, error
print("ran", error)
"""


def test_float16_model_with_integer_inputs_opens_at_level_all(tmp_path):
    # onnxruntime's CPU NCHWc pass segfaults on this graph (float16 weights behind int64 token
    # ids, so no float16 input); in a child process, so that a crash fails the test only.
    import subprocess

    pytest.importorskip("transformers")
    script = _HALF_BERT.replace("{path}", str(tmp_path / "bert16.onnx"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "ran" in done.stdout, (done.returncode, done.stderr[-2000:])
