"""Report every decode → encode boundary the fusions left in the graph: the final pass.

Runs after every fusion (:data:`stl_compiler.passes.FUSIONS`). A boundary is a decode
(``stl::decode``, ``stl::decode_epilogue``, ``stl::gemm_decode``) whose value reaches an
``stl::encode`` within a few ops. Fused boundaries are gone from the graph (the fusion that
fused them wrote their row); boundaries a fusion rejected with its own reason are marked
(:func:`._encoded.mark_reported`). Every other one gets a ``not fused`` row here, with the
ops in between.
"""

from __future__ import annotations

from torch import fx

from ..report import BoundaryRow
from ._encoded import DECODES, is_reported, site_name, stl
from ._graph import aten
from .context import PassContext

_ROW_WISE = (aten.layer_norm.default, aten.native_layer_norm.default, aten.softmax.int,
             aten._softmax.default, aten.mean.dim, aten.rsqrt.default)


def report_boundaries(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """A ``not fused`` row in ``ctx.report.boundaries`` for every unreported boundary
    (nothing with ``config.fuse`` off: no boundary is then a fusion candidate)."""
    if ctx.config.fuse:
        _report_unfused(gm.graph, ctx)
    return gm


def _report_unfused(graph: fx.Graph, ctx: PassContext) -> None:
    """A row for every remaining decode whose value reaches an encode, with the reason."""
    for decode in graph.nodes:
        if decode.target not in DECODES or is_reported(decode):
            continue
        seen, frontier, between, encodes = set(), [decode], [], []
        for _ in range(12):
            nxt = []
            for node in frontier:
                for user in node.users:
                    if user in seen:
                        continue
                    seen.add(user)
                    (encodes if user.target is stl.encode.default else between).append(user)
                    if user.target is not stl.encode.default:
                        nxt.append(user)
            frontier = nxt
        if not encodes:
            continue
        ops = sorted({str(getattr(n.target, "overloadpacket", n.target)) for n in between
                      if n.op == "call_function"})
        row_wise = any(n.target in _ROW_WISE for n in between)
        row_reason = ("row-wise ops between that row-strip fusion does not match"
                      if ctx.config.fuse_row_strip else
                      "row-wise ops between (row-strip fusion is off: STLConfig.fuse_row_strip)")
        reason = (row_reason if row_wise
                  else "ops between are not element-wise or layout, or the decoded value is "
                       "used elsewhere")
        ctx.report.boundaries.append(BoundaryRow(
            producer=site_name(decode), consumers=sorted({site_name(e) for e in encodes}),
            kind="not fused", reason=f"{reason}: {', '.join(ops[:6])}"))
