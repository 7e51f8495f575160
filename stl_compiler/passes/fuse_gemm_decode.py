"""Fuse an STL site's r small GEMMs with its decode: ``bmm → stl::decode(_epilogue)`` becomes
one ``stl::gemm_decode``, whose CUDA kernel never writes the encoded product planes to memory.

A lowered linear site reads ``encode → reshape → bmm(·, Wh) → reshape → decode`` (or
``decode_epilogue`` with a bias). The pass takes every such decode whose product feeds nothing
else and rewrites it when :func:`stl_compiler.runtime.stl_gemm.fused_is_faster` says the
fused kernel measured faster for the site's (in, out, rank, tile-rows) on the graph's device
(tile-rows only when the shape is static). It runs after the decode → encode and row-strip
fusions: a decode those fused into the next site's encode never reaches this pass.

On CPU (and anything the kernel does not take) the fused op is the same ``bmm →
decode_epilogue`` composite, so the rewrite never changes results beyond rounding of the
kernel's own accumulation order on CUDA.
"""

from __future__ import annotations

import torch
from torch import fx

from ..runtime import stl_gemm
from ._graph import aten, concrete, erase_dead, insert_call
from .context import PassContext

stl = torch.ops.stl

_RESHAPES = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)


def fuse_gemm_decode(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    if not ctx.config.fuse:
        return gm
    graph = gm.graph
    for decode in [n for n in graph.nodes
                   if n.target in (stl.decode.default, stl.decode_epilogue.default)]:
        site = _match(decode)
        if site is None:
            continue
        product, bmm, planes, wh = site
        rank, kt, mt = (concrete(s) for s in wh.meta["val"].shape)
        tile_rows = planes.meta["val"].shape[-2]
        tile_rows = tile_rows if isinstance(tile_rows, int) else None
        tile = decode.args[-3]
        if not stl_gemm.fused_is_faster(kt * tile, mt * tile, rank, tile_rows,
                                        wh.meta["val"].device.type):
            continue
        if decode.target is stl.decode.default:
            encoded, d, tile, rows, cols = decode.args
            bias, activation, scale = None, "none", 1.0
        else:
            encoded, d, bias, activation, scale, tile, rows, cols = decode.args
        with graph.inserting_before(decode):
            xh = _encoded_input(graph, product, bmm, planes, decode)
            fused = insert_call(graph, stl.gemm_decode.default,
                                (xh, wh, d, bias, activation, scale, tile, rows, cols), decode)
        decode.replace_all_uses_with(fused)
        erase_dead(graph, [decode, product, bmm, planes])
    return gm


def _match(decode: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node, fx.Node] | None:
    """``(product, bmm, planes, wh)`` when ``decode`` reads ``reshape(bmm(planes, wh))`` (or
    the bmm itself) that nothing else reads, with a 3-D ``wh`` of the decoder's rank (a weight
    shared by every batch entry: not an activation × activation site)."""
    product = decode.args[0]
    bmm = product.args[0] if getattr(product, "target", None) in _RESHAPES else product
    if not (isinstance(bmm, fx.Node) and bmm.target is aten.bmm.default):
        return None
    if len(product.users) != 1 or (bmm is not product and len(bmm.users) != 1):
        return None
    planes, wh = bmm.args[:2]
    d = decode.args[1]
    vals = [n.meta.get("val") if isinstance(n, fx.Node) else None for n in (planes, wh, d)]
    if any(v is None for v in vals) or vals[1].dim() != 3:
        return None
    if str(vals[1].shape[0]) != str(vals[2].shape[0]):
        return None
    return product, bmm, planes, wh


def _encoded_input(graph: fx.Graph, product: fx.Node, bmm: fx.Node, planes: fx.Node,
                   decode: fx.Node) -> fx.Node:
    """The encoded activation ``(r, *b, a, K/t)`` in the batch layout the decode expects.

    The product ``(r, *b, a, M/t)`` is the bmm's ``(r, B·a, M/t)`` reshaped; the planes get
    the same batch dims. When the planes are themselves a reshape of a tensor of exactly that
    shape (the encode's output, flattened for the bmm), that tensor is used directly.
    """
    if product is bmm:
        return planes
    target_shape = [*product.args[1][:-1], planes.meta["val"].shape[-1]]
    xh = insert_call(graph, aten.reshape.default, (planes, target_shape), decode)
    source = planes.args[0] if planes.target in _RESHAPES else None
    if source is not None and [str(s) for s in source.meta["val"].shape] == [
            str(s) for s in xh.meta["val"].shape]:
        graph.erase_node(xh)
        return source
    return xh
