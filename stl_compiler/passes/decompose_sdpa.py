"""Decompose ``scaled_dot_product_attention`` into explicit QKᵀ and AV matmuls.

Runs only with ``STLConfig.decompose_sdpa``. The two matmuls become ordinary graph nodes
(labelled ``sdpa_qk`` / ``sdpa_av``) that :mod:`.rewrite_matmul` converts; everything between
them (scale, causal and explicit masks, softmax, dropout) is :func:`attention_probs`, which
follows the semantics of ``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, fx

from ..runtime.ops import causal_mask
from ._graph import aten, insert_call
from .context import PassContext

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
                  "enable_gqa": False}


def attention_probs(scores: Tensor, head_dim: int, attn_mask: Tensor | None, dropout_p: float,
                    is_causal: bool, scale: float | None) -> Tensor:
    """softmax(scale·QKᵀ + masks), then dropout: the part of SDPA between its two matmuls.

    The softmax is SDPA's own ``aten._safe_softmax``: a fully masked query row (left padding,
    padding masks) gets probabilities 0, so its output is 0 as SDPA's, where a plain softmax
    gives NaN that the STL tiles of the next matmul would spread to every row of the tile.
    """
    scores = scores * (1.0 / math.sqrt(head_dim) if scale is None else scale)
    rows, cols = scores.shape[-2], scores.shape[-1]
    if is_causal:
        scores = scores.masked_fill(causal_mask(rows, cols, scores.device), float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    probs = torch.ops.aten._safe_softmax.default(scores, -1)
    return torch.dropout(probs, dropout_p, True) if dropout_p > 0 else probs


def decompose_sdpa(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    if not ctx.config.decompose_sdpa:
        return gm
    graph = gm.graph
    for node in list(graph.nodes):
        if node.target is not aten.scaled_dot_product_attention.default:
            continue
        params = dict(_SDPA_DEFAULTS)
        params.update(zip(_SDPA_ARGS, node.args))
        params.update(node.kwargs)
        q, k, v = params["query"], params["key"], params["value"]
        head_dim = q.meta["val"].shape[-1]
        with graph.inserting_before(node):
            if params["enable_gqa"]:  # repeat key/value heads up to the query heads
                groups = q.meta["val"].shape[-3] // k.meta["val"].shape[-3]
                k = insert_call(graph, aten.repeat_interleave.self_int, (k, groups, -3), node)
                v = insert_call(graph, aten.repeat_interleave.self_int, (v, groups, -3), node)
            k_t = insert_call(graph, aten.transpose.int, (k, -2, -1), node)
            scores = insert_call(graph, aten.matmul.default, (q, k_t), node)
            scores.meta["stl_site_label"] = f"{node.name}_qk"
            probs = insert_call(graph, attention_probs,
                                (scores, head_dim, params["attn_mask"], params["dropout_p"],
                                 params["is_causal"], params["scale"]), node)
            out = insert_call(graph, aten.matmul.default, (probs, v), node)
            out.meta["stl_site_label"] = f"{node.name}_av"
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    return gm
