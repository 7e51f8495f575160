"""Fuse one STL site's ``decode`` with the next site's ``encode``.

Between a ``stl::decode`` and the ``stl::encode`` of the next site the pass accepts, in this
order from the decode: a 1-D bias add, one element-wise activation (or the gated product of
two decoded branches, SwiGLU), a constant scale, and tile-preserving layout ops (head
split/merge reshapes whose parts are multiples of the tile, transposes, permutes,
``repeat_interleave`` of heads, copies). The chain becomes one op on the encoded tensor:

* ``stl::reencode`` when nothing non-linear stands between (*algebraic*, paper Alg. 2): the
  ``(r, r')`` matrix ``d @ ex.T`` plus an encoded bias; no decoded activation is produced;
* ``stl::decode_act_encode`` / ``stl::decode_glu_encode`` otherwise (*element-wise*): the
  decoded tile lives only inside the op (registers, in the CUDA kernel);

followed by the layout ops replayed on the encoded tensor (a transpose of the two tile dims
becomes a permutation of the encoder's columns). When one decoded value feeds several encodes
directly, their encoders are stacked so it is decoded once. Every boundary fused gets a row in
``report.boundaries`` (so does one rejected for its layout); :mod:`.report_boundaries`
reports the rest.
"""

from __future__ import annotations

import torch
from torch import fx

from ..report import BoundaryRow
from ..runtime import ops as _ops  # noqa: F401  (registers the stl:: ops named below)
from ._encoded import (
    Branch,
    hand_over,
    is_identity,
    mark_reported,
    parse_branch,
    site_name,
    stacked_encoder,
    value_bytes,
)
from ._graph import aten, erase_dead, insert_call
from .context import PassContext

stl = torch.ops.stl

_RESHAPES = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)
_LAYOUT = (*_RESHAPES, aten.transpose.int, aten.permute.default, aten.clone.default,
           aten.alias.default, aten.repeat_interleave.self_int, aten.unsqueeze.default,
           aten.contiguous.default, aten.slice.Tensor, aten.expand.default)


def _parse_glu(gm: fx.GraphModule, node: fx.Node) -> list[Branch] | None:
    if node.target is not aten.mul.Tensor or not all(isinstance(a, fx.Node)
                                                      for a in node.args[:2]):
        return None
    gate = parse_branch(gm, node.args[0], True)
    up = parse_branch(gm, node.args[1], False)
    if gate is None or up is None or gate.activation == "none":
        return None
    if str(gate.rows) != str(up.rows) or str(gate.cols) != str(up.cols):
        return None
    up.chain.append(node)  # the product belongs to the fused region
    return [gate, up]


def _strip_scale(node: fx.Node) -> tuple[fx.Node, float, list[fx.Node]]:
    if node.target is aten.mul.Tensor:
        a, b = node.args[:2]
        if isinstance(b, (int, float)) and isinstance(a, fx.Node):
            return a, float(b), [node]
        if isinstance(a, (int, float)) and isinstance(b, fx.Node):
            return b, float(a), [node]
    return node, 1.0, []


class LayoutError(ValueError):
    """A layout op between decode and encode that does not keep tiles whole."""


