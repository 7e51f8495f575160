"""Matching helpers shared by the decode → encode fusions (:mod:`.fuse_norm_strip`,
:mod:`.fuse_softmax_strip`, :mod:`.fuse_decode_encode`) and the boundary report
(:mod:`.report_boundaries`).

A *branch* is one decoded value as the fusions read it: ``act(decode(encoded, d) + bias)``
with aliases / eval-mode dropout in between. :func:`stacked_encoder` and :func:`hand_over`
let one fused op serve every encode of a value. A fusion that decides not to fuse a decode
and reports why marks it (:func:`mark_reported`, in the node's ``meta``), so the final
report pass does not add a generic row for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from ..runtime import ops as _ops  # noqa: F401  (registers the stl:: ops named below)
from ..runtime import stl_gemm as _stl_gemm  # noqa: F401  (registers stl::gemm_decode)
from ._graph import aten, concrete, insert_call, module_path, parameter_of

stl = torch.ops.stl

_ACTIVATIONS = {
    aten.relu.default: "relu", aten.silu.default: "silu", aten.tanh.default: "tanh",
    aten.sigmoid.default: "sigmoid",
}
_DECODE_ARGS = {
    stl.decode.default: ("encoded", "d", "tile", "rows", "cols"),
    stl.decode_epilogue.default: ("encoded", "d", "bias", "activation", "scale", "tile", "rows",
                                  "cols"),
}
#: Every op that ends a site with a decoded value (a boundary's producer).
DECODES = (*_DECODE_ARGS, stl.gemm_decode.default)
#: ``node.meta`` key of a decode whose boundary a fusion pass has reported (not fused).
REPORTED = "stl_boundary_reported"


def mark_reported(decode: fx.Node) -> None:
    """Record on ``decode`` that its boundary has a row in the report already."""
    decode.meta[REPORTED] = True


def is_reported(decode: fx.Node) -> bool:
    return bool(decode.meta.get(REPORTED))


@dataclass
class Branch:
    """One decoded input of a fused op: ``act(decode(encoded, d) + bias)``."""

    decode: fx.Node
    bias: fx.Node | None = None
    activation: str = "none"
    chain: list[fx.Node] = field(default_factory=list)  # nodes between decode and the product

    def arg(self, name: str):
        """An argument of the decode (``stl::decode`` or ``stl::decode_epilogue``) by name."""
        names = _DECODE_ARGS[self.decode.target]
        return self.decode.args[names.index(name)]

    @property
    def encoded(self) -> fx.Node:
        return self.arg("encoded")

    @property
    def d(self) -> fx.Node:
        return self.arg("d")

    @property
    def tile(self) -> int:
        return self.arg("tile")

    @property
    def rows(self):
        return self.arg("rows")

    @property
    def cols(self):
        return self.arg("cols")


def is_identity(node: object) -> bool:
    """An op that returns its input's values: an alias, or dropout outside training."""
    if not isinstance(node, fx.Node):
        return False
    if node.target is aten.dropout.default:
        return node.args[2] is False if len(node.args) > 2 else node.kwargs.get("train") is False
    return node.target is aten.alias.default


def activation_of(node: object) -> str | None:
    if not isinstance(node, fx.Node):
        return None
    if node.target in _ACTIVATIONS:
        return _ACTIVATIONS[node.target]
    if node.target is aten.gelu.default:
        return "gelu_tanh" if node.kwargs.get("approximate", "none") == "tanh" else "gelu"
    return None


def parse_branch(gm: fx.GraphModule, node: object, allow_activation: bool) -> Branch | None:
    chain = []
    activation = activation_of(node) if allow_activation else None
    if activation:
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
    while is_identity(node):
        chain.append(node)
        node = node.args[0]
    if not (isinstance(node, fx.Node) and node.target in _DECODE_ARGS):
        return None
    if node.target is stl.decode_epilogue.default:  # bias already folded into the decode
        if bias is not None or node.args[3] != "none" or node.args[4] != 1.0:
            return None
        bias = node.args[2]
    return Branch(node, bias, activation or "none", chain)


def site_name(node: fx.Node) -> str:
    return module_path(node) or node.name


def value_bytes(node: fx.Node) -> int:
    val = node.meta["val"]
    numel = 1
    for dim in val.shape:
        numel *= concrete(dim)
    return numel * val.element_size()


def stacked_encoder(graph: fx.Graph, consumers: list[fx.Node], first: fx.Node) -> fx.Node:
    """The encoders of ``consumers`` (encodes of one value) stacked along the rank dim, so the
    value is encoded by one op."""
    encoders = [c.args[1] for c in consumers]
    return encoders[0] if len(encoders) == 1 else insert_call(
        graph, aten.cat.default, (encoders, 0), first)


def hand_over(graph: fx.Graph, consumers: list[fx.Node], out: fx.Node, first: fx.Node) -> None:
    """Give each consumer encode its rank slice of ``out`` (encoded with
    :func:`stacked_encoder`) and erase the consumers."""
    offset = 0
    for consumer in consumers:
        rank = consumer.meta["val"].shape[0]
        part = out if len(consumers) == 1 else insert_call(
            graph, aten.slice.Tensor, (out, 0, offset, offset + rank), first)
        offset += rank
        consumer.replace_all_uses_with(part)
    for consumer in consumers:
        graph.erase_node(consumer)


