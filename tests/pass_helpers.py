"""Running single passes on tiny captured modules (shared by the per-pass unit tests)."""

from __future__ import annotations

import torch
from torch import fx, nn

from stl_compiler import STLConfig
from stl_compiler.capture import capture
from stl_compiler.passes import PassContext, run_passes
from stl_compiler.report import STLReport

#: Layers this small cost more in STL than dense: convert them anyway.
CONVERT_ALL = {name: None for name in ("max_cost_ratio", "max_bytes_ratio")
               if hasattr(STLConfig, name)}


def captured(model: nn.Module, *args: torch.Tensor, config: STLConfig | None = None,
             dynamic_shapes="auto") -> tuple[fx.GraphModule, PassContext]:
    """``model`` captured as stl_compile captures it, with the context its passes get."""
    config = config or STLConfig(**CONVERT_ALL)
    ctx = PassContext(config, args, {}, dynamic_shapes, STLReport(), model=model.eval())
    return capture(model, args, {}, dynamic_shapes), ctx


def run(gm: fx.GraphModule, ctx: PassContext, *passes) -> fx.GraphModule:
    return run_passes(gm, ctx, list(passes))


def targets(gm: fx.GraphModule) -> list:
    """The graph's call targets in order (ops, and module paths of call_module nodes)."""
    return [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_module")]


def count(gm: fx.GraphModule, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.target is target)
