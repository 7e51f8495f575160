"""Lower STL site modules to explicit ``stl::encode → bmm → stl::decode`` nodes.

The rewritten graph calls :class:`~stl_compiler.nn.STLLinear` / ``STLMatmul`` submodules;
re-capturing it with ``torch.export`` inlines them into the registered custom ops with fresh,
valid shape metadata (dynamic dims included), which the fusion pass and the exporters read.
Each lowered node keeps its site's name in ``meta['nn_module_stack']``. (Tracing each site
alone with ``make_fx`` inside the graph's shape environment is 5x faster, but torch 2.11
specializes dynamic sizes that way; re-capturing is correct on every supported version.)
"""

from __future__ import annotations

import torch
from torch import fx

from ..capture import capture
from .context import PassContext


def lower_sites(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    if not any(site.converted for site in ctx.report.sites):
        return gm
    lowered = capture(gm, ctx.example_args, ctx.example_kwargs, ctx.dynamic_shapes)
    _share_sizes(lowered.graph)
    return lowered


def _share_sizes(graph: fx.Graph) -> None:
    """Read each symbolic size from its first source (an input), not from the activation at
    hand: a decoded tensor read only for its size could not be fused away."""
    first: dict[str, fx.Node] = {}
    for node in list(graph.nodes):
        if node.target is not torch.ops.aten.sym_size.int:
            continue
        key = str(node.meta.get("val"))
        if key in first:
            node.replace_all_uses_with(first[key])
            graph.erase_node(node)
        else:
            first[key] = node
