"""ONNX export of STL models: standard ONNX ops only, weights pre-encoded, constants folded.

Every STL site becomes MatMul / Reshape / Transpose / Pad / Slice nodes (the aten
decompositions of the STL ops, :data:`stl_compiler.runtime.DECOMPOSITIONS`), so ONNX Runtime and
TensorRT's ONNX parser run the model without plugins.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .._files import output_file, staged
from ._program import export_program
from ._quiet import quiet_torch_internals

__all__ = ["export_onnx", "onnx_op_types"]

#: ONNX domains of standard operators; anything else would need a custom runtime kernel.
STANDARD_DOMAINS = ("", "ai.onnx")


def supported_opsets() -> range:
    """The ONNX opsets ``export_onnx`` writes: from the lowest opset torch's exporter has
    implementations for (below it torch silently writes that one instead) to the highest
    torch supports."""
    from torch.onnx import _constants

    try:
        from torch.onnx._internal.exporter._constants import TORCHLIB_OPSET as lowest
    except ImportError:  # a torch without the dynamo exporter's constants: its known floor
        lowest = 18
    return range(lowest, _constants.ONNX_MAX_OPSET + 1)


def _check_opset(opset: Any) -> None:
    opsets = supported_opsets()
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int)
                              or opset not in opsets):
        raise ValueError(f"opset must be an int from {opsets.start} to {opsets.stop - 1} (the "
                         f"opsets this torch's ONNX exporter writes) or None for its default, "
                         f"got {opset!r}")


def _import_onnx():
    try:
        import onnx
        import onnxscript  # noqa: F401 - torch.onnx.export(dynamo=True) needs it
    except ImportError as err:
        raise ImportError(f"ONNX export needs onnx and onnxscript ({err.name} is missing): "
                          "pip install 'stl-compiler[onnx]'") from err
    return onnx


def export_onnx(module: Any, example_inputs: Any, path: str | os.PathLike, *,
                example_kwargs: dict[str, Any] | None = None, dynamic_shapes: Any = "auto",
                opset: int | None = None, dtype: torch.dtype | None = None,
                external_data: bool | None = None) -> Path:
    """Write ``module`` as an ONNX model made of standard ONNX operators.

    Args:
        module: an STL model: the output of ``stl_compile`` (any backend but "tensorrt"), a
            model converted with ``swap_linears_``, or any ``nn.Module``.
        example_inputs: positional example inputs (a tuple, or one tensor). Give dynamic dims
            sizes >= 2 (torch.export fixes size-1 dims).
        path: output file (conventionally ``*.onnx``). Written atomically: on any failure
            nothing is left at ``path``.
        example_kwargs: keyword example inputs.
        dynamic_shapes: ``"auto"`` (default): every input dim the model allows is dynamic; the
            graph's symbolic dims are named ``batch`` and ``sequence`` (dims 0 and 1 of rank-2
            and rank-3 inputs), other dynamic dims ``<input>_dim<i>``. ``None``: static
            shapes. Otherwise a ``torch.export`` dynamic_shapes spec.
        opset: ONNX opset, within :func:`supported_opsets` (default: the exporter's, 18).
        dtype: ``torch.float16``, ``bfloat16``, ``float32`` or ``float64``: cast a copy of the
            module and the floating inputs (e.g. half-precision weights and inputs).
        external_data: store weights in ``<path>.data`` beside the model; default: only when
            the weights exceed ONNX's 2 GB protobuf limit.

    Raises:
        ValueError: an unsupported ``opset`` or ``dtype``, or example inputs the model does
            not run on (the model's own error is quoted).

    Returns:
        ``path``. The model passes ``onnx.checker.check_model(full_check=True)``; constant
        sub-expressions (weight encodings, fused re-encoding matrices, transposed bases) are
        folded into initializers.
    """
    onnx = _import_onnx()
    _check_opset(opset)
    path = output_file(path)
    with quiet_torch_internals():
        program = export_program(module, example_inputs, example_kwargs=example_kwargs,
                                 dynamic_shapes=dynamic_shapes, dtype=dtype)
        onnx_program = torch.onnx.export(program, dynamo=True, opset_version=opset,
                                         optimize=False, verbose=False,
                                         output_names=_output_names(program))
    written = onnx_program.model.opset_imports.get("")
    if opset is not None and written != opset:  # torch falls back silently when it cannot
        raise RuntimeError(f"torch's ONNX exporter wrote opset {written} instead of the "
                           f"requested {opset}; export with opset={written} or None")
    _fold_constants(onnx_program.model)
    _tidy_shapes(onnx_program.model)
    with staged(path) as staging_path:
        onnx_program.save(staging_path, external_data=external_data)
        onnx.checker.check_model(str(staging_path), full_check=True)
    return path


def _fold_constants(model) -> None:
    """Fold every sub-expression of initializers alone, up to 8× the biggest weight.

    The ONNX optimizer's default limits (inputs up to 8k elements) would leave a weight
    encoding ``encode(Wᵀ, ew)`` (r/t² × the weight's size, ≤ t× for r ≤ t³) computed at run
    time; with these limits encoded weights and fused re-encoding matrices are stored as
    initializers.
    """
    from onnxscript import optimizer

    biggest = max((init.const_value.size for init in model.graph.initializers.values()
                   if init.const_value is not None), default=0)
    limit = max(8 * biggest, 1 << 18)
    optimizer.optimize_ir(model, input_size_limit=limit, output_size_limit=limit)


def _output_names(program: torch.export.ExportedProgram) -> list[str] | None:
    """Graph output names from the module's output structure: ``output`` for one tensor,
    the keys of a dict / ``ModelOutput`` (``logits``, ``last_hidden_state``), else
    ``output_0``, ``output_1``, ..."""

    def walk(spec, prefix: tuple[str, ...]):
        if spec.is_leaf():
            yield prefix
            return
        keys = spec.context if isinstance(spec.context, (list, tuple)) and \
            len(spec.context) == spec.num_children else range(spec.num_children)
        children = spec.children() if hasattr(spec, "children") else spec.children_specs
        for key, child in zip(keys, children):
            yield from walk(child, (*prefix, str(key)))

    paths = list(walk(program.call_spec.out_spec, ()))
    if len(paths) != len(program.graph_signature.user_outputs):
        return None
    if paths == [()]:
        return ["output"]
    names = ["_".join(p) if p and not p[0].isdigit() else "_".join(("output", *p))
             for p in paths]
    return names if len(set(names)) == len(names) else None


def _tidy_shapes(model) -> None:
    """Static dims the exporter left as symbols (``"32"``) become ints; symbolic dims get
    readable names (``s31`` → ``batch``) everywhere in the graph."""
    try:
        import onnx_ir as ir
    except ImportError:  # onnxscript < 0.3 ships the IR inside
        from onnxscript import ir

    names = _axis_names(model)

    def tidy(dim):
        symbol = getattr(dim, "value", None)
        if not isinstance(symbol, str):
            return dim
        if symbol.isdigit():
            return int(symbol)
        return ir.SymbolicDim(names[symbol]) if symbol in names else dim

    values = [*model.graph.inputs, *(out for node in model.graph.all_nodes()
                                     for out in node.outputs)]
    for value in values:
        if value.shape is not None:
            value.shape = ir.Shape([tidy(dim) for dim in value.shape])


def _axis_names(model) -> dict[str, str]:
    """Readable names for the symbolic dims of the graph inputs."""
    names: dict[str, str] = {}
    for value in model.graph.inputs:
        for axis, dim in enumerate(value.shape or ()):
            symbol = getattr(dim, "value", None)
            if not isinstance(symbol, str) or symbol.isdigit() or symbol in names:
                continue
            if axis == 0:
                name = "batch"
            elif axis == 1 and len(value.shape) in (2, 3):
                name = "sequence"
            else:
                name = f"{value.name}_dim{axis}"
            if name in names.values():
                name = f"{value.name}_{name}"
            names[symbol] = name
    return names


def onnx_op_types(path: str | os.PathLike) -> dict[str, int]:
    """``{"domain::OpType" or "OpType": count}`` over the graph of an ONNX file (and its
    local functions and subgraphs); weights in external data are not loaded."""
    onnx = _import_onnx()
    from .._files import existing_file

    model = onnx.load(str(existing_file(path, "ONNX model")), load_external_data=False)
    counts: dict[str, int] = {}

    def visit(nodes) -> None:
        for node in nodes:
            key = node.op_type if node.domain in STANDARD_DOMAINS else \
                f"{node.domain}::{node.op_type}"
            counts[key] = counts.get(key, 0) + 1
            for attr in node.attribute:
                subgraphs = [*attr.graphs, *([attr.g] if attr.HasField("g") else [])]
                for graph in subgraphs:
                    visit(graph.node)

    visit(model.graph.node)
    for function in model.functions:
        visit(function.node)
    return counts
