"""Capture a model as an FX graph with ``torch.export`` (non-strict), with clear errors."""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch
import torch.fx.experimental._config as fx_config
from torch import fx, nn


class CaptureError(RuntimeError):
    """The model could not be captured as a graph; the message says why and what to do."""


_HINTS = (
    ("data-dependent", "the model branches on tensor values (data-dependent control flow); "
     "rewrite the branch with torch.cond or move it out of forward"),
    ("GuardOnDataDependentSymNode", "the model branches on tensor values; rewrite with "
     "torch.cond or compute the condition outside the model"),
    ("Constraints violated", "a dimension marked dynamic is specialized by the model; pass "
     "dynamic_shapes that keep it static, or example inputs with sizes >= 2"),
    ("DynamicCache", "the model returns a KV cache; for transformers models pass "
     "use_cache=False (in example_kwargs or the model config)"),
    ("past_key_values", "the model returns a KV cache; for transformers models pass "
     "use_cache=False"),
)


def auto_dynamic_shapes(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict:
    """Mark every dim of every tensor input ``Dim.AUTO``: dynamic where the model allows."""
    auto = torch.export.Dim.AUTO
    spec = lambda v: ({i: auto for i in range(v.dim())} if isinstance(v, torch.Tensor)
                      else None)
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    return {name: torch.utils._pytree.tree_map(spec, value)
            for name, value in bound.arguments.items()}


def _size_oblivious():
    """Reason about dynamic sizes without assuming they are not 1: padded tile counts are 1
    for short sequences or small batches, and torch.export would otherwise guard them away
    (a sequence of <= 4 tokens, or batch <= 4, rejected at run time)."""
    if hasattr(fx_config, "backed_size_oblivious"):
        return fx_config.patch(backed_size_oblivious=True)
    return contextlib.nullcontext()


def capture(module: nn.Module, args: tuple, kwargs: dict[str, Any], dynamic_shapes: Any
            ) -> fx.GraphModule:
    """``torch.export.export(..., strict=False).module()`` with actionable errors."""
    if dynamic_shapes == "auto":
        dynamic_shapes = auto_dynamic_shapes(module, args, kwargs)
    try:
        with _size_oblivious():
            program = torch.export.export(module, args, kwargs, dynamic_shapes=dynamic_shapes,
                                          strict=False)
    except Exception as err:  # noqa: BLE001 - re-raised with a hint, cause chained
        text = f"{type(err).__name__}: {err}"
        hints = [hint for needle, hint in _HINTS if needle in text]
        hint = hints[0] if hints else ("simplify the construct named above, or convert the "
                                       "model's nn.Linear layers eagerly with "
                                       "stl_compiler.swap_linears_ instead")
        first = text.strip().splitlines()[0][:500]
        raise CaptureError(f"torch.export could not capture {type(module).__name__}: {first}\n"
                           f"How to work around it: {hint}") from err
    module = program.module()
    _views_to_reshapes(module.graph)
    module.recompile()
    return module


def _views_to_reshapes(graph: fx.Graph) -> None:
    """``view`` nodes were chosen for the example's fake strides, which torch 2.11 gets wrong
    for some graphs (nn.MultiheadAttention) and which differ at other shapes once STL ops
    produce fresh tensors; a reshape copies only when it must. Captured graphs are
    functional: no view result is mutated."""
    for node in graph.nodes:
        if node.target is torch.ops.aten.view.default:
            node.target = torch.ops.aten.reshape.default
