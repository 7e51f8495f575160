"""AOTInductor packages: an STL model compiled ahead of time into one ``.pt2`` file.

The package holds the Inductor-generated kernels of the plain-aten program (STL ops
decomposed), so loading it needs torch only — neither ``stl_compiler`` nor Python model code.
It runs on the device the module and example inputs were on when it was exported.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ._files import existing_file, output_file, staged
from ._program import export_program

__all__ = ["export_aoti", "load_aoti"]


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
    """
    path = Path(path)
    if path.suffix != ".pt2":
        raise ValueError(f"an AOTInductor package path must end in .pt2, got {path}")
    output_file(path)
    program = export_program(module, example_inputs, example_kwargs=example_kwargs,
                             dynamic_shapes=dynamic_shapes, dtype=dtype)
    with staged(path) as staging_path:
        torch._inductor.aoti_compile_and_package(program, package_path=str(staging_path),
                                                 inductor_configs=inductor_configs)
    return path


def load_aoti(path: str | os.PathLike, *, device_index: int = -1) -> Any:
    """Load a package written by :func:`export_aoti`; call the result like the module
    (positional and keyword tensors, same pytree structure; outputs as the module's)."""
    path = existing_file(path, "AOTInductor package")
    return torch._inductor.aoti_load_package(str(path), device_index=device_index)
