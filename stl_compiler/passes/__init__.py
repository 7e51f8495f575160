"""Graph passes, one per file, each ``(gm, ctx) -> gm``, in four phases.

:func:`stl_compiler.stl_compile` runs capture (:mod:`stl_compiler.capture`), then
:func:`rewrite` (:data:`REWRITES`, on the captured aten graph: sites become ``STLLinear`` /
``STLMatmul`` modules), :func:`lower` (:data:`LOWERING`: the one re-capture, which turns
those modules into ``stl::`` op nodes), :func:`fuse` (:data:`FUSIONS`, on the lowered graph)
and :func:`report` (:data:`REPORTING`: the boundary rows fusions did not write). What each
pass may assume and guarantees: ``passes/README.md``.

The graph is linted and recompiled after every pass (:func:`run_passes`), and each pass's
wall time lands in ``ctx.report.pass_seconds``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from torch import fx

from .canonicalize_pointwise import canonicalize_pointwise
from .context import PassContext
from .decompose_sdpa import decompose_sdpa
from .detect_causal import check_causal, detect_causal
from .fuse_decode_encode import fuse_decode_encode
from .fuse_gemm_decode import fuse_gemm_decode
from .fuse_norm_strip import fuse_norm_strip
from .fuse_softmax_strip import fuse_softmax_strip
from .lower_sites import lower_sites
from .record_site_io import record_site_io
from .report_boundaries import report_boundaries
from .rewrite_linear import rewrite_linear
from .rewrite_matmul import rewrite_matmul

Pass = Callable[[fx.GraphModule, PassContext], fx.GraphModule]

#: Phase 1, on the captured graph: find causality, decompose SDPA, record each matmul's
#: example inputs/output, swap matmul sites for STL modules, refuse causality breaks.
REWRITES: list[Pass] = [
    detect_causal,
    decompose_sdpa,
    record_site_io,
    rewrite_linear,
    rewrite_matmul,
    check_causal,
]
#: Phase 2: the STL modules become ``stl::encode → bmm → stl::decode`` nodes.
LOWERING: list[Pass] = [lower_sites]
#: Phase 3, on the lowered graph: decode → encode boundaries become fused ops.
FUSIONS: list[Pass] = [
    canonicalize_pointwise,
    fuse_norm_strip,
    fuse_softmax_strip,
    fuse_decode_encode,
    fuse_gemm_decode,
]
#: Phase 4: the boundaries left unfused, reported (reads the graph, changes nothing).
REPORTING: list[Pass] = [report_boundaries]

#: Every pass of :func:`stl_compiler.stl_compile`, in order.
PASSES: list[Pass] = [*REWRITES, *LOWERING, *FUSIONS, *REPORTING]


def run_passes(gm: fx.GraphModule, ctx: PassContext, passes: list[Pass] | None = None
               ) -> fx.GraphModule:
    for pass_ in PASSES if passes is None else passes:
        start = time.perf_counter()
        gm = pass_(gm, ctx)
        gm.graph.lint()
        gm.recompile()
        ctx.report.pass_seconds[pass_.__name__] = time.perf_counter() - start
    return gm


def rewrite(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Phase 1: :data:`REWRITES`."""
    return run_passes(gm, ctx, REWRITES)


def lower(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Phase 2: :data:`LOWERING`."""
    return run_passes(gm, ctx, LOWERING)


def fuse(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Phase 3: :data:`FUSIONS`."""
    return run_passes(gm, ctx, FUSIONS)


def report(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Phase 4: :data:`REPORTING`."""
    return run_passes(gm, ctx, REPORTING)


__all__ = ["FUSIONS", "LOWERING", "PASSES", "REPORTING", "REWRITES", "PassContext", "fuse",
           "lower", "report", "rewrite", "run_passes"]
