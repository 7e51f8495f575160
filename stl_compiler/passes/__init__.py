"""Graph passes, one per file, each ``(gm, ctx) -> gm``, run in :data:`PASSES` order.

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
from .fuse_decode_encode import fuse_decode_encode
from .fuse_gemm_decode import fuse_gemm_decode
from .fuse_row_strip import fuse_row_strip
from .lower_sites import lower_sites
from .record_site_io import record_site_io
from .rewrite_linear import rewrite_linear
from .rewrite_matmul import rewrite_matmul

Pass = Callable[[fx.GraphModule, PassContext], fx.GraphModule]

#: The ordered pass list of :func:`stl_compiler.stl_compile`.
PASSES: list[Pass] = [
    decompose_sdpa,
    record_site_io,
    rewrite_linear,
    rewrite_matmul,
    lower_sites,
    canonicalize_pointwise,
    fuse_row_strip,
    fuse_decode_encode,
    fuse_gemm_decode,
]


def run_passes(gm: fx.GraphModule, ctx: PassContext, passes: list[Pass] | None = None
               ) -> fx.GraphModule:
    for pass_ in PASSES if passes is None else passes:
        start = time.perf_counter()
        gm = pass_(gm, ctx)
        gm.graph.lint()
        gm.recompile()
        ctx.report.pass_seconds[pass_.__name__] = time.perf_counter() - start
    return gm


__all__ = ["PASSES", "PassContext", "run_passes"]
