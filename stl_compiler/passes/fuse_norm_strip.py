"""Norm-strip fusion: decode → (bias) → residual add → LayerNorm / RMSNorm → encode(s).

A norm mixes the columns of a row but never two rows, so a strip of t rows (one row of tiles)
can be decoded, added to the residual, normalized and re-encoded on its own. This pass
replaces the chain between one STL site's ``decode`` and the ``encode`` of each site reading
the normalized value by one ``stl::decode_norm_encode``, which writes only what the rest of
the graph still reads (``keep``): the residual sum (pre-norm blocks: the next residual add
reads it), the normalized value (post-norm blocks, BERT), or nothing.

Recognized norms: ``aten.layer_norm``, ``aten.rms_norm`` and the RMSNorm that
transformers' models spell out (``w * (h * rsqrt(mean(h², -1) + eps)).to(dtype)`` with
optional float32 casts). Between decode and add: a 1-D bias add, aliases, dropout in eval.
Runs before :mod:`.fuse_softmax_strip` and :mod:`.fuse_decode_encode`;
:mod:`.report_boundaries` reports every boundary left unfused.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from ..report import BoundaryRow
from ..runtime import ops as _ops  # noqa: F401  (registers stl::decode_norm_encode)
from ._encoded import Branch, hand_over, parse_branch, site_name, stacked_encoder, value_bytes
from ._graph import aten, insert_call, parameter_of
from ._row_strip import CHECKS, encodes_of, erase_region, fuse_strips
from .context import PassContext

stl = torch.ops.stl

_CASTS = (aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default)


def fuse_norm_strip(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Every decode → (bias) → residual add → norm → encodes chain becomes one
    ``stl::decode_norm_encode`` (with ``config.fuse`` and ``config.fuse_row_strip``); a row
    per chain, fused or not."""
    return fuse_strips(gm, ctx, _match_strip, _replace)


@dataclass
class RowNorm:
    """A recognized norm: ``kind(h) * weight + bias`` over the last dim."""

    kind: str  # "layer" | "rms"
    h: fx.Node  # the normalized tensor, as the norm reads it (casts stripped)
    weight: fx.Node | None
    bias: fx.Node | None
    eps: float | None
    nodes: list[fx.Node] = field(default_factory=list)  # the norm's own nodes


def _dtype(node: fx.Node) -> torch.dtype:
    return node.meta["val"].dtype


def _uncast(node: object, nodes: list[fx.Node]) -> object:
    """Skip casts (recording them in ``nodes``)."""
    while isinstance(node, fx.Node) and node.target in _CASTS:
        nodes.append(node)
        node = node.args[0]
    return node


def _one_dim_parameter(gm: fx.GraphModule, node: object, cols: int) -> bool:
    p = parameter_of(gm, node)
    return p is not None and p.dim() == 1 and p.shape[0] == cols


def _match_aten_norm(gm: fx.GraphModule, value: fx.Node, cols: int) -> RowNorm | None:
    args = list(value.args) + [None] * 5
    if value.target is aten.layer_norm.default:
        h, shape, weight, bias, eps = args[:5]
        kind, eps = "layer", 1e-5 if eps is None else eps
    elif value.target is aten.rms_norm.default:
        h, shape, weight, eps = args[:4]
        kind, bias = "rms", None
    else:
        return None
    if list(shape) != [cols] or not all(p is None or _one_dim_parameter(gm, p, cols)
                                        for p in (weight, bias)):
        return None
    return RowNorm(kind, h, weight, bias, eps, [value])


def _operands(node: object, target) -> tuple:
    """Both orders ``(a, b)``, ``(b, a)`` of a binary call of ``target``; () for any other
    node."""
    if not (isinstance(node, fx.Node) and node.target is target):
        return ()
    a, b = node.args[:2]
    return (a, b), (b, a)


def _input(node: object, target) -> object:
    """The first argument of a call of ``target``; None for any other node."""
    return node.args[0] if isinstance(node, fx.Node) and node.target is target else None


