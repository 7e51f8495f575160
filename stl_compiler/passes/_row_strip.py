"""What the two row-strip fusions share (:mod:`.fuse_norm_strip`, :mod:`.fuse_softmax_strip`).

A norm or a softmax mixes the columns of a row but never two rows, so a strip of t rows (one
row of tiles) can be decoded, transformed and re-encoded on its own. Each fusion matches a
chain from one STL site's decode to a value (the norm's or the softmax's output) that the
encodes of later sites read, and replaces it by one ``stl::`` op. This module holds the loop
both run (:func:`fuse_strips`: match, report a rejected chain, replace), the encodes a value
reaches (:func:`encodes_of`) and the erasure of a replaced chain (:func:`erase_region`).
The helpers every fusion uses are in :mod:`._encoded`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

from torch import fx

from ..report import BoundaryRow
from ._encoded import Branch, is_identity, mark_reported, site_name, stl
from ._graph import aten, erase_dead
from .context import PassContext

#: Dtype asserts of torch.export: they have no outputs, so they never keep a value alive.
CHECKS = (aten._assert_tensor_metadata.default,)


class StripMatch(Protocol):
    """A matched chain: its decoded branch, the encodes reading its value, and why it cannot
    be fused (empty when it can)."""

    branch: Branch
    consumers: list[fx.Node]
    problem: str


S = TypeVar("S", bound=StripMatch)


def fuse_strips(gm: fx.GraphModule, ctx: PassContext,
                match: Callable[[fx.GraphModule, fx.Node], S | None],
                replace: Callable[[fx.Graph, S, PassContext], None]) -> fx.GraphModule:
    """Try ``match`` on every call node, in graph order; ``replace`` each chain it finds
    (with encodes reading it) that has no problem, report each one that has as ``not fused``
    with the problem, and mark the decodes of both (:func:`._encoded.mark_reported`).
    Nothing without ``config.fuse`` and ``config.fuse_row_strip``."""
    if not (ctx.config.fuse and ctx.config.fuse_row_strip):
        return gm
    # A chain's nodes are ancestors of its value, so no later candidate is part of an erased
    # chain (the erased encodes after it match nothing).
    for value in [n for n in gm.graph.nodes if n.op == "call_function"]:
        strip = match(gm, value)
        if strip is None or not strip.consumers:
            continue
        mark_reported(strip.branch.decode)  # its row is written here, fused or not
        if strip.problem:
            ctx.report.boundaries.append(BoundaryRow(
                site_name(strip.branch.decode), [site_name(c) for c in strip.consumers],
                "not fused", f"row-strip: {strip.problem}"))
        else:
            replace(gm.graph, strip, ctx)
    return gm


def _is_noop(node: fx.Node) -> bool:
    """A view that keeps every element in place (full slice, same-shape reshape, alias,
    dropout in eval)."""
    if node.target in (aten.reshape.default, aten.view.default):
        return ([str(d) for d in node.args[0].meta["val"].shape]
                == [str(d) for d in node.meta["val"].shape])
    if node.target is aten.slice.Tensor:
        start, end, step = (list(node.args[2:]) + [0, None, 1][len(node.args) - 2:])[:3]
        return start in (0, None) and (end is None or end >= 2**62) and step == 1
    return node.target in (aten.clone.default, aten.contiguous.default) or is_identity(node)


def encodes_of(value: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
    """The encodes reading ``value`` directly or through no-op views whose only readers are
    such encodes (and views), and those views."""
    consumers, views = [], []
    for user in value.users:
        if user.target is stl.encode.default and user.args[0] is value:
            consumers.append(user)
        elif _is_noop(user):
            below, below_views = encodes_of(user)
            if all(u in below or u in below_views for u in user.users):
                consumers += below
                views += [user, *below_views]
    return consumers, views


def erase_region(graph: fx.Graph, region: list[fx.Node], order: dict[fx.Node, int]) -> None:
    """Erase a replaced chain: its export dtype asserts, then every node left unused
    (``order``: each node's position in the graph before the replacement)."""
    for node in region:
        for check in [u for u in node.users if u.target in CHECKS]:
            graph.erase_node(check)
    erase_dead(graph, sorted(region, key=order.__getitem__, reverse=True))
