"""Small FX helpers shared by the passes."""

from __future__ import annotations

import math

import torch
from torch import fx, nn

aten = torch.ops.aten

#: node.meta key: rewrite_linear reported this node as (part of) a linear site
LINEAR_SITE = "stl_linear_site"


def concrete(dim: int | torch.SymInt) -> int:
    """The example value of a (possibly symbolic) size."""
    if isinstance(dim, int):
        return dim
    hint = dim.node.hint
    if hint is None:
        raise ValueError(f"size {dim} has no example value")
    return int(hint)


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    """Concrete example shape of ``node``'s tensor value, or None when unknown."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return None
    return tuple(concrete(d) for d in val.shape)


def parameter_of(gm: fx.GraphModule, node: object) -> nn.Parameter | None:
    """The parameter a ``get_attr`` node reads, else None (an activation or a buffer)."""
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    try:
        value = gm.get_parameter(node.target)
    except AttributeError:
        return None
    return value


def _is_2d_transpose(node: fx.Node) -> bool:
    if node.target in (aten.t.default, aten.numpy_T.default):
        return True
    if node.target is aten.transpose.int:
        return {d % 2 for d in node.args[1:3]} == {0, 1}
    if node.target is aten.permute.default:
        return [d % 2 for d in node.args[1]] == [1, 0]
    return False


def weight_operand(gm: fx.GraphModule, node: object) -> tuple[fx.Node, fx.Node | None] | None:
    """``(get_attr node, transpose node or None)`` when ``node`` is a 2-D parameter or a
    transpose of one (``w.T``, ``w.t()``, ``w.transpose(0, 1)``, ``w.permute(1, 0)``), else None.
    """
    if parameter_of(gm, node) is not None:
        return node, None
    if (isinstance(node, fx.Node) and node.op == "call_function" and _is_2d_transpose(node)
            and parameter_of(gm, node.args[0]) is not None
            and parameter_of(gm, node.args[0]).dim() == 2):
        return node.args[0], node
    return None


def module_path(node: fx.Node) -> str:
    """Fully-qualified name of the innermost module that ran ``node`` ('' for the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _cls = list(stack.values())[-1]
    return path


def fake_propagate(node: fx.Node) -> None:
    """Set ``node.meta['val']`` by running its target on its inputs' fake values."""
    from torch._guards import detect_fake_mode

    vals = [a.meta.get("val") for a in node.all_input_nodes]
    mode = detect_fake_mode(vals)
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta["val"])
    with mode:
        node.meta["val"] = node.target(*args, **kwargs)


def insert_call(graph: fx.Graph, target, args: tuple, meta_from: fx.Node,
                kwargs: dict | None = None) -> fx.Node:
    """Insert a call_function node (at the graph's insertion point) with valid metadata."""
    node = graph.call_function(target, args, kwargs or {})
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in meta_from.meta:
            node.meta[key] = meta_from.meta[key]
    fake_propagate(node)
    return node


def erase_dead(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    """Erase those of ``nodes`` that are (or become) unused."""
    alive = list(nodes)
    changed = True
    while changed:
        changed = False
        for node in list(alive):
            if not node.users:
                graph.erase_node(node)
                alive.remove(node)
                changed = True


def set_submodule(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    """Place ``module`` at ``path``, replacing what is there and creating parents as needed."""
    parent_path, _, name = path.rpartition(".")
    if parent_path:
        try:
            parent = gm.get_submodule(parent_path)
        except AttributeError:
            gm.add_submodule(path, module)
            return
    else:
        parent = gm
    if hasattr(parent, name) and not isinstance(getattr(parent, name), nn.Module):
        delattr(parent, name)
    setattr(parent, name, module)


def relative_error(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float | None:
    """``sqrt(sum ‖a − b‖² / sum ‖b‖²)`` over (approximation, reference) pairs, in float64."""
    if not pairs:
        return None
    err = sum(float((a.double() - b.double()).pow(2).sum()) for a, b in pairs)
    ref = sum(float(b.double().pow(2).sum()) for _, b in pairs)
    return math.sqrt(err / ref) if ref > 0 else math.sqrt(err)
