"""Shared front half of every exporter: capture a module as a plain-aten ExportedProgram.

The STL custom ops are replaced by their aten decompositions
(:data:`stl_compiler.runtime.DECOMPOSITIONS`), so the program needs neither ``stl_compiler``
nor a plugin to run: ONNX, TensorRT and AOTInductor see MatMul / Reshape / Transpose only.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

from ..capture import auto_dynamic_shapes, check_runs_on_example, eval_mode
from ..runtime import DECOMPOSITIONS
from ._quiet import quiet_torch_internals

#: dtypes a model can be exported in (``dtype=``): floating types ONNX Runtime, TensorRT and
#: Inductor run matmuls in.
EXPORT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def unwrap(module: Any) -> nn.Module:
    """The plain module behind ``module`` (a ``torch.compile`` wrapper is unwrapped)."""
    module = getattr(module, "_orig_mod", module)
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected an nn.Module (or the output of stl_compile), got "
                        f"{type(module).__name__}")
    return module


def as_args(example_inputs: Any) -> tuple:
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def cast_floats(value: Any, dtype: torch.dtype) -> Any:
    """Cast every floating-point tensor of a (nested) value to ``dtype``."""
    return torch.utils._pytree.tree_map(
        lambda v: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v,
        value)


def export_program(module: Any, example_inputs: Any, *,
                   example_kwargs: dict[str, Any] | None = None,
                   dynamic_shapes: Any = "auto",
                   dtype: torch.dtype | None = None) -> torch.export.ExportedProgram:
    """``torch.export`` ``module`` (eval mode) and decompose its STL ops into plain aten;
    a RuntimeError names any other custom op left in the graph.

    Args:
        module: an ``nn.Module`` (e.g. converted with ``swap_linears_``) or the output of
            ``stl_compile`` (a ``GraphModule``, or a ``torch.compile`` wrapper of one).
        example_inputs: positional example inputs (a tuple, or one tensor).
        example_kwargs: keyword example inputs.
        dynamic_shapes: ``"auto"`` (default): every input dim is dynamic where the model
            allows it (batch and sequence; torch.export keeps a dim static when the model
            needs it). ``None``: all static. Otherwise a ``torch.export`` dynamic_shapes spec.
        dtype: cast the module's floating parameters and floating inputs to this dtype first
            (on a copy; the caller's module is untouched).
    """
    module = unwrap(module)
    check_export_dtype(dtype)
    args, kwargs = as_args(example_inputs), dict(example_kwargs or {})
    if dtype is not None:
        module = copy.deepcopy(module).to(dtype)
        args, kwargs = cast_floats(args, dtype), cast_floats(kwargs, dtype)
    check_runs_on_example(module, args, kwargs)
    if dynamic_shapes == "auto":
        _warn_size_one_dims(args, kwargs)
        dynamic_shapes = auto_dynamic_shapes(module, args, kwargs)
    with eval_mode(module), quiet_torch_internals():
        program = torch.export.export(module, args, kwargs, dynamic_shapes=dynamic_shapes,
                                      strict=False)
        program = program.run_decompositions(DECOMPOSITIONS)
    custom = sorted({str(node.target) for node in program.graph.nodes
                     if isinstance(node.target, torch._ops.OpOverload)
                     and node.target.namespace not in ("aten", "prims")})
    if custom:
        raise RuntimeError(f"{type(module).__name__} uses ops with no aten decomposition: "
                           f"{custom}; ONNX, TensorRT and AOTInductor need plain aten. "
                           "Register one in stl_compiler.runtime.DECOMPOSITIONS")
    return program


def check_export_dtype(dtype: Any) -> None:
    """A ValueError listing :data:`EXPORT_DTYPES` unless ``dtype`` is one of them (or None)."""
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(str, EXPORT_DTYPES))} (or None to "
                         f"keep the module's), got {dtype!r}")


def _warn_size_one_dims(args: tuple, kwargs: dict[str, Any]) -> None:
    """Batch (dim 0) and sequence (dim 1 of rank-2/3 inputs) dims of size 1 get fixed."""
    leaves = torch.utils._pytree.tree_leaves((args, kwargs))
    if any(isinstance(v, torch.Tensor) and v.dim() and
           1 in v.shape[:2 if v.dim() in (2, 3) else 1] for v in leaves):
        warnings.warn("an example input has a batch or sequence dim of size 1: torch.export "
                      "fixes such dims to 1 in the exported model. Export with sizes >= 2 to "
                      "keep them dynamic.", stacklevel=4)
