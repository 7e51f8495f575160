"""Lower STL site modules to explicit ``stl::encode → bmm → stl::decode`` nodes.

The rewrite passes leave ``call_module`` nodes to :class:`~stl_compiler.nn.STLLinear` /
``STLMatmul`` submodules. Each is traced with ``make_fx`` on its inputs' fake values, inside
the graph's own fake mode and shape environment (so dynamic sizes stay the same symbols), and
the traced nodes are inlined in place with valid metadata. Sites of the same kind and shapes
share one trace: a 24-layer model needs a handful, not one per site.
"""

from __future__ import annotations

import torch
from torch import fx
from torch._guards import detect_fake_mode
from torch.fx.experimental.proxy_tensor import make_fx

from ..nn import STLLinear, STLMatmul
from .context import PassContext


def _trace(module: torch.nn.Module, inputs: list, mode) -> fx.Graph:
    names = [name for name, _ in module.named_parameters()]

    def call(*flat):
        params = dict(zip(names, flat[len(inputs):]))
        return torch.func.functional_call(module, params, tuple(flat[:len(inputs)]))

    with mode:
        fake_params = [mode.from_tensor(p) for p in module.parameters()]
    graph = make_fx(call, tracing_mode="real")(*inputs, *fake_params).graph
    # make_fx resolves reshape to view for the example's strides; other inputs (another
    # batch size, a non-contiguous producer) may need the copying form.
    for node in graph.nodes:
        if node.target is torch.ops.aten.view.default:
            node.target = torch.ops.aten.reshape.default
    return graph


def _key(module: torch.nn.Module, inputs: list) -> tuple:
    shapes = tuple((str(tuple(v.shape)), v.dtype) for v in inputs)
    params = tuple((n, tuple(p.shape), p.dtype) for n, p in module.named_parameters())
    return type(module), module.extra_repr(), shapes, params


def lower_sites(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    graph = gm.graph
    traces: dict[tuple, fx.Graph] = {}
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if not isinstance(module, (STLLinear, STLMatmul)):
            continue
        inputs = [a.meta["val"] for a in node.args]
        key = _key(module, inputs)
        if key not in traces:
            traces[key] = _trace(module, inputs, detect_fake_mode(inputs))
        _inline(graph, node, traces[key], module)
    _share_sizes(graph)
    return gm


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
