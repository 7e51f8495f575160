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

from .capture import capture
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


def _inline(graph: fx.Graph, node: fx.Node, traced: fx.Graph, module: torch.nn.Module) -> None:
    """Copy ``traced`` in place of ``node``; its parameter placeholders become get_attrs."""
    placeholders = [n for n in traced.nodes if n.op == "placeholder"]
    params = [f"{node.target}.{name}" for name, _ in module.named_parameters()]
    env: dict[fx.Node, fx.Node] = {}
    stack = node.meta.get("nn_module_stack")
    with graph.inserting_before(node):
        for placeholder, arg in zip(placeholders, list(node.args)):
            env[placeholder] = arg
        # parameters go to the top, as in captured graphs, so any later node may read them
        top = next(n for n in graph.nodes if n.op != "placeholder")
        for placeholder, target in zip(placeholders[len(node.args):], params):
            with graph.inserting_before(top):
                attr = graph.get_attr(target)
            attr.meta["val"] = placeholder.meta.get("val")
            env[placeholder] = attr
        for inner in traced.nodes:
            if inner.op == "placeholder":
                continue
            if inner.op == "output":
                node.replace_all_uses_with(env[inner.args[0]])
                continue
            copy = graph.node_copy(inner, lambda n: env[n])
            if stack is not None:
                copy.meta["nn_module_stack"] = stack
            env[inner] = copy
    graph.erase_node(node)

