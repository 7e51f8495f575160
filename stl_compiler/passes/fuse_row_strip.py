"""Row-strip fusion: decode → (bias) → residual add → LayerNorm / RMSNorm → encode(s).

A norm mixes the columns of a row but never two rows, so a strip of t rows (one row of tiles)
can be decoded, added to the residual, normalized and re-encoded on its own. This pass
replaces the chain between one STL site's ``decode`` and the ``encode`` of each site reading
the normalized value by one ``stl::decode_norm_encode``, which writes only what the rest of
the graph still reads (``keep``): the residual sum (pre-norm blocks: the next residual add
reads it), the normalized value (post-norm blocks, BERT), or nothing.

Recognized norms: ``aten.layer_norm``, ``aten.rms_norm`` and the RMSNorm that
transformers' models spell out (``w * (h * rsqrt(mean(h², -1) + eps)).to(dtype)`` with
optional float32 casts). Between decode and add: a 1-D bias add, aliases, dropout in eval.
Runs before :mod:`.fuse_decode_encode`; :mod:`.report_boundaries` reports every boundary left
unfused.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from ..report import BoundaryRow
from ..runtime import ops as _ops  # noqa: F401  (registers stl::decode_norm_encode)
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
from ._graph import aten, erase_dead, insert_call, parameter_of
from .context import PassContext
from .detect_causal import is_causal_mask

stl = torch.ops.stl

_CASTS = (aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default)
_CHECKS = (aten._assert_tensor_metadata.default,)  # dtype asserts of export; no outputs


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


def _match_spelled_rms(gm: fx.GraphModule, value: fx.Node, cols: int) -> RowNorm | None:
    """``w * (H * rsqrt(mean(H ** 2, [-1], keepdim) + eps)).to(dtype)``, ``H = h.float()``."""
    nodes, weight, node = [], None, value
    if node.target is aten.mul.Tensor:
        a, b = node.args[:2]
        for param, other in ((a, b), (b, a)):
            if _one_dim_parameter(gm, param, cols) and isinstance(other, fx.Node):
                nodes.append(node)
                weight, node = param, other
                break
    node = _uncast(node, nodes)
    if not (isinstance(node, fx.Node) and node.target is aten.mul.Tensor):
        return None
    nodes.append(node)
    for h, rsqrt in (node.args[:2], node.args[1::-1]):
        if not (isinstance(rsqrt, fx.Node) and rsqrt.target is aten.rsqrt.default):
            continue
        add = rsqrt.args[0]
        if not (isinstance(add, fx.Node) and add.target is aten.add.Tensor
                and isinstance(add.args[1], float)):
            continue
        mean = add.args[0]
        if not (isinstance(mean, fx.Node) and mean.target is aten.mean.dim
                and list(mean.args[1]) in ([-1], [h.meta["val"].dim() - 1])
                and (mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim"))):
            continue
        square = mean.args[0]
        if not (isinstance(square, fx.Node) and square.target is aten.pow.Tensor_Scalar
                and square.args[0] is h and square.args[1] == 2):
            continue
        nodes += [rsqrt, add, mean, square]
        return RowNorm("rms", h, weight, None, add.args[1], nodes)
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
class Strip:
    """A matched chain: ``norm(residual + branch)`` read by ``consumers`` (encodes)."""

    branch: Branch
    residual: fx.Node | None
    add: fx.Node | None
    norm: RowNorm
    value: fx.Node
    consumers: list[fx.Node]
    passthrough: list[fx.Node]  # no-op views between ``value`` and some consumers
    problem: str = ""  # why it cannot be fused; empty when it can

    def region(self) -> list[fx.Node]:
        nodes = [self.branch.decode, *self.branch.chain, *self.norm.nodes, *self.passthrough]
        return nodes + ([self.add] if self.add is not None else [])


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


def _encodes_of(value: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
    """The encodes reading ``value`` directly or through no-op views whose only readers are
    such encodes (and views), and those views."""
    consumers, views = [], []
    for user in value.users:
        if user.target is stl.encode.default and user.args[0] is value:
            consumers.append(user)
        elif _is_noop(user):
            below, below_views = _encodes_of(user)
            if all(u in below or u in below_views for u in user.users):
                consumers += below
                views += [user, *below_views]
    return consumers, views


def _match(gm: fx.GraphModule, value: fx.Node) -> Strip | None:
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
    strip = Strip(branch, residual, add, norm, value, *_encodes_of(value))
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


def _outside_users(strip: Strip, node: fx.Node) -> list[fx.Node]:
    inside = set(strip.region()) | set(strip.consumers)
    return [u for u in node.users if u not in inside and u.target not in _CHECKS]


def _broadcasts_to(shape, target) -> bool:
    """Whether a residual of ``shape``, added to a tensor giving ``target``, is broadcast over
    batch dims only (the add itself guarantees the sizes are compatible)."""
    return (2 <= len(shape) <= len(target)
            and all(str(s) != "1" or str(t) == "1" for s, t in zip(shape[-2:], target[-2:])))


def _keep(strip: Strip) -> tuple[str, list[fx.Node]]:
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


def fuse_row_strip(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    if not (ctx.config.fuse and ctx.config.fuse_row_strip):
        return gm
    graph = gm.graph
    # A chain's nodes are ancestors of its norm, so later candidates are never erased ones.
    for value in [n for n in graph.nodes if n.op == "call_function"]:
        strip = _match(gm, value) or _match_softmax(gm, value)
        if strip is None or not strip.consumers:
            continue
        keep = _keep(strip) if isinstance(strip, Strip) else None
        mark_reported(strip.branch.decode)  # its row is written here, fused or not
        if strip.problem:
            ctx.report.boundaries.append(BoundaryRow(
                site_name(strip.branch.decode), [site_name(c) for c in strip.consumers],
                "not fused", f"row-strip: {strip.problem}"))
        elif keep is None:
            _replace_softmax(graph, strip, ctx)
        else:
            _replace(graph, strip, *keep, ctx)
    return gm


def _erase_region(graph: fx.Graph, region: list[fx.Node], order: dict[fx.Node, int]) -> None:
    """Erase a replaced chain: its export dtype asserts, then every node left unused."""
    for node in region:
        for check in [u for u in node.users if u.target in _CHECKS]:
            graph.erase_node(check)
    erase_dead(graph, sorted(region, key=order.__getitem__, reverse=True))


def _replace(graph: fx.Graph, strip: Strip, keep: str, kept_nodes: list[fx.Node],
             ctx: PassContext) -> None:
    order = {n: i for i, n in enumerate(graph.nodes)}
    readers = [u for n in kept_nodes for u in _outside_users(strip, n)]
    first = min(strip.consumers + readers, key=order.__getitem__)
    branch, norm = strip.branch, strip.norm
    with graph.inserting_before(first):
        ex = stacked_encoder(graph, strip.consumers, first)
        fused = insert_call(graph, stl.decode_norm_encode.default,
                            (branch.encoded, branch.d, branch.bias, strip.residual, norm.kind,
                             norm.weight, norm.bias, norm.eps, ex, keep, branch.tile,
                             branch.rows, branch.cols), first)
        kept = insert_call(graph, operator.getitem, (fused, 0), first)
        out = insert_call(graph, operator.getitem, (fused, 1), first)
        hand_over(graph, strip.consumers, out, first)
    for node in kept_nodes:
        for user in _outside_users(strip, node):
            user.replace_input_with(node, kept)
    if keep == "none":
        graph.erase_node(kept)
    _erase_region(graph, strip.region(), order)
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


# ---------------------------------------------------------------------------------------------
# Attention: decode(QKᵀ) → scale → causal / explicit mask → softmax → encode(s) for AV.


@dataclass
class SoftmaxStrip:
    """``softmax(scale * branch + mask)`` read by ``consumers`` (encodes)."""

    branch: Branch
    scale: float
    mask: fx.Node | None
    causal: fx.Node | None  # the ``~ones(rows, cols).tril()`` mask node, when causal
    nodes: list[fx.Node]  # scale, mask and softmax ops, from the decode on
    consumers: list[fx.Node]
    passthrough: list[fx.Node]
    problem: str = ""


def _parse_scores(gm: fx.GraphModule, node: object, found: dict) -> Branch | None:
    """Walk from the softmax input back to a decode through at most one scale and the masks,
    recording them in ``found`` (keys scale, mask, causal, nodes)."""
    if not isinstance(node, fx.Node):
        return None
    if node.target is aten.masked_fill.Scalar and node.args[2] == float("-inf"):
        key = "causal" if is_causal_mask(node.args[1], node) else "mask"
        if found.get(key) is None:
            found[key] = node.args[1]
            found["nodes"].append(node)
            return _parse_scores(gm, node.args[0], found)
        return None
    if node.target is aten.add.Tensor and found.get("mask") is None:
        for scores, mask in (node.args[:2], node.args[1::-1]):
            if isinstance(mask, fx.Node) and mask.meta["val"].dtype.is_floating_point:
                trial = {**found, "mask": mask, "nodes": [*found["nodes"], node]}
                branch = _parse_scores(gm, scores, trial)
                if branch is not None:
                    found.update(trial)
                    return branch
        return None
    if node.target in (aten.mul.Tensor, aten.div.Tensor) and "scale" not in found:
        scores, factor = node.args[:2]
        if node.target is aten.mul.Tensor and isinstance(scores, (int, float)):
            scores, factor = factor, scores
        if isinstance(factor, (int, float)) and not isinstance(factor, bool):
            found["scale"] = float(factor) if node.target is aten.mul.Tensor else 1.0 / factor
            found["nodes"].append(node)
            return _parse_scores(gm, scores, found)
        return None
    branch = parse_branch(gm, node, allow_activation=False)
    return branch if branch is not None and branch.bias is None else None


def _is_last_dim_softmax(value: fx.Node) -> bool:
    """A softmax over the last dim with no dtype change: ``softmax``, ``_softmax`` (no half to
    float) or SDPA's ``_safe_softmax`` (what :mod:`.decompose_sdpa` writes; 0 for a fully
    masked row, as ``stl::decode_softmax_encode`` gives for every spelling: a plain softmax's
    NaN there would only spread)."""
    if value.target is aten._softmax.default:
        plain = not value.args[2]
    elif value.target in (aten.softmax.int, aten._safe_softmax.default):
        dtype = value.args[2] if len(value.args) > 2 else value.kwargs.get("dtype")
        plain = dtype in (None, value.args[0].meta["val"].dtype)
    else:
        return False
    ndim = value.meta["val"].dim()
    return plain and value.args[1] % ndim == ndim - 1


def _match_softmax(gm: fx.GraphModule, value: fx.Node) -> SoftmaxStrip | None:
    if not _is_last_dim_softmax(value):
        return None
    found = {"nodes": [value]}
    branch = _parse_scores(gm, value.args[0], found)
    if branch is None:
        return None
    strip = SoftmaxStrip(branch, found.get("scale", 1.0), found.get("mask"),
                         found.get("causal"), found["nodes"], *_encodes_of(value))
    inside = set(found["nodes"]) | set(branch.chain) | set(strip.passthrough)
    inside |= {branch.decode, *strip.consumers}
    region = [branch.decode, *branch.chain, *found["nodes"], *strip.passthrough]
    if any(u not in inside and u.target not in _CHECKS for n in region for u in n.users):
        strip.problem = "the scores or the probabilities are read elsewhere"
    elif len({c.args[2] for c in strip.consumers} | {branch.tile}) != 1:
        strip.problem = "the probabilities are encoded with another tile"
    return strip


def _replace_softmax(graph: fx.Graph, strip: SoftmaxStrip, ctx: PassContext) -> None:
    order = {n: i for i, n in enumerate(graph.nodes)}
    first = min(strip.consumers, key=order.__getitem__)
    branch = strip.branch
    with graph.inserting_before(first):
        ex = stacked_encoder(graph, strip.consumers, first)
        out = insert_call(graph, stl.decode_softmax_encode.default,
                          (branch.encoded, branch.d, strip.scale, strip.mask,
                           strip.causal is not None, ex, branch.tile, branch.rows, branch.cols),
                          first)
        hand_over(graph, strip.consumers, out, first)
    causal = [strip.causal, strip.causal.args[0], strip.causal.args[0].args[0]] \
        if strip.causal is not None else []
    _erase_region(graph, [branch.decode, *branch.chain, *strip.nodes, *strip.passthrough,
                          *causal], order)
    ctx.report.boundaries.append(BoundaryRow(
        producer=site_name(branch.decode), consumers=[site_name(c) for c in strip.consumers],
        kind="row-strip",
        reason="+".join([f"scale {strip.scale:g}"] * (strip.scale != 1.0)
                        + ["causal"] * (strip.causal is not None)
                        + ["mask"] * (strip.mask is not None) + ["softmax"]),
        # Unfused, the decode writes the scores and each op between reads and writes them
        # once; each encode reads the probabilities. Fused, nothing decoded is written.
        bytes_saved=value_bytes(branch.decode) * (1 + 2 * len(strip.nodes)
                                                  + len(strip.consumers))))
