"""Fuse an STL site's r small GEMMs with its decode: ``bmm → stl::decode(_epilogue)`` becomes
one ``stl::gemm_decode``, whose CUDA kernel never writes the encoded product planes to memory.

A lowered linear site reads ``encode → reshape → bmm(·, Wh) → reshape → decode`` (or
``decode_epilogue`` with a bias). The pass takes every such decode whose product feeds nothing
else and rewrites it when :func:`fused_is_faster` says the fused kernel measured faster for
the site's (in, out, rank). It runs after the decode → encode and row-strip fusions: a
decode those fused into the next site's encode never reaches this pass.

On CPU (and anything the kernel does not take) the fused op is the same ``bmm →
decode_epilogue`` composite, so the rewrite never changes results beyond rounding of the
kernel's own accumulation order on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from ..runtime import stl_gemm as _stl_gemm  # noqa: F401  (registers stl::gemm_decode)
from ._graph import aten, concrete, erase_dead, insert_call
from .context import PassContext

stl = torch.ops.stl

_RESHAPES = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)


@dataclass(frozen=True)
class FusedRegion:
    """Layer shapes (inclusive ranges of in_features, out_features, rank) where the fused
    kernel measured faster than ``encode → bmm → decode_epilogue`` on CUDA."""

    in_features: tuple[int, int]
    out_features: tuple[int, int]
    ranks: tuple[int, int]

    def contains(self, k: int, m: int, rank: int) -> bool:
        return (self.in_features[0] <= k <= self.in_features[1]
                and self.out_features[0] <= m <= self.out_features[1]
                and self.ranks[0] <= rank <= self.ranks[1])


#: Where the fused kernel won, from ``benchmarks/bench_stl_gemm.py`` (CUDA-graph replays,
#: encode + fused op against encode + bmm + decode_epilogue). Measured 2026-12-03 on an NVIDIA
#: H200 (torch 2.11, Triton 3.6), bf16, t = 4, r = 24, at 8224×1280→5120, 8224×5120→1280,
#: 8224×1280→1280, 4096×1152→4608, 16384×1024→4096, 4096×4096→4096 and 8192×4096→14336: the
#: fused path took 4.0–6.4× the unfused path's time at every shape (its kernel ran at
#: 0.07–0.14 of the bmm's speed, bound by L2 traffic: each small output block re-reads r
#: operand panels), so no region is listed and the pass leaves graphs unchanged until a
#: faster kernel is measured.
FUSED_FASTER: tuple[FusedRegion, ...] = ()


def fused_is_faster(in_features: int, out_features: int, rank: int) -> bool:
    """Whether ``stl::gemm_decode`` measured faster than the unfused path at this shape."""
    return any(region.contains(in_features, out_features, rank) for region in FUSED_FASTER)


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
        tile = decode.args[-3]
        if not fused_is_faster(kt * tile, mt * tile, rank):
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
