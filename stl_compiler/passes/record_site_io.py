"""Record the inputs and output of every matmul-like node on the example inputs.

The rewrite passes use them to report each converted site's relative output error, so users
see the accuracy cost of their rank before they deploy.
"""

from __future__ import annotations

import itertools

import torch
from torch import fx

from ._graph import aten
from .context import PassContext

MATMUL_OPS = (aten.linear.default, aten.addmm.default, aten.mm.default, aten.bmm.default,
              aten.matmul.default, aten.einsum.default)

_STORES: dict[str, dict] = {}
_keys = itertools.count()


def _record(key: str, name: str, inputs: list, output: torch.Tensor) -> None:
    detach = lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v
    _STORES[key][name] = (tuple(detach(v) for v in inputs), output.detach().clone())


def record_site_io(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    if not ctx.config.measure_error:
        return gm
    key = f"record{next(_keys)}"
    _STORES[key] = {}
    probes = []
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in MATMUL_OPS:
            inputs = [a for a in node.args if isinstance(a, fx.Node)]
            if node.target is aten.einsum.default:
                inputs = list(node.args[1])
            with gm.graph.inserting_after(node):
                probes.append(gm.graph.call_function(_record, (key, node.name, inputs, node)))
    gm.recompile()
    try:
        with torch.no_grad():
            gm(*ctx.example_args, **ctx.example_kwargs)
        ctx.site_io.update(_STORES[key])
    finally:
        del _STORES[key]
        for probe in probes:
            gm.graph.erase_node(probe)
    return gm
