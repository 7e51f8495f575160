"""ONNX Runtime session helper: graph optimizations, provider choice, checked inputs.

::

    session = stl_compiler.runtime.ort_session("model.onnx")
    print(session.provider)            # e.g. "CUDAExecutionProvider"
    (logits,) = session.run(input_ids)  # torch tensors (or numpy arrays) in, torch tensors out
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["ORTSession", "ort_session", "PREFERRED_PROVIDERS"]

log = logging.getLogger(__name__)

#: Providers tried in this order when none are given (those the installed onnxruntime has).
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider",
                       "CPUExecutionProvider")

_OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")

_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def _import_ort():
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError("ONNX Runtime is not installed: pip install 'stl-compiler[onnx]' "
                          "(or onnxruntime-gpu for the CUDA / TensorRT providers)") from err
    return onnxruntime


class ORTSession:
    """An ``onnxruntime.InferenceSession`` whose :meth:`run` checks its inputs.

    Attributes:
        session: the underlying ``InferenceSession``.
        provider: the execution provider that runs the graph (the first of the session's).
        inputs: ``[(name, numpy dtype, shape)]``; a shape entry is an int for a static dim
            and the dim's name (or None) for a dynamic one.
        output_names: the graph's output names.
    """

    def __init__(self, session: Any) -> None:
        self.session = session
        self.provider: str = session.get_providers()[0]
        self.inputs = [(i.name, _ORT_TYPES.get(i.type), list(i.shape))
                       for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]

    def __repr__(self) -> str:
        inputs = ", ".join(f"{name}: {np.dtype(dt).name if dt else '?'}{shape}"
                           for name, dt, shape in self.inputs)
        return f"ORTSession({self.provider}; {inputs})"

    def run(self, *inputs: Any, **named_inputs: Any) -> tuple[torch.Tensor, ...]:
        """Run the model on torch tensors or numpy arrays, positional (graph input order)
        and/or by name; returns the outputs as CPU torch tensors, in graph output order.

        Raises:
            ValueError: wrong number or names of inputs, wrong rank or static dim size.
            TypeError: an input that is not a tensor/array, or of the wrong dtype.
        """
        names = [name for name, _, _ in self.inputs]
        if len(inputs) > len(names):
            raise ValueError(f"the model takes {len(names)} inputs {names}, got "
                             f"{len(inputs)} positional")
        feeds = dict(zip(names, inputs))
        for name, value in named_inputs.items():
            if name not in names:
                raise ValueError(f"the model has no input {name!r}; its inputs are {names}")
            if name in feeds:
                raise ValueError(f"input {name!r} given both positionally and by name")
            feeds[name] = value
        missing = [name for name in names if name not in feeds]
        if missing:
            raise ValueError(f"missing model inputs {missing} (the model takes {names})")
        arrays = {name: _checked_array(name, feeds[name], dtype, shape)
                  for name, dtype, shape in self.inputs}
        outputs = self.session.run(self.output_names, arrays)
        return tuple(torch.from_numpy(np.asarray(out)) for out in outputs)

    __call__ = run


def _checked_array(name: str, value: Any, dtype: Any, shape: list) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray):
        raise TypeError(f"input {name!r} must be a torch.Tensor or numpy array, got "
                        f"{type(value).__name__}")
    check_input(name, value.dtype.name, tuple(value.shape),
                None if dtype is None else np.dtype(dtype).name, shape)
    return np.ascontiguousarray(value)


def check_input(name: str, dtype: str, shape: tuple[int, ...], expected_dtype: str | None,
                expected_shape: Sequence[int | str | None]) -> None:
    """Check one input of a deployed model against the model's signature.

    Args:
        name: the input's name, for the message.
        dtype, shape: what was given (dtype by name: "float32", "int64", ...).
        expected_dtype: the dtype the model takes, or None when it is unknown.
        expected_shape: one entry per dim: an int for a static dim, the dim's name (or None)
            for a dynamic one.

    Raises:
        TypeError: the dtype differs (the message says how to cast).
        ValueError: the rank or a static dim differs (the message shows the expected shape).
    """
    if expected_dtype is not None and dtype != expected_dtype:
        raise TypeError(f"input {name!r} must have dtype {expected_dtype}, got {dtype}; cast "
                        f"it first (e.g. x.to(torch.{expected_dtype}))")
    expected = "(" + ", ".join(str(d) if d is not None else "?" for d in expected_shape) + ")"
    if len(shape) != len(expected_shape):
        raise ValueError(f"input {name!r} must have rank {len(expected_shape)} {expected}, got "
                         f"shape {tuple(shape)}")
    for axis, (want, got) in enumerate(zip(expected_shape, shape)):
        if isinstance(want, int) and want != got:
            raise ValueError(f"input {name!r} dim {axis} must be {want} {expected}, got shape "
                             f"{tuple(shape)}")


def _read_model(path: Path) -> Any:
    """The ModelProto at ``path`` without its weights, or None when onnx is not installed.

    Raises:
        ValueError: the file is not an ONNX model.
    """
    try:
        import onnx
        from google.protobuf.message import DecodeError
    except ImportError:
        return None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except DecodeError as err:
        raise ValueError(f"{path} is not an ONNX model (it does not parse as one: {err}); "
                         "give the .onnx file written by export_onnx") from None
    if not model.HasField("graph"):  # protobuf reads e.g. an empty file as an empty message
        raise ValueError(f"{path} is not an ONNX model (it holds no graph); give the .onnx file "
                         "written by export_onnx")
    return model


def _computes_in_half(model: Any) -> bool:
    """Whether the graph has float16 inputs, outputs or weights (a model fed token ids computes
    in float16 with integer inputs)."""
    if model is None:
        return False
    from onnx import TensorProto

    half = TensorProto.FLOAT16
    graph = model.graph
    return (any(v.type.tensor_type.elem_type == half for v in (*graph.input, *graph.output))
            or any(w.data_type == half for w in graph.initializer))


def ort_session(path: str | os.PathLike, providers: Sequence[Any] | None = None, *,
                optimization_level: str = "all", optimized_model_path: str | os.PathLike |
                None = None, intra_op_num_threads: int | None = None,
                session_options: Any = None) -> ORTSession:
    """Open an ONNX model in ONNX Runtime with graph optimizations on.

    Args:
        path: the ``.onnx`` file (its external data, if any, beside it).
        providers: execution providers in priority order (names, or ``(name, options)``
            pairs). Default: TensorRT, then CUDA, then CPU — whichever the installed
            onnxruntime offers (onnxruntime-gpu has the first two).
        optimization_level: "disable", "basic", "extended" or "all" (ORT graph
            optimization level).
        optimized_model_path: also write the optimized graph there (it may use ORT-only
            contrib ops, so it is for ONNX Runtime, not for TensorRT).
        intra_op_num_threads: CPU threads per operator (default: ORT's choice).
        session_options: an ``onnxruntime.SessionOptions`` to start from.

    Returns:
        An :class:`ORTSession`; ``session.provider`` says which provider runs the graph (also
        logged at INFO level).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not an ONNX model ONNX Runtime can load, an unknown
            ``optimization_level``, or unavailable ``providers``.
    """
    from .._files import existing_file, staged

    ort = _import_ort()
    path = existing_file(path, "ONNX model")
    if optimization_level not in _OPTIMIZATION_LEVELS:
        raise ValueError(f"optimization_level must be one of {_OPTIMIZATION_LEVELS}, got "
                         f"{optimization_level!r}")
    available = ort.get_available_providers()
    if providers is None:
        providers = [p for p in PREFERRED_PROVIDERS if p in available]
    else:
        unknown = [p for p in providers
                   if (p[0] if isinstance(p, tuple) else p) not in available]
        if unknown:
            raise ValueError(f"execution providers {unknown} are not available in this "
                             f"onnxruntime; available: {available}")
    options = session_options or ort.SessionOptions()
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization_level]
    if intra_op_num_threads is not None:
        options.intra_op_num_threads = intra_op_num_threads
    # onnxruntime 1.31-1.32's CPU NCHWc layout pass crashes the process (segfault) on FP16
    # MatMul graphs such as ours (also behind integer inputs: a float16 BERT fed token ids); it
    # only helps convolutions, so leave it out for them.
    disabled = ["NchwcTransformer"] if _computes_in_half(_read_model(path)) else []
    kwargs = {"providers": list(providers), "disabled_optimizers": disabled}
    if optimized_model_path is None:
        session = _inference_session(ort, path, options, kwargs)
    else:
        with staged(optimized_model_path) as staging_path:
            options.optimized_model_filepath = str(staging_path)
            session = _inference_session(ort, path, options, kwargs)
    result = ORTSession(session)
    log.info("ONNX Runtime runs %s with %s", Path(path).name, result.provider)
    return result


def _inference_session(ort: Any, path: Path, options: Any, kwargs: dict[str, Any]) -> Any:
    """``InferenceSession``; a file ONNX Runtime cannot read as a model is a ValueError."""
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidGraph, InvalidProtobuf

    try:
        return ort.InferenceSession(str(path), options, **kwargs)
    except (InvalidProtobuf, InvalidGraph) as err:
        raise ValueError(f"ONNX Runtime cannot load {path} as a model: {err}") from None
