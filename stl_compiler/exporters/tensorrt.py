"""TensorRT: engines built from our ONNX export, a runner, and the torch-tensorrt backend.

STL sites reach TensorRT as standard ONNX ops (or plain aten ops for torch-tensorrt), so no
plugin is needed. TensorRT is optional: it is imported only when used, and a missing install
raises an ImportError naming the extra to install (``stl-compiler[tensorrt]``).

The builder follows the TensorRT Python API ("The Build Phase" of the TensorRT developer
guide): ``Builder`` → ``create_network`` → ``OnnxParser.parse_from_file`` →
``create_builder_config`` / ``set_memory_pool_limit`` / an optimization profile →
``build_serialized_network``. Networks are strongly typed (TensorRT >= 10.12; the only mode of
TensorRT 11): an FP16 engine comes from an FP16 ONNX model (``export_onnx(...,
dtype=torch.float16)``); with an FP32 model and ``fp16=True`` the builder uses the weakly typed
``BuilderFlag.FP16`` path where the installed TensorRT still has it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .._files import existing_file, output_file, staged
from ._program import as_args, export_program

__all__ = [
    "TensorRTRunner",
    "build_tensorrt_engine",
    "compile_with_torch_tensorrt",
    "tensorrt_supported_ops",
    "unsupported_tensorrt_ops",
]

_INSTALL_HINT = "pip install 'stl-compiler[tensorrt]' (needs an NVIDIA GPU and CUDA)"


def _import_tensorrt():
    try:
        import tensorrt
    except ImportError as err:
        raise ImportError(f"TensorRT is not installed: {_INSTALL_HINT}") from err
    return tensorrt


def _import_torch_tensorrt():
    try:
        import torch_tensorrt
    except ImportError as err:
        raise ImportError(f"torch-tensorrt is not installed: {_INSTALL_HINT}") from err
    return torch_tensorrt


def tensorrt_supported_ops() -> dict[str, Any]:
    """TensorRT's ONNX-parser operator support table, as shipped in
    ``stl_compiler/data/tensorrt_onnx_ops.json`` (with its source URL and TensorRT version)."""
    text = resources.files("stl_compiler").joinpath("data/tensorrt_onnx_ops.json").read_text()
    return json.loads(text)


def unsupported_tensorrt_ops(onnx_path: str | os.PathLike) -> dict[str, int]:
    """Op types of an ONNX model that TensorRT's ONNX parser does not import natively
    (custom-domain ops included), with their counts; empty when the model is parseable."""
    from .onnx import onnx_op_types

    supported = tensorrt_supported_ops()["supported"]
    return {op: n for op, n in onnx_op_types(onnx_path).items() if op not in supported}


def build_tensorrt_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *,
                          fp16: bool = True,
                          min_shapes: Mapping[str, Sequence[int]] | None = None,
                          opt_shapes: Mapping[str, Sequence[int]] | None = None,
                          max_shapes: Mapping[str, Sequence[int]] | None = None,
                          workspace: int = 1 << 30) -> Path:
    """Build a serialized TensorRT engine (a ``.plan``) from an ONNX model.

    Args:
        onnx_path: model written by :func:`~stl_compiler.exporters.export_onnx`.
        engine_path: the engine file to write (atomically).
        fp16: build FP16 kernels. An FP16 ONNX model (``export_onnx(dtype=torch.float16)``)
            is built strongly typed, FP16 as exported; an FP32 model gets the weakly typed
            ``BuilderFlag.FP16`` (TensorRT 10 only: TensorRT 11 needs the FP16 export). With
            ``fp16=False`` an FP32 model is built strongly typed in FP32.
        min_shapes, opt_shapes, max_shapes: ``{input name: shape}`` of the optimization
            profile, required for every input with a dynamic dim (e.g. batch and sequence).
        workspace: workspace memory pool limit in bytes.

    Raises:
        ImportError: TensorRT is not installed.
        ValueError: an op TensorRT cannot parse, or a missing / inconsistent profile shape.
        RuntimeError: the parser or the builder failed (their messages included).
    """
    onnx_path = existing_file(onnx_path, "ONNX model")
    engine_path = output_file(engine_path)
    trt = _import_tensorrt()
    unsupported = unsupported_tensorrt_ops(onnx_path)
    if unsupported:
        raise ValueError(f"{onnx_path} has ops TensorRT's ONNX parser does not support: "
                         f"{unsupported}")
    half_model = _is_half(onnx_path)
    weak_fp16 = fp16 and not half_model
    if weak_fp16 and not hasattr(trt.BuilderFlag, "FP16"):
        raise ValueError("this TensorRT builds strongly typed networks only: for an FP16 "
                         "engine export the model in FP16 (export_onnx(..., "
                         "dtype=torch.float16), CLI --fp16), or pass fp16=False")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if not weak_fp16 and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}:\n{errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    if weak_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    dynamic = [t for t in inputs if any(d < 0 for d in t.shape)]
    if dynamic:
        profile = builder.create_optimization_profile()
        for tensor in dynamic:
            shapes = _profile_shapes(tensor.name, tuple(tensor.shape), min_shapes, opt_shapes,
                                     max_shapes)
            profile.set_shape(tensor.name, *shapes)
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}; see the "
                           "TensorRT log above")
    with staged(engine_path) as staging_path, open(staging_path, "wb") as file:
        file.write(serialized)
    return engine_path


def _is_half(onnx_path: Path) -> bool:
    """Whether the model's floating-point inputs are FP16 (an ``export_onnx(dtype=float16)``)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    types = [i.type.tensor_type.elem_type for i in model.graph.input]
    floats = [t for t in types if t in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    return bool(floats) and all(t == onnx.TensorProto.FLOAT16 for t in floats)


def _profile_shapes(name: str, network_shape: tuple[int, ...],
                    *profiles: Mapping[str, Sequence[int]] | None) -> list[tuple[int, ...]]:
    shapes = []
    for label, profile in zip(("min_shapes", "opt_shapes", "max_shapes"), profiles):
        if not profile or name not in profile:
            raise ValueError(f"input {name!r} has dynamic dims {network_shape} (-1 = dynamic): "
                             f"give its shape in {label}")
        shape = tuple(int(d) for d in profile[name])
        if len(shape) != len(network_shape) or any(
                n >= 0 and n != s for n, s in zip(network_shape, shape)):
            raise ValueError(f"{label}[{name!r}] = {shape} does not fit the input's shape "
                             f"{network_shape} (-1 = dynamic)")
        shapes.append(shape)
    if any(not (lo <= op <= hi) for lo, op, hi in zip(*shapes)):
        raise ValueError(f"input {name!r}: need min <= opt <= max in every dim, got "
                         f"{shapes}")
    return shapes


#: TensorRT data types (``tensorrt.<name>``) and their torch namesakes.
_DTYPES = ("float32", "float16", "bfloat16", "int32", "int64", "int8", "uint8", "bool")


class TensorRTRunner:
    """Run a serialized TensorRT engine on torch CUDA tensors.

    ::

        runner = TensorRTRunner("model.plan")
        outputs = runner(x.cuda())        # {output name: CUDA tensor}
    """

    def __init__(self, engine_path: str | os.PathLike) -> None:
        engine_path = existing_file(engine_path, "TensorRT engine")
        trt = _import_tensorrt()
        if not torch.cuda.is_available():
            raise RuntimeError("TensorRTRunner needs a CUDA device")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {engine_path} (built with "
                               "another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = lambda n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT
        self.input_names = [n for n in names if is_input(n)]
        self.output_names = [n for n in names if not is_input(n)]
        dtypes = {getattr(trt, n): getattr(torch, n) for n in _DTYPES if hasattr(trt, n)}
        self.dtypes = {n: dtypes[self.engine.get_tensor_dtype(n)] for n in names}

    def __call__(self, *inputs: torch.Tensor, **named_inputs: torch.Tensor
                 ) -> dict[str, torch.Tensor]:
        """Inputs positionally (engine input order) and/or by name; returns the outputs by
        name. Raises a ValueError / TypeError on a missing input, or a wrong device, dtype
        or rank."""
        feeds = {**dict(zip(self.input_names, inputs)), **named_inputs}
        if len(inputs) > len(self.input_names) or set(feeds) != set(self.input_names):
            raise ValueError(f"the engine takes inputs {self.input_names}, got "
                             f"{len(inputs)} positional and {sorted(named_inputs)} by name")
        for name in self.input_names:
            tensor = feeds[name]
            want_dtype = self.dtypes[name]
            rank = len(self.engine.get_tensor_shape(name))
            if not isinstance(tensor, torch.Tensor) or not tensor.is_cuda:
                raise TypeError(f"input {name!r} must be a CUDA torch.Tensor")
            if tensor.dtype != want_dtype:
                raise TypeError(f"input {name!r} must have dtype {want_dtype}, got "
                                f"{tensor.dtype}")
            if tensor.dim() != rank:
                raise ValueError(f"input {name!r} must have rank {rank}, got shape "
                                 f"{tuple(tensor.shape)}")
            tensor = feeds[name] = tensor.contiguous()
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        device = next(iter(feeds.values())).device
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=device)
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream(device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed; see the TensorRT log")
        return outputs


def compile_with_torch_tensorrt(gm: torch.nn.Module, example_inputs: Any,
                                example_kwargs: dict[str, Any] | None = None, *,
                                dynamic_shapes: Any = None, **options: Any) -> Any:
    """``torch_tensorrt.dynamo.compile`` of an STL graph (the ``stl_compile`` backend
    "tensorrt"): the STL ops are decomposed into plain aten first, which torch-tensorrt's
    converters handle.

    Args:
        gm: the rewritten module (e.g. ``stl_compile(..., backend="eager")``).
        example_inputs, example_kwargs: example inputs, on the CUDA device.
        dynamic_shapes: ``torch.export`` dynamic shapes (default static); with dynamic dims
            pass ``arg_inputs=[torch_tensorrt.Input(min_shape=..., opt_shape=...,
            max_shape=...)]`` in ``options`` too.
        options: forwarded to ``torch_tensorrt.dynamo.compile`` (e.g.
            ``enabled_precisions={torch.float16}``, ``workspace_size``).

    Returns:
        The TensorRT-compiled ``torch.fx.GraphModule``.
    """
    torch_tensorrt = _import_torch_tensorrt()
    program = export_program(gm, example_inputs, example_kwargs=example_kwargs,
                             dynamic_shapes=dynamic_shapes)
    if "inputs" not in options:
        options.setdefault("arg_inputs", list(as_args(example_inputs)))
        if example_kwargs:
            options.setdefault("kwarg_inputs", dict(example_kwargs))
    return torch_tensorrt.dynamo.compile(program, **options)
