"""What every pass receives besides the graph."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

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
    #: names of decode nodes that already have a row in ``report.boundaries``
    reported_decodes: set[str] = field(default_factory=set)
