"""Triton Inference Server model repositories for exported STL models.

Layout written (``repo_dir/name``)::

    name/
      config.pbtxt
      1/model.onnx        (platform onnxruntime_onnx; external data files copied beside it)
      1/model.plan        (or: platform tensorrt_plan)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .._files import existing_file, staged

__all__ = ["write_triton_model_repository"]

#: ONNX tensor element types → Triton data types.
_TRITON_TYPES = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 5: "TYPE_INT16",
                 6: "TYPE_INT32", 7: "TYPE_INT64", 9: "TYPE_BOOL", 10: "TYPE_FP16",
                 11: "TYPE_FP64", 16: "TYPE_BF16"}
_PLATFORMS = {".onnx": ("onnxruntime_onnx", "model.onnx"),
              ".plan": ("tensorrt_plan", "model.plan"),
              ".engine": ("tensorrt_plan", "model.plan")}
DEFAULT_MAX_BATCH_SIZE = 8


def write_triton_model_repository(model_path: str | os.PathLike, repo_dir: str | os.PathLike,
                                  name: str, *, onnx_path: str | os.PathLike | None = None,
                                  max_batch_size: int | None = None, version: int = 1,
                                  instance_kind: str | None = None,
                                  overwrite: bool = False) -> Path:
    """Write ``repo_dir/name`` for Triton: ``config.pbtxt`` and ``<version>/model.*``.

    Input and output names, types and dims are read from the ONNX model (for a TensorRT
    ``.plan``, from ``onnx_path``, the model the engine was built from).

    Args:
        model_path: an ``.onnx`` model or a TensorRT ``.plan`` / ``.engine``.
        repo_dir: the model repository (created if needed).
        name: the model name (directory and ``name:`` in the config).
        onnx_path: the source ONNX model of a ``.plan`` (required then).
        max_batch_size: Triton batching. Default: 8 with ``dynamic_batching`` when dim 0 of
            every input and output is dynamic (the batch axis of ``export_onnx``), otherwise
            0 (no batching; full shapes in the config). With a TensorRT engine keep it at most
            the engine profile's max batch.
        version: the version subdirectory.
        instance_kind: e.g. "KIND_GPU" or "KIND_CPU"; default: Triton's choice.
        overwrite: replace an existing ``repo_dir/name`` (otherwise FileExistsError).

    Returns:
        The model directory ``repo_dir/name``.
    """
    model_path = existing_file(model_path, "model")
    if model_path.suffix not in _PLATFORMS:
        raise ValueError(f"model must be an .onnx, .plan or .engine file, got {model_path}")
    if not name or Path(name).name != name or name.startswith("."):
        raise ValueError(f"name must be a plain directory name, got {name!r}")
    if version < 1:
        raise ValueError(f"version must be >= 1, got {version}")
    platform, filename = _PLATFORMS[model_path.suffix]
    if platform == "tensorrt_plan":
        if onnx_path is None:
            raise ValueError("a TensorRT engine's inputs and outputs are read from the ONNX "
                             "model it was built from: pass onnx_path")
        onnx_path = existing_file(onnx_path, "ONNX model")
    else:
        onnx_path = model_path
    target = Path(repo_dir) / name
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it")
    inputs, outputs, data_files = _onnx_signature(onnx_path)
    batchable = all(dims and dims[0] == -1 for _, _, dims in inputs + outputs)
    if max_batch_size is None:
        max_batch_size = DEFAULT_MAX_BATCH_SIZE if batchable else 0
    elif max_batch_size > 0 and not batchable:
        raise ValueError(f"max_batch_size={max_batch_size} needs dim 0 of every input and "
                         f"output to be a dynamic batch axis; {onnx_path} has static ones")
    config = _config_text(name, platform, max_batch_size, inputs, outputs, instance_kind)
    with staged(target) as model_dir:
        version_dir = model_dir / str(version)
        version_dir.mkdir(parents=True)
        shutil.copyfile(model_path, version_dir / filename)
        if platform == "onnxruntime_onnx":
            for data_file in data_files:
                shutil.copyfile(model_path.parent / data_file, version_dir / data_file)
        (model_dir / "config.pbtxt").write_text(config)
    return target


def _onnx_signature(path: Path) -> tuple[list, list, list[str]]:
    """``([(name, triton type, dims)] for inputs, same for outputs, external data files)``."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}

    def describe(value) -> tuple[str, str, list[int]]:
        tensor = value.type.tensor_type
        if tensor.elem_type not in _TRITON_TYPES:
            raise ValueError(f"{value.name!r} has an ONNX element type ({tensor.elem_type}) "
                             "Triton does not support")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        return value.name, _TRITON_TYPES[tensor.elem_type], dims

    inputs = [describe(v) for v in model.graph.input if v.name not in initializers]
    outputs = [describe(v) for v in model.graph.output]
    data_files = sorted({entry.value for init in model.graph.initializer
                         if init.data_location == onnx.TensorProto.EXTERNAL
                         for entry in init.external_data if entry.key == "location"})
    return inputs, outputs, data_files


def _config_text(name: str, platform: str, max_batch_size: int, inputs: list, outputs: list,
                 instance_kind: str | None) -> str:
    def tensors(kind: str, items: list) -> str:
        entries = []
        for tensor_name, data_type, dims in items:
            shown = dims[1:] if max_batch_size > 0 else dims
            entries.append(f'  {{\n    name: "{tensor_name}"\n    data_type: {data_type}\n'
                           f'    dims: [ {", ".join(map(str, shown))} ]\n  }}')
        return f"{kind} [\n" + ",\n".join(entries) + "\n]\n"

    text = (f'name: "{name}"\nplatform: "{platform}"\nmax_batch_size: {max_batch_size}\n'
            + tensors("input", inputs) + tensors("output", outputs))
    if max_batch_size > 0:
        text += "dynamic_batching { }\n"
    if instance_kind:
        text += f"instance_group [\n  {{\n    count: 1\n    kind: {instance_kind}\n  }}\n]\n"
    return text
