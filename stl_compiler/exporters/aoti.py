"""AOTInductor packages: an STL model compiled ahead of time into one ``.pt2`` file.

The package holds the Inductor-generated kernels of the plain-aten program (STL ops
decomposed), so loading it needs torch only — neither ``stl_compiler`` nor Python model code.
It runs on the device the module and example inputs were on when it was exported.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .._files import existing_file, output_file, staged
from ..runtime.ort import check_input
from ._program import export_program
from ._quiet import quiet_torch_internals

__all__ = ["AOTIModel", "export_aoti", "load_aoti"]

#: Package metadata key holding the input signature that :class:`AOTIModel` checks.
_INPUTS_KEY = "stl_compiler.inputs"


def export_aoti(module: Any, example_inputs: Any, path: str | os.PathLike, *,
                example_kwargs: dict[str, Any] | None = None, dynamic_shapes: Any = "auto",
                dtype: torch.dtype | None = None,
                inductor_configs: dict[str, Any] | None = None) -> Path:
    """Compile ``module`` with AOTInductor into the package ``path`` (``*.pt2``).

    Args:
        module, example_inputs, example_kwargs, dynamic_shapes, dtype: as in
            :func:`~stl_compiler.exporters.export_onnx` (dynamic batch / sequence by default).
        path: the package file; it must end in ``.pt2``. Written atomically.
        inductor_configs: Inductor options, e.g. ``{"max_autotune": True}``.

    Returns:
        ``path``; :func:`load_aoti` opens it (in any process with the same torch version).
        The package's metadata holds the input signature (names, dtypes, static dims) that
        :func:`load_aoti`'s model checks on every call.
    """
    path = Path(path)
    if path.suffix != ".pt2":
        raise ValueError(f"an AOTInductor package path must end in .pt2, got {path}")
    output_file(path)
    with quiet_torch_internals():
        program = export_program(module, example_inputs, example_kwargs=example_kwargs,
                                 dynamic_shapes=dynamic_shapes, dtype=dtype)
        configs = dict(inductor_configs or {})
        configs["aot_inductor.metadata"] = {**configs.get("aot_inductor.metadata", {}),
                                            _INPUTS_KEY: json.dumps(_input_signature(program))}
        with staged(path) as staging_path:
            torch._inductor.aoti_compile_and_package(program, package_path=str(staging_path),
                                                     inductor_configs=configs)
    return path


def _input_signature(program: torch.export.ExportedProgram) -> list[dict[str, Any]]:
    """``[{"name", "dtype", "shape", "device"}]`` of the program's tensor inputs, in call
    order; a dynamic dim's shape entry is None (a dim the export fixed is a SymInt with a
    constant value: an int here)."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    user_inputs = set(program.graph_signature.user_inputs)
    signature = []
    for node in program.graph.nodes:
        value = node.meta.get("val")
        if node.op != "placeholder" or node.name not in user_inputs or \
                not isinstance(value, torch.Tensor):
            continue
        signature.append({
            "name": node.name, "dtype": str(value.dtype).removeprefix("torch."),
            "shape": [int(d) if is_concrete_int(d) else None for d in value.shape],
            "device": value.device.type})
    return signature


class AOTIModel:
    """A loaded AOTInductor package; calling it checks the inputs, then runs the package.

    The compiled kernels trust their inputs: a wrong feature size reads past the data and a
    float64 input is read as float32, both giving garbage silently. Each call is checked
    against the signature stored at export: number and names of inputs, dtype, device, rank
    and static dims (the messages are those of ``ORTSession.run``).

    Attributes:
        package: the underlying ``AOTICompiledModel`` (calls to it are unchecked).
        inputs: ``[{"name", "dtype", "shape", "device"}]``; None for a package not written by
            :func:`export_aoti` (its calls are not checked).
    """

    def __init__(self, package: Any) -> None:
        self.package = package
        stored = package.get_metadata().get(_INPUTS_KEY)
        self.inputs: list[dict[str, Any]] | None = None if stored is None else json.loads(stored)

    def __repr__(self) -> str:
        if self.inputs is None:
            return "AOTIModel(inputs unchecked)"
        inputs = ", ".join(f"{i['name']}: {i['dtype']}"
                           f"[{', '.join('?' if d is None else str(d) for d in i['shape'])}]"
                           f" ({i['device']})" for i in self.inputs)
        return f"AOTIModel({inputs})"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.inputs is not None:
            self._check(args, kwargs)
        return self.package(*args, **kwargs)

    def _check(self, args: tuple, kwargs: dict[str, Any]) -> None:
        names = [spec["name"] for spec in self.inputs]
        in_spec = torch.utils._pytree.treespec_loads(self.package.loader.get_call_spec()[0])
        keywords = list(in_spec.child(1).context)
        if set(kwargs) != set(keywords):
            raise ValueError(f"the model takes keyword inputs {keywords}, got {sorted(kwargs)} "
                             f"(its inputs are {names})")
        kwargs = {key: kwargs[key] for key in keywords}
        leaves, spec = torch.utils._pytree.tree_flatten((args, kwargs))
        if spec != in_spec:
            positional = in_spec.child(0).num_children
            raise ValueError(f"the model takes {positional} positional inputs and keyword "
                             f"inputs {keywords} ({names}), structured as at export; got "
                             f"{len(args)} positional")
        tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
        if len(tensors) != len(self.inputs):
            raise ValueError(f"the model takes {len(self.inputs)} tensor inputs {names}, got "
                             f"{len(tensors)}")
        for value, spec in zip(tensors, self.inputs):
            check_input(spec["name"], str(value.dtype).removeprefix("torch."),
                        tuple(value.shape), spec["dtype"], spec["shape"])
            if value.device.type != spec["device"]:
                raise ValueError(f"input {spec['name']!r} must be on {spec['device']} (the "
                                 f"package was compiled for it), got {value.device}")


def load_aoti(path: str | os.PathLike, *, device_index: int = -1) -> AOTIModel:
    """Load a package written by :func:`export_aoti`; call the result like the module
    (positional and keyword tensors, same pytree structure; outputs as the module's).

    Every call checks its inputs first (:class:`AOTIModel`): a wrong number or names of
    inputs, rank or static dim is a ValueError, a wrong dtype a TypeError.
    """
    path = existing_file(path, "AOTInductor package")
    return AOTIModel(torch._inductor.aoti_load_package(str(path), device_index=device_index))