class EncodedLayout:
    """Replays layout ops of the decoded tensor on the encoded one.

    Each dim of the decoded tensor is labelled "batch", "row" (the tile's row dim) or "col";
    the encoded tensor has the same dims in the same order, tile dims divided by the tile, plus
    a leading rank dim. Tile dims are never split or merged with anything but whole tiles.
    """

    def __init__(self, value: fx.Node, tile: int) -> None:
        self.tile = tile
        ndim = value.meta["val"].dim()
        self.labels = ["batch"] * (ndim - 2) + ["row", "col"]
        self.steps: list[tuple] = []  # (aten op, args after the encoded tensor)
        cols = value.meta["val"].shape[-1]
        if not isinstance(cols, int) or cols % tile:
            raise LayoutError(f"{cols} columns are not a static multiple of the tile {tile}")

    def replay(self, node: fx.Node) -> None:
        target = node.target
        old = node.args[0].meta["val"].shape
        new = node.meta["val"].shape
        if target in (aten.clone.default, aten.alias.default, aten.contiguous.default,
                      aten.dropout.default):  # dropout only outside training (is_identity)
            return
        if target is aten.slice.Tensor:
            if [str(d) for d in old] != [str(d) for d in new]:
                raise LayoutError("slice that drops elements")
            return
        if target in _RESHAPES:
            self._reshape(node, [str(d) for d in old], [str(d) for d in new], old, new)
        elif target in (aten.transpose.int, aten.permute.default):
            ndim = len(old)
            if target is aten.transpose.int:
                i, j = (d % ndim for d in node.args[1:3])
                perm = list(range(ndim))
                perm[i], perm[j] = j, i
            else:
                perm = [d % ndim for d in node.args[1]]
            self.labels = [self.labels[p] for p in perm]
            self.steps.append((aten.permute.default, ([0] + [p + 1 for p in perm],)))
        elif target is aten.repeat_interleave.self_int:
            dim = node.args[2] % len(old)
            if self.labels[dim] != "batch":
                raise LayoutError("repeat_interleave along a tile dim")
            self.steps.append((aten.repeat_interleave.self_int, (node.args[1], dim + 1)))
        elif target is aten.expand.default:
            sizes = list(node.args[1])
            if any(lab != "batch" and str(o) != str(n)
                   for lab, o, n in zip(self.labels[-len(old):], old, new[-len(old):])):
                raise LayoutError("expand along a tile dim")
            if len(sizes) != len(self.labels):
                raise LayoutError("expand that adds dims")
            sizes = [-1 if lab != "batch" else size for lab, size in zip(self.labels, sizes)]
            self.steps.append((aten.expand.default, ([-1] + sizes,)))
        elif target is aten.unsqueeze.default:
            dim = node.args[1] % (len(old) + 1)
            self.labels.insert(dim, "batch")
            self.steps.append((aten.unsqueeze.default, (dim + 1,)))
        else:
            raise LayoutError(f"{target} is not a layout op")

    def _reshape(self, node, old_s, new_s, old, new) -> None:
        labels = self.labels
        if old_s == new_s:
            return
        for i in range(len(old_s)):
            split = (len(new_s) == len(old_s) + 1 and old_s[:i] == new_s[:i]
                     and old_s[i + 1:] == new_s[i + 2:])
            merge = (len(new_s) == len(old_s) - 1 and old_s[:i] == new_s[:i]
                     and old_s[i + 2:] == new_s[i + 1:])
            if split and _static(old[i], new[i], new[i + 1]) and old[i] == new[i] * new[i + 1]:
                if labels[i] == "row":
                    raise LayoutError("reshape splits the row dim of the tile")
                if labels[i] == "col" and new[i + 1] % self.tile:
                    raise LayoutError(f"head dim {new[i + 1]} is not a multiple of the tile")
                labels = labels[:i] + ["batch", labels[i]] + labels[i + 1:]
                break
            if merge and _static(old[i], old[i + 1], new[i]) and new[i] == old[i] * old[i + 1]:
                if labels[i] != "batch" or labels[i + 1] == "row":
                    raise LayoutError("reshape merges the row dim of the tile")
                labels = labels[:i] + [labels[i + 1]] + labels[i + 2:]
                break
        else:
            raise LayoutError(f"reshape {old_s} -> {new_s} does not keep tiles whole")
        self.labels = labels
        shape = []
        for lab, size, arg in zip(labels, new, node.args[1]):
            if lab == "batch" and arg == -1:
                if not isinstance(size, int):
                    raise LayoutError("reshape infers a dynamic batch dim (-1)")
                arg = size
            shape.append(-1 if lab == "row" else (size // self.tile if lab == "col" else arg))
        self.steps.append((aten.reshape.default, ([_RANK] + shape,)))

    def transposed(self) -> bool:
        """Whether the consumer sees each tile transposed (it encodes ``tileᵀ``)."""
        if self.labels[-2:] == ["row", "col"]:
            return False
        if self.labels[-2:] == ["col", "row"]:
            return True
        raise LayoutError("the tile dims are not the last two dims at the encode")


_RANK = object()  # placeholder for the rank dim in replayed reshapes


def _static(*dims) -> bool:
    return all(isinstance(d, int) for d in dims)


def _layout_chain(enc: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """Walk back from an encode through single-use layout ops: (value, ops in forward order)."""
    node, chain = enc.args[0], []
    while (isinstance(node, fx.Node) and (node.target in _LAYOUT or is_identity(node))
           and len(node.users) == 1):
        chain.append(node)
        node = node.args[0]
    return node, chain[::-1]


def fuse_decode_encode(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    if not ctx.config.fuse:
        return gm
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}  # consumers are original nodes
    replaced: set[fx.Node] = set()
    for enc in [n for n in graph.nodes if n.target is stl.encode.default]:
        if enc in replaced:
            continue  # already replaced as part of an earlier group
        value, layout_ops = _layout_chain(enc)
        if not isinstance(value, fx.Node) or value.op != "call_function":
            continue
        consumers = _consumers(value, enc, layout_ops)
        if consumers is None:
            continue
        top, scale, scale_chain = _strip_scale(value)
        branches = _parse_glu(gm, top) or ([b] if (b := parse_branch(gm, top, True)) else None)
        if branches is None or not _region_is_private(branches, scale_chain, value):
            continue
        tile = branches[0].tile
        if len({c.args[2] for c in consumers} | {b.tile for b in branches}) != 1:
            continue
        try:
            layout = EncodedLayout(value, tile) if layout_ops else None
            for op in layout_ops:
                layout.replay(op)
            transposed = layout.transposed() if layout else False
        except LayoutError as err:
            ctx.report.boundaries.append(BoundaryRow(
                site_name(branches[0].decode), [site_name(enc)], "not fused", f"layout: {err}"))
            for b in branches:  # reported here: no generic row (report_boundaries)
                mark_reported(b.decode)
            continue
        algebraic = len(branches) == 1 and branches[0].activation == "none"
        first = min(consumers, key=order.__getitem__)
        replaced.update(consumers)
        _replace(graph, first, branches, consumers, scale, algebraic, layout, transposed,
                 layout_ops)
        ctx.report.boundaries.append(BoundaryRow(
            producer=" * ".join(site_name(b.decode) for b in branches),
            consumers=[site_name(c) for c in consumers],
            kind="algebraic" if algebraic else "elementwise",
            reason=_describe(branches, scale, layout_ops, transposed),
            bytes_saved=2 * sum(value_bytes(b.decode) for b in branches)))
    return gm


def _consumers(value: fx.Node, enc: fx.Node, layout_ops: list[fx.Node]) -> list[fx.Node] | None:
    """The encodes to fuse with ``value``: all its users when each is a direct encode, or the
    one encode behind ``layout_ops``; None when anything else reads ``value``."""
    if layout_ops:
        return [enc] if len(value.users) == 1 else None
    users = list(value.users)
    if all(u.target is stl.encode.default and u.args[0] is value for u in users):
        return users
    return None


def _region_is_private(branches: list[Branch], scale_chain: list[fx.Node], value: fx.Node
                       ) -> bool:
    """Nothing outside the fused region reads a node strictly inside it."""
    region = ({n for b in branches for n in b.chain} | set(scale_chain)
              | {b.decode for b in branches})
    return all(node is value or all(u in region for u in node.users) for node in region)


def _describe(branches, scale, layout_ops, transposed) -> str:
    parts = ["bias"] if any(b.bias for b in branches) else []
    parts += [b.activation for b in branches if b.activation != "none"]
    parts += ["glu"] if len(branches) == 2 else []
    parts += [f"scale {scale:g}"] if scale != 1 else []
    parts += ["layout " + ",".join(str(op.target.overloadpacket).split(".")[-1]
                                   for op in layout_ops)] if layout_ops else []
    parts += ["tile transpose"] if transposed else []
    return "+".join(parts) or "none"


def _replace(graph: fx.Graph, first: fx.Node, branches: list[Branch], consumers: list[fx.Node],
             scale: float,
             algebraic: bool, layout: EncodedLayout | None, transposed: bool,
             layout_ops: list[fx.Node]) -> None:
    tile = branches[0].tile
    rows, cols = branches[0].rows, branches[0].cols
    with graph.inserting_before(first):
        ex = stacked_encoder(graph, consumers, first)
        if transposed:  # the consumer encodes tileᵀ: permute the encoder's tile columns
            ex = insert_call(graph, _transpose_tile_columns, (ex, tile), first)
        g = branches[0]
        if algebraic:
            out = insert_call(graph, stl.reencode.default,
                              (g.encoded, g.d, g.bias, ex, scale, tile,
                               rows, cols), first)
        elif len(branches) == 1:
            out = insert_call(graph, stl.decode_act_encode.default,
                              (g.encoded, g.d, g.bias, ex, g.activation,
                               scale, tile, rows, cols), first)
        else:
            u = branches[1]
            out = insert_call(graph, stl.decode_glu_encode.default,
                              (g.encoded, g.d, g.bias, u.encoded, u.d, u.bias, ex,
                               g.activation, scale, tile, rows, cols), first)
        for op, args in (layout.steps if layout else []):
            if op is aten.reshape.default:
                rank = out.meta["val"].shape[0]
                args = ([rank if a is _RANK else a for a in args[0]],)
            out = insert_call(graph, op, (out, *args), first)
        hand_over(graph, consumers, out, first)
    erase_dead(graph, layout_ops[::-1] + [n for b in branches for n in b.chain]
                + [b.decode for b in branches])


def _transpose_tile_columns(ex: torch.Tensor, tile: int) -> torch.Tensor:
    """Encoder of transposed tiles: ``ex'[p, c*t + a] = ex[p, a*t + c]``."""
    return ex.reshape(ex.shape[0], tile, tile).transpose(1, 2).reshape(ex.shape[0], -1)