def _match_spelled_rms(gm: fx.GraphModule, value: fx.Node, cols: int) -> RowNorm | None:
    """``w * (H * rsqrt(mean(H ** 2, [-1], keepdim=True) + eps)).to(dtype)``, ``w *`` and
    the casts optional, either operand order of each ``*``, ``H = h.float()`` or ``h``."""
    nodes, weight, normed = [], None, value
    for param, other in _operands(value, aten.mul.Tensor):
        if _one_dim_parameter(gm, param, cols) and isinstance(other, fx.Node):
            nodes, weight, normed = [value], param, other
            break
    normed = _uncast(normed, nodes)
    for h, rsqrt in _operands(normed, aten.mul.Tensor):
        add = _input(rsqrt, aten.rsqrt.default)
        mean = _input(add, aten.add.Tensor)
        square = _input(mean, aten.mean.dim)
        if (_input(square, aten.pow.Tensor_Scalar) is h and square.args[1] == 2
                and isinstance(add.args[1], float)
                and list(mean.args[1] or ()) in ([-1], [h.meta["val"].dim() - 1])
                and (mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim"))):
            return RowNorm("rms", h, weight, None, add.args[1],
                           [*nodes, normed, rsqrt, add, mean, square])
    return None


def _match_norm(gm: fx.GraphModule, value: fx.Node) -> RowNorm | None:
    val = value.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() == 0 or not isinstance(val.shape[-1], int):
        return None
    cols = val.shape[-1]
    norm = _match_aten_norm(gm, value, cols) or _match_spelled_rms(gm, value, cols)
    if norm is not None:
        norm.h = _uncast(norm.h, norm.nodes)
    return norm


@dataclass
class NormStrip:
    """A matched chain: ``norm(residual + branch)`` read by ``consumers`` (encodes)."""

    branch: Branch
    residual: fx.Node | None
    add: fx.Node | None
    norm: RowNorm
    value: fx.Node
    consumers: list[fx.Node]
    passthrough: list[fx.Node]  # no-op views between ``value`` and some consumers
    problem: str = ""  # why it cannot be fused; empty when it can
    keep: str = "none"  # what the fused op writes: "sum" | "normed" | "none" (:func:`_keep`)
    kept: list[fx.Node] = field(default_factory=list)  # the nodes ``keep`` stands for

    def region(self) -> list[fx.Node]:
        nodes = [self.branch.decode, *self.branch.chain, *self.norm.nodes, *self.passthrough]
        return nodes + ([self.add] if self.add is not None else [])


def _match_strip(gm: fx.GraphModule, value: fx.Node) -> NormStrip | None:
    """:func:`_match`, and for a chain that encodes read, what it must keep."""
    strip = _match(gm, value)
    if strip is not None and strip.consumers:
        strip.keep, strip.kept = _keep(strip)
    return strip


def _match(gm: fx.GraphModule, value: fx.Node) -> NormStrip | None:
    """The chain ending at ``value`` (with ``problem`` set when it cannot be fused), or None
    when ``value`` is no norm of a decoded value."""
    norm = _match_norm(gm, value)
    if norm is None:
        return None
    h, residual, add = norm.h, None, None
    branch = parse_branch(gm, h, allow_activation=False)
    if branch is None and isinstance(h, fx.Node) and h.target is aten.add.Tensor:
        for decoded, other in (h.args[:2], h.args[1::-1]):
            branch = parse_branch(gm, decoded, allow_activation=False)
            if branch is not None:
                residual, add = other, h
                break
    if branch is None:
        return None
    strip = NormStrip(branch, residual, add, norm, value, *encodes_of(value))
    out = branch.decode.meta["val"]
    if residual is not None and not (
            isinstance(residual, fx.Node) and isinstance(residual.meta.get("val"), torch.Tensor)
            and _broadcasts_to(residual.meta["val"].shape, add.meta["val"].shape)
            and [str(d) for d in add.meta["val"].shape] == [str(d) for d in out.shape]
            and _dtype(residual) == out.dtype):
        strip.problem = "the residual does not broadcast to the decoded shape and dtype"
    elif _dtype(value) != out.dtype or _dtype(norm.h) != out.dtype:
        strip.problem = "the norm changes the dtype"
    elif len({c.args[2] for c in strip.consumers} | {branch.tile}) != 1:
        strip.problem = "the normalized value is encoded with another tile"
    return strip


def _outside_users(strip: NormStrip, node: fx.Node) -> list[fx.Node]:
    inside = set(strip.region()) | set(strip.consumers)
    return [u for u in node.users if u not in inside and u.target not in CHECKS]


def _broadcasts_to(shape, target) -> bool:
    """Whether a residual of ``shape``, added to a tensor giving ``target``, is broadcast over
    batch dims only (the add itself guarantees the sizes are compatible)."""
    return (2 <= len(shape) <= len(target)
            and all(str(s) != "1" or str(t) == "1" for s, t in zip(shape[-2:], target[-2:])))


def _keep(strip: NormStrip) -> tuple[str, list[fx.Node]]:
    """Which decoded tensor the fused op must still write, and the nodes that stand for it
    (sets ``strip.problem`` when the chain cannot be fused)."""
    # The sum, and casts of it to its own dtype, are the residual stream the graph reads on.
    h = strip.add or strip.branch.decode
    sums = [n for n in strip.norm.nodes if n.target in _CASTS and _dtype(n) == _dtype(h)]
    sums = [h] + [n for n in sums if _uncast(n, []) is h]
    read_sum = any(_outside_users(strip, n) for n in sums)
    read_normed = bool(_outside_users(strip, strip.value))
    private = set(sums) | {strip.value}
    if any(_outside_users(strip, n) for n in strip.region() if n not in private):
        strip.problem = "an intermediate value is read elsewhere"
    elif read_sum and read_normed:
        strip.problem = "both the residual sum and the normalized value are read elsewhere"
    if read_sum:
        return "sum", sums
    return ("normed", [strip.value]) if read_normed else ("none", [])


def _replace(graph: fx.Graph, strip: NormStrip, ctx: PassContext) -> None:
    order = {n: i for i, n in enumerate(graph.nodes)}
    readers = [u for n in strip.kept for u in _outside_users(strip, n)]
    first = min(strip.consumers + readers, key=order.__getitem__)
    branch, norm, keep = strip.branch, strip.norm, strip.keep
    with graph.inserting_before(first):
        ex = stacked_encoder(graph, strip.consumers, first)
        fused = insert_call(graph, stl.decode_norm_encode.default,
                            (branch.encoded, branch.d, branch.bias, strip.residual, norm.kind,
                             norm.weight, norm.bias, norm.eps, ex, keep, branch.tile,
                             branch.rows, branch.cols), first)
        kept = insert_call(graph, operator.getitem, (fused, 0), first)
        out = insert_call(graph, operator.getitem, (fused, 1), first)
        hand_over(graph, strip.consumers, out, first)
    for node in strip.kept:
        for user in _outside_users(strip, node):
            user.replace_input_with(node, kept)
    if keep == "none":
        graph.erase_node(kept)
    erase_region(graph, strip.region(), order)
    decoded = value_bytes(branch.decode)
    # Unfused, the decoded value is written and read, the sum (with a residual) written and
    # read, the normalized value written and read by each encode; fused, only ``kept`` is
    # written. The residual is read either way.
    unfused = decoded * ((5 if strip.residual is not None else 3) + len(strip.consumers))
    ctx.report.boundaries.append(BoundaryRow(
        producer=site_name(branch.decode), consumers=[site_name(c) for c in strip.consumers],
        kind="row-strip",
        reason="+".join(["bias"] * (branch.bias is not None)
                        + ["residual"] * (strip.residual is not None)
                        + [f"{norm.kind}_norm", f"keeps {keep}"]),
        bytes_saved=unfused - (0 if keep == "none" else decoded)))
