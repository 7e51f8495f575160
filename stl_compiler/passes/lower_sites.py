"""Lower STL site modules to explicit ``stl::encode → bmm → stl::decode`` nodes.

The rewritten graph calls :class:`~stl_compiler.nn.STLLinear` / ``STLMatmul`` submodules;
re-capturing it with ``torch.export`` inlines them into the registered custom ops with fresh,
valid shape metadata (dynamic dims included), which the fusion pass and the exporters read.
Each lowered node keeps its site's name in ``meta['nn_module_stack']``.
"""

from __future__ import annotations

from torch import fx

from .capture import capture
from .context import PassContext


def lower_sites(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    if not any(site.converted for site in ctx.report.sites):
        return gm
    return capture(gm, ctx.example_args, ctx.example_kwargs, ctx.dynamic_shapes)
