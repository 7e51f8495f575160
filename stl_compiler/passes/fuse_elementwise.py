"""Fuse ``decode → (bias, activation, scale | gated product) → encode`` between STL sites.

The chain between one site's ``stl::decode`` and the next site's ``stl::encode`` is replaced
by one ``stl::decode_act_encode`` (or ``stl::decode_glu_encode`` for SwiGLU-style products of
two decoded branches): it reads the encoded output and writes the next encoded input, so the
decoded activation is never written to memory. Padded rows/cols are zeroed inside the op
exactly as the unfused graph re-pads with zeros. When one decoded value feeds several encodes,
their encoders are stacked so it is decoded once. Every decode that reaches an encode gets a
row in ``report.boundaries``: fused, or why not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from ..report import BoundaryRow
from ..runtime.ops import reencode
from ._graph import aten, concrete, insert_call, module_path, parameter_of
from .context import PassContext

stl = torch.ops.stl

_ACTIVATIONS = {
    aten.relu.default: "relu", aten.silu.default: "silu", aten.tanh.default: "tanh",
    aten.sigmoid.default: "sigmoid",
}
_ROW_WISE = (aten.layer_norm.default, aten.native_layer_norm.default, aten.softmax.int,
             aten._softmax.default, aten.mean.dim, aten.rsqrt.default)


@dataclass
class Branch:
    """One decoded input of a fused op: ``act(decode(encoded, d) + bias)``."""

    decode: fx.Node
    bias: fx.Node | None = None
    activation: str = "none"
    rows: object = None  # valid rows: int or a SymInt-valued node
    cols: object = None
    chain: list[fx.Node] = field(default_factory=list)  # nodes between decode and the product


def _activation_of(node: fx.Node) -> str | None:
    if node.target in _ACTIVATIONS:
        return _ACTIVATIONS[node.target]
    if node.target is aten.gelu.default:
        return "gelu_tanh" if node.kwargs.get("approximate", "none") == "tanh" else "gelu"
    return None


def _parse_branch(gm: fx.GraphModule, node: fx.Node, allow_activation: bool) -> Branch | None:
    chain = []
    activation = "none"
    if allow_activation and isinstance(node, fx.Node) and _activation_of(node):
        activation = _activation_of(node)
        chain.append(node)
        node = node.args[0]
    bias = None
    if isinstance(node, fx.Node) and node.target is aten.add.Tensor:
        left, right = node.args[:2]
        for value, param in ((left, right), (right, left)):
            p = parameter_of(gm, param)
            if p is not None and p.dim() == 1 and isinstance(value, fx.Node):
                chain.append(node)
                bias, node = param, value
                break
        else:
            return None
    while isinstance(node, fx.Node) and node.target is aten.alias.default:
        chain.append(node)
        node = node.args[0]
    if not (isinstance(node, fx.Node) and node.target is stl.decode.default):
        return None
    return Branch(node, bias, activation, node.args[3], node.args[4], chain)


def _strip_scale(node: fx.Node) -> tuple[fx.Node, float, list[fx.Node]]:
    if node.target is aten.mul.Tensor and isinstance(node.args[1], (int, float)):
        return node.args[0], float(node.args[1]), [node]
    if node.target is aten.mul.Tensor and isinstance(node.args[0], (int, float)):
        return node.args[1], float(node.args[0]), [node]
    return node, 1.0, []


def _encode_consumers(value: fx.Node) -> list[fx.Node] | None:
    """The encodes reading ``value``, when nothing else reads it; else None."""
    consumers = list(value.users)
    if not consumers or any(u.target is not stl.encode.default or u.args[0] is not value
                            for u in consumers):
        return None
    return consumers


def _site(node: fx.Node) -> str:
    return module_path(node) or node.name


def _bytes(node: fx.Node) -> int:
    val = node.meta["val"]
    numel = 1
    for dim in val.shape:
        numel *= concrete(dim)
    return numel * val.element_size()


def fuse_elementwise(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    if not ctx.config.fuse:
        return gm
    graph = gm.graph
    fused_decodes: set[fx.Node] = set()
    for value in list(graph.nodes):
        consumers = _encode_consumers(value) if value.op == "call_function" else None
        if not consumers:
            continue
        top, scale, scale_chain = _strip_scale(value)
        branches = _parse_glu(gm, top) or ([b] if (b := _parse_branch(gm, top, True)) else None)
        if branches is None:
            continue
        if not _single_use(branches, scale_chain, value):
            continue
        if len({enc.args[2] for enc in consumers} | {b.decode.args[2] for b in branches}) != 1:
            continue
        algebraic = _is_algebraic(branches)
        _replace(graph, branches, consumers, scale, algebraic)
        fused_decodes.update(b.decode for b in branches)
        ctx.report.boundaries.append(BoundaryRow(
            producer=" * ".join(_site(b.decode) for b in branches),
            consumers=[_site(enc) for enc in consumers],
            kind="algebraic" if algebraic else "elementwise",
            reason="+".join(filter(None, ["bias" if any(b.bias for b in branches) else "",
                                          *[b.activation for b in branches
                                            if b.activation != "none"],
                                          "glu" if len(branches) == 2 else "",
                                          f"scale {scale:g}" if scale != 1 else ""])) or "none",
            bytes_saved=2 * sum(_bytes(b.decode) for b in branches)))
    _report_unfused(graph, ctx, fused_decodes)
    return gm


def _parse_glu(gm: fx.GraphModule, node: fx.Node) -> list[Branch] | None:
    if node.target is not aten.mul.Tensor or not all(isinstance(a, fx.Node)
                                                      for a in node.args[:2]):
        return None
    gate = _parse_branch(gm, node.args[0], True)
    up = _parse_branch(gm, node.args[1], False)
    if gate is None or up is None or gate.activation == "none":
        return None
    if str(gate.rows) != str(up.rows) or str(gate.cols) != str(up.cols):
        return None
    up.chain.append(node)  # the product node belongs to the fused region
    return [gate, up]


def _single_use(branches: list[Branch], scale_chain: list[fx.Node], value: fx.Node) -> bool:
    """Every node strictly inside the fused region is read only by the region itself."""
    region = {n for b in branches for n in b.chain} | set(scale_chain) | {b.decode
                                                                       for b in branches}
    for node in region:
        if node is value:
            continue
        if any(user not in region for user in node.users):
            return False
    return True


def _is_algebraic(branches: list[Branch]) -> bool:
    """Nothing but a constant scale between decode and encode, and no padding to re-zero:
    decode+encode is then one r×r matrix on the encoded tensor (paper Alg. 2)."""
    if len(branches) != 1 or branches[0].bias is not None or branches[0].activation != "none":
        return False
    b = branches[0]
    tile, grid = b.decode.args[2], b.decode.args[0].meta["val"].shape[-2:]
    return all(isinstance(v, int) and isinstance(n, int) and v == n * tile
               for v, n in ((b.rows, grid[0]), (b.cols, grid[1])))


def _replace(graph: fx.Graph, branches: list[Branch], consumers: list, scale: float,
             algebraic: bool) -> None:
    order = {n: i for i, n in enumerate(graph.nodes)}
    first = min(consumers, key=order.__getitem__)
    encoders = [enc.args[1] for enc in consumers]
    tile = branches[0].decode.args[2]
    rows, cols = branches[0].rows, branches[0].cols
    with graph.inserting_before(first):
        ex = encoders[0] if len(encoders) == 1 else insert_call(
            graph, aten.cat.default, (encoders, 0), first)
        if algebraic:
            (b,) = branches
            fused = insert_call(graph, reencode, (b.decode.args[0], b.decode.args[1], ex,
                                                  scale), first)
        elif len(branches) == 1:
            (b,) = branches
            fused = insert_call(graph, stl.decode_act_encode.default,
                                (b.decode.args[0], b.decode.args[1], b.bias, ex, b.activation,
                                 scale, tile, rows, cols), first)
        else:
            g, u = branches
            fused = insert_call(graph, stl.decode_glu_encode.default,
                                (g.decode.args[0], g.decode.args[1], g.bias, u.decode.args[0],
                                 u.decode.args[1], u.bias, ex, g.activation, scale, tile, rows,
                                 cols), first)
        offset = 0
        for enc in consumers:
            rank = enc.meta["val"].shape[0]
            part = fused if len(consumers) == 1 else insert_call(
                graph, aten.slice.Tensor, (fused, 0, offset, offset + rank), first)
            offset += rank
            enc.replace_all_uses_with(part)
    for enc in consumers:
        graph.erase_node(enc)
    _erase_dead(graph, [n for b in branches for n in reversed(b.chain)] +
                [b.decode for b in branches])


def _erase_dead(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    changed = True
    while changed:
        changed = False
        for node in nodes:
            if node.graph is graph and not node.users and node in graph.nodes:
                graph.erase_node(node)
                changed = True


def _report_unfused(graph: fx.Graph, ctx: PassContext, fused: set[fx.Node]) -> None:
    """A row for every remaining decode whose value reaches an encode, with the reason."""
    for decode in graph.nodes:
        if decode.target is not stl.decode.default or decode in fused:
            continue
        seen, frontier, between, encodes = set(), [decode], [], []
        for _ in range(12):
            nxt = []
            for node in frontier:
                for user in node.users:
                    if user in seen:
                        continue
                    seen.add(user)
                    if user.target is stl.encode.default:
                        encodes.append(user)
                    else:
                        between.append(user)
                        nxt.append(user)
            frontier = nxt
        if not encodes:
            continue
        ops = sorted({str(getattr(n.target, "overloadpacket", n.target)) for n in between
                      if n.op == "call_function"})
        row_wise = any(n.target in _ROW_WISE for n in between)
        reason = ("row-wise ops between (row-strip fusion is not implemented yet)" if row_wise
                  else "ops between are not element-wise, or the decoded value is used "
                       "elsewhere")
        ctx.report.boundaries.append(BoundaryRow(
            producer=_site(decode), consumers=sorted({_site(e) for e in encodes}),
            kind="not fused", reason=f"{reason}: {', '.join(ops[:6])}"))
