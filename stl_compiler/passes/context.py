"""What every pass receives besides the graph."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ..config import STLConfig
from ..report import STLReport


@dataclass
class PassContext:
    """Config, example inputs (for re-capture and error measurement) and the report."""

    config: STLConfig
    example_args: tuple
    example_kwargs: dict[str, Any]
    dynamic_shapes: Any
    report: STLReport = field(default_factory=STLReport)
    #: node name → (input tensors, output) recorded on the example inputs (record_site_io)
    site_io: dict[str, tuple[tuple[Any, ...], torch.Tensor]] = field(default_factory=dict)
    #: the user's model as given to stl_compile (``filter_fn`` sees its modules); None when
    #: the passes run on a bare graph
    model: nn.Module | None = None


def filter_module(gm: fx.GraphModule, ctx: PassContext, path: str) -> nn.Module | None:
    """The module ``filter_fn`` receives for a linear site whose weight lives at ``path``:
    the user's own module (e.g. its ``nn.Linear``) when the model is known, else the
    captured graph's stand-in for it."""
    for root in (ctx.model, gm):
        if root is None:
            continue
        try:
            return root.get_submodule(path)
        except AttributeError:
            continue
    return None


def warn_unused_overrides(ctx: PassContext) -> None:
    """Warn about override patterns that matched no site of the model (a typo in a name)."""
    unused = ctx.config.unused_overrides(site.name for site in ctx.report.sites)
    if unused:
        warnings.warn(f"stl_compile: override pattern(s) {unused} match no site of the model; "
                      f"site names are listed in module.stl_report", stacklevel=5)
