"""Softmax-strip fusion: decode(QKᵀ) → scale → causal / explicit mask → softmax → encode(s).

A softmax over the keys mixes the columns of a row but never two rows, so a strip of t query
rows (one row of tiles) can be decoded, scaled, masked, normalized and re-encoded on its own.
This pass replaces the chain between the QKᵀ site's ``decode`` and the ``encode`` of the AV
site by one ``stl::decode_softmax_encode``; the scores and the probabilities are never
written. The causal mask (``runtime.ops.causal_mask``, written by :mod:`.decompose_sdpa`) is
recognized by :func:`.detect_causal.is_causal_mask` and applied inside the op without reading
a mask tensor. Runs after :mod:`.fuse_norm_strip` and before :mod:`.fuse_decode_encode`;
:mod:`.report_boundaries` reports every boundary left unfused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from ..report import BoundaryRow
from ..runtime import ops as _ops  # noqa: F401  (registers stl::decode_softmax_encode)
from ._encoded import Branch, hand_over, parse_branch, site_name, stacked_encoder, value_bytes
from ._graph import aten, insert_call
from ._row_strip import CHECKS, encodes_of, erase_region, fuse_strips
from .context import PassContext
from .detect_causal import is_causal_mask

stl = torch.ops.stl


def fuse_softmax_strip(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Every decode(QKᵀ) → scale → masks → softmax → encodes chain becomes one
    ``stl::decode_softmax_encode`` (with ``config.fuse`` and ``config.fuse_row_strip``); a
    row per chain, fused or not."""
    return fuse_strips(gm, ctx, _match, _replace)


@dataclass
class SoftmaxStrip:
    """``softmax(scale * branch + mask)`` read by ``consumers`` (encodes)."""

    branch: Branch
    scale: float
    mask: fx.Node | None
    causal: fx.Node | None  # the ``~ones(rows, cols).tril()`` mask node, when causal
    nodes: list[fx.Node]  # scale, mask and softmax ops, from the decode on
    consumers: list[fx.Node]
    passthrough: list[fx.Node]  # no-op views between the softmax and some consumers
    problem: str = ""  # why it cannot be fused; empty when it can


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


def _match(gm: fx.GraphModule, value: fx.Node) -> SoftmaxStrip | None:
    """The chain ending at the softmax ``value`` (with ``problem`` set when it cannot be
    fused), or None when ``value`` is no last-dim softmax of decoded scores."""
    if not _is_last_dim_softmax(value):
        return None
    found = {"nodes": [value]}
    branch = _parse_scores(gm, value.args[0], found)
    if branch is None:
        return None
    strip = SoftmaxStrip(branch, found.get("scale", 1.0), found.get("mask"),
                         found.get("causal"), found["nodes"], *encodes_of(value))
    inside = set(found["nodes"]) | set(branch.chain) | set(strip.passthrough)
    inside |= {branch.decode, *strip.consumers}
    region = [branch.decode, *branch.chain, *found["nodes"], *strip.passthrough]
    if any(u not in inside and u.target not in CHECKS for n in region for u in n.users):
        strip.problem = "the scores or the probabilities are read elsewhere"
    elif len({c.args[2] for c in strip.consumers} | {branch.tile}) != 1:
        strip.problem = "the probabilities are encoded with another tile"
    return strip


def _replace(graph: fx.Graph, strip: SoftmaxStrip, ctx: PassContext) -> None:
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
    erase_region(graph, [branch.decode, *branch.chain, *strip.nodes, *strip.passthrough,
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
