"""Triton Inference Server model repositories."""

from __future__ import annotations

import os

import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from stl_compiler.exporters import export_onnx, write_triton_model_repository


def _model(path, batch_dim="batch"):
    """ids (batch, sequence) int64 and x (batch, sequence, 4) float → y (batch, sequence, 3)."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]),
         helper.make_node("Unsqueeze", ["ids", "axes"], ["ids3"]),
         helper.make_node("Cast", ["ids3"], ["idsf"], to=TensorProto.FLOAT),
         helper.make_node("Add", ["xw", "idsf"], ["y"])], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [batch_dim, "sequence"]),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch_dim, "sequence", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch_dim, "sequence", 3])],
        [helper.make_tensor("w", TensorProto.FLOAT, [4, 3], [0.0] * 12),
         helper.make_tensor("axes", TensorProto.INT64, [1], [2])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


BATCHED_CONFIG = '''name: "stl_model"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [
  {
    name: "ids"
    data_type: TYPE_INT64
    dims: [ -1 ]
  },
  {
    name: "x"
    data_type: TYPE_FP32
    dims: [ -1, 4 ]
  }
]
output [
  {
    name: "y"
    data_type: TYPE_FP32
    dims: [ -1, 3 ]
  }
]
dynamic_batching { }
'''


def test_onnx_repository_with_dynamic_batching(tmp_path):
    model = _model(tmp_path / "m.onnx")
    target = write_triton_model_repository(model, tmp_path / "repo", "stl_model")
    assert target == tmp_path / "repo" / "stl_model"
    assert sorted(os.listdir(target)) == ["1", "config.pbtxt"]
    assert (target / "config.pbtxt").read_text() == BATCHED_CONFIG
    assert (target / "1" / "model.onnx").read_bytes() == model.read_bytes()
    assert os.listdir(tmp_path / "repo") == ["stl_model"]  # no staging leftovers


def test_static_batch_disables_batching(tmp_path):
    model = _model(tmp_path / "m.onnx", batch_dim=2)
    target = write_triton_model_repository(model, tmp_path, "static", version=3,
                                           instance_kind="KIND_GPU")
    config = (target / "config.pbtxt").read_text()
    assert "max_batch_size: 0\n" in config and "dims: [ 2, -1, 4 ]" in config
    assert "dynamic_batching" not in config
    assert "kind: KIND_GPU" in config
    assert (target / "3" / "model.onnx").is_file()
    with pytest.raises(ValueError, match="dynamic batch axis"):
        write_triton_model_repository(model, tmp_path, "other", max_batch_size=4)


def test_external_data_files_are_copied(tmp_path):
    model = export_onnx(nn.Linear(32, 16), torch.randn(2, 6, 32), tmp_path / "ext.onnx",
                        external_data=True)
    target = write_triton_model_repository(model, tmp_path / "repo", "ext")
    assert sorted(os.listdir(target / "1")) == ["ext.onnx.data", "model.onnx"]
    onnx.checker.check_model(str(target / "1" / "model.onnx"), full_check=True)
    config = (target / "config.pbtxt").read_text()
    assert 'name: "input"' in config and "dims: [ -1, 32 ]" in config
    assert 'name: "output"' in config and "dims: [ -1, 16 ]" in config


def test_tensorrt_plan_repository(tmp_path):
    model = _model(tmp_path / "m.onnx")
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"engine")
    with pytest.raises(ValueError, match="onnx_path"):
        write_triton_model_repository(plan, tmp_path / "repo", "trt")
    target = write_triton_model_repository(plan, tmp_path / "repo", "trt", onnx_path=model)
    assert 'platform: "tensorrt_plan"' in (target / "config.pbtxt").read_text()
    assert (target / "1" / "model.plan").read_bytes() == b"engine"


def test_existing_model_needs_overwrite(tmp_path):
    model = _model(tmp_path / "m.onnx")
    target = write_triton_model_repository(model, tmp_path / "repo", "m")
    (target / "stale.txt").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_triton_model_repository(model, tmp_path / "repo", "m")
    assert (target / "stale.txt").exists()
    write_triton_model_repository(model, tmp_path / "repo", "m", overwrite=True)
    assert sorted(os.listdir(target)) == ["1", "config.pbtxt"]
    assert os.listdir(tmp_path / "repo") == ["m"]


@pytest.mark.parametrize("name,model,match", [
    ("m", "missing.onnx", "model not found"),
    ("m", "model.bin", r"\.onnx, \.plan or \.engine"),
    ("../m", "m.onnx", "plain directory name"),
])
def test_bad_arguments(tmp_path, name, model, match):
    _model(tmp_path / "m.onnx")
    (tmp_path / "model.bin").write_bytes(b"")
    error = FileNotFoundError if "not found" in match else ValueError
    with pytest.raises(error, match=match):
        write_triton_model_repository(tmp_path / model, tmp_path / "repo", name)
    assert not (tmp_path / "repo").exists()
