"""Record the inputs and output of every matmul-like node on the example inputs.

The rewrite passes use them to report each converted site's relative output error, so users
see the accuracy cost of their rank before they deploy.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from ._graph import aten
from .context import PassContext

MATMUL_OPS = (aten.linear.default, aten.addmm.default, aten.mm.default, aten.bmm.default,
              aten.matmul.default, aten.einsum.default)

class _Recorder:
    """The probe the pass inserts after each matmul node: keeps copies of the node's inputs
    and output in ``store`` (the pass context's ``site_io``; no state outlives the pass)."""

    def __init__(self, store: dict[str, tuple[tuple[Any, ...], torch.Tensor]]) -> None:
        self.store = store

    def record(self, name: str, inputs: list, output: torch.Tensor) -> None:
        detach = lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v
        self.store[name] = (tuple(detach(v) for v in inputs), output.detach().clone())


def record_site_io(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Run the example inputs once with a probe after every node in :data:`MATMUL_OPS`
    (``aten.einsum``: its operand list); fill ``ctx.site_io`` (node name → copies of the
    inputs and output) and remove the probes again: the graph leaves unchanged."""
    if not ctx.config.measure_error:
        return gm
    recorded: dict[str, tuple[tuple[Any, ...], torch.Tensor]] = {}
    recorder = _Recorder(recorded)
    probes = []
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in MATMUL_OPS:
            inputs = [a for a in node.args if isinstance(a, fx.Node)]
            if node.target is aten.einsum.default:
                inputs = list(node.args[1])
            with gm.graph.inserting_after(node):
                probes.append(gm.graph.call_function(recorder.record, (node.name, inputs, node)))
    gm.recompile()
    try:
        with torch.no_grad():
            gm(*ctx.example_args, **ctx.example_kwargs)
        ctx.site_io.update(recorded)
    finally:
        for probe in probes:
            gm.graph.erase_node(probe)
    return gm
