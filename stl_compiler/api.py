"""``stl_compile``: capture a model, rewrite its matmuls into STL sites, lower, compile."""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch
from torch import nn

from .config import STLConfig
from .nn import STLLinear
from .passes import PassContext, run_passes
from .passes._graph import relative_error
from .passes.capture import capture
from .report import SiteRow, STLReport

__all__ = ["stl_compile", "BACKENDS"]

BACKENDS = ("inductor", "eager", "tensorrt")


def stl_compile(model: nn.Module, example_inputs: tuple | Any, config: STLConfig | None = None,
                *, example_kwargs: dict[str, Any] | None = None, dynamic_shapes: Any = "auto",
                backend: str = "inductor") -> nn.Module:
    """Convert ``model``'s matmuls into STL and compile it.

    Args:
        model: the model; captured with ``torch.export`` (non-strict) in its current
            train/eval mode. transformers models need ``use_cache=False``.
        example_inputs: positional example inputs (a tuple, or one tensor). Use sizes >= 2 for
            dims that should stay dynamic (sizes 0/1 are specialized by torch.export).
        config: what to convert and how (:class:`STLConfig`; default rank 24, fitted basis).
        example_kwargs: keyword example inputs.
        dynamic_shapes: ``torch.export`` dynamic shapes; the default ``"auto"`` marks every
            input dim dynamic where the model allows it (batch and sequence length); None
            captures static shapes.
        backend: ``"inductor"`` (``torch.compile``), ``"eager"`` (the rewritten
            ``GraphModule``), or ``"tensorrt"`` (``torch_tensorrt.dynamo.compile``).

    Returns:
        A module computing the STL model, with ``.stl_report`` (:class:`STLReport`): every
        site converted or left dense with the reason, FLOPs, and each site's relative output
        error on the example inputs. Parameters (encoded weights, ``ex``, ``d``) are
        trainable and in its ``state_dict``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    config = config or STLConfig()
    if not isinstance(config, STLConfig):
        raise TypeError(f"config must be an STLConfig, got {type(config).__name__}")
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    kwargs = dict(example_kwargs or {})
    ctx = PassContext(config, args, kwargs, dynamic_shapes, STLReport())

    start = time.perf_counter()
    gm = capture(model, args, kwargs, dynamic_shapes)
    ctx.report.pass_seconds["capture"] = time.perf_counter() - start
    if config.measure_error:
        with torch.no_grad():
            reference = gm(*args, **kwargs)
    ctx.report.sites.extend(_preconverted_sites(model))
    gm = run_passes(gm, ctx)
    if config.measure_error:
        with torch.no_grad():
            ctx.report.model_rel_error = _output_error(gm(*args, **kwargs), reference)
    if not ctx.report.converted:
        warnings.warn("stl_compile converted NOTHING: the model runs fully dense. See "
                      "module.stl_report for each site's reason.", stacklevel=2)

    compiled = _apply_backend(gm, backend, args, kwargs)
    compiled.stl_report = ctx.report
    return compiled


def _preconverted_sites(model: nn.Module) -> list[SiteRow]:
    """STLLinear layers already in the model (swap_linears_, calibrated, trained with STL):
    captured as STL ops as they are, listed so the report covers them too."""
    return [SiteRow(name=name, kind="linear", op="STLLinear (already converted)",
                    x_shape=(), w_shape=(m.in_features, m.out_features), converted=True,
                    tile=m.tile, rank=m.rank, basis="from the model")
            for name, m in model.named_modules() if isinstance(m, STLLinear)]


def _apply_backend(gm: nn.Module, backend: str, args: tuple, kwargs: dict) -> nn.Module:
    if backend == "eager":
        return gm
    if backend == "inductor":
        return torch.compile(gm, backend="inductor")
    from .exporters.tensorrt import compile_with_torch_tensorrt

    return compile_with_torch_tensorrt(gm, args, kwargs)


def _output_error(output: Any, reference: Any) -> float | None:
    """Relative error over all floating-point tensors of a (nested) model output."""
    flat_out = torch.utils._pytree.tree_leaves(output)
    flat_ref = torch.utils._pytree.tree_leaves(reference)
    pairs = [(o, r) for o, r in zip(flat_out, flat_ref)
             if isinstance(r, torch.Tensor) and r.is_floating_point()]
    return relative_error(pairs)

