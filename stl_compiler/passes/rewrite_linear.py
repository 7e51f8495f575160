"""Rewrite ``aten.linear`` / ``addmm`` / ``mm`` / ``matmul`` whose weight is a parameter.

Each distinct weight becomes one :class:`~stl_compiler.nn.STLLinear` submodule (encoded
weight, ``ex``, ``d`` and bias as its parameters) called from every node that used it; the
dense parameters leave the module. A weight that something else also reads (an embedding tied
to an lm_head) is left dense and reported, so ties are never silently broken.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import fx, nn

from ..functional import dense_flops, stl_flops
from ..nn import STLLinear
from ..report import SiteRow
from ..tiling import padded_rows
from ._graph import aten, parameter_of, relative_error, set_submodule, shape_of
from .context import PassContext


@dataclass
class LinearCall:
    node: fx.Node
    x: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    transposed: bool  # weight stored (out, in) as in nn.Linear; else (in, out)

    def current_x(self) -> fx.Node:
        """The activation argument as the graph holds it now (earlier rewrites replace it)."""
        return self.node.args[1 if self.node.target is aten.addmm.default else 0]


def _match(gm: fx.GraphModule, node: fx.Node) -> LinearCall | None:
    if node.op != "call_function":
        return None
    args = node.args
    if node.target is aten.linear.default:
        bias = args[2] if len(args) > 2 else node.kwargs.get("bias")
        call = LinearCall(node, args[0], args[1], bias, transposed=True)
    elif node.target is aten.addmm.default:
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return None
        call = LinearCall(node, args[1], args[2], args[0], transposed=False)
    elif node.target in (aten.mm.default, aten.matmul.default):
        call = LinearCall(node, args[0], args[1], None, transposed=False)
    else:
        return None
    weight = parameter_of(gm, call.weight)
    if weight is None or weight.dim() != 2:
        return None
    return call


def _site_name(weight_target: str) -> str:
    return weight_target[: -len(".weight")] if weight_target.endswith(".weight") else weight_target


def _owner_is_replaceable(gm: fx.GraphModule, path: str, used: set[str]) -> bool:
    """True when the module at ``path`` holds nothing but the parameters this site consumes."""
    try:
        owner = gm.get_submodule(path)
    except AttributeError:
        return False
    own = {f"{path}.{name}" for name, _ in owner.named_parameters(recurse=False)}
    return (path != "" and own <= used and not list(owner.children())
            and not list(owner.buffers(recurse=False)))


def rewrite_linear(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    config = ctx.config
    groups: dict[str, list[LinearCall]] = defaultdict(list)
    for node in gm.graph.nodes:
        call = _match(gm, node)
        if call is not None:
            groups[call.weight.target].append(call)

    for target, calls in groups.items():
        name = _site_name(target)
        weight = gm.get_parameter(target)
        k, m = (weight.shape[1], weight.shape[0]) if calls[0].transposed else tuple(weight.shape)
        x_shape = shape_of(calls[0].x) or (k,)
        row = SiteRow(name=name, kind="linear", op=str(calls[0].node.target.overloadpacket),
                      x_shape=x_shape, w_shape=(k, m), converted=False, calls=len(calls))
        row.dense_flops = sum(dense_flops(math.prod((shape_of(c.x) or (k,))[:-1]), k, m)
                              for c in calls)
        ctx.report.sites.append(row)

        reason = _skip_reason(gm, ctx, name, calls, k, m)
        if reason:
            row.reason = reason
            continue
        spec = config.site_spec(name)
        bias = parameter_of(gm, calls[0].bias)
        weight_t = weight.t() if calls[0].transposed else weight
        module = STLLinear.from_weight(weight_t, bias, spec.basis,
                                       row_grouping=config.row_grouping)
        used = {target} | ({calls[0].bias.target} if bias is not None else set())
        path = name if _owner_is_replaceable(gm, name, used) else f"{target}_stl"
        set_submodule(gm, path, module)

        row.converted, row.tile, row.rank, row.basis = True, spec.tile, spec.rank, spec.basis.name
        row.stl_flops = sum(
            stl_flops(padded_rows(shape_of(c.x) or (k,), spec.tile, config.row_grouping),
                      k, m, spec.tile, spec.rank) for c in calls)
        row.rel_error = _measure(ctx, module, calls)
        for call in calls:
            with gm.graph.inserting_before(call.node):
                new = gm.graph.call_module(path, (call.current_x(),))
            new.meta.update(call.node.meta)
            call.node.replace_all_uses_with(new)
            gm.graph.erase_node(call.node)
        attr_nodes = {c.weight for c in calls} | {c.bias for c in calls if c.bias is not None}
        _drop_dense_parameters(gm, used, attr_nodes)
    return gm


def _skip_reason(gm: fx.GraphModule, ctx: PassContext, name: str, calls: list[LinearCall],
                 k: int, m: int) -> str:
    config = ctx.config
    for call in calls:
        readers = [u for u in call.weight.users if u not in {c.node for c in calls}]
        if readers:
            return (f"tied weight: also read by {readers[0].target} (converting would untie "
                    f"it); untie it in the model or skip this site")
    biases = {c.bias.target if isinstance(c.bias, fx.Node) else c.bias for c in calls}
    if len(biases) > 1:
        return "unsupported pattern: one weight used with different biases"
    bias = calls[0].bias
    if bias is not None and parameter_of(gm, bias) is None:
        return "unsupported pattern: bias computed at run time"
    if "linear" not in config.targets:
        return "filtered: 'linear' not in config.targets"
    spec = config.site_spec(name)
    if spec is None:
        return "skipped by an override"
    if config.filter_fn is not None and not config.filter_fn(name, calls[0].node):
        return "filtered by filter_fn"
    if min(k, m) < config.min_dim:
        return f"too small: min(in, out)={min(k, m)} < min_dim={config.min_dim}"
    if not config.pad and (k % spec.tile or m % spec.tile):
        return f"not divisible by tile {spec.tile} and pad=False"
    return ""


@torch.no_grad()
def _measure(ctx: PassContext, module: STLLinear, calls: list[LinearCall]) -> float | None:
    pairs = []
    for call in calls:
        recorded = ctx.site_io.get(call.node.name)
        if recorded is None:
            continue
        inputs, output = recorded
        x = inputs[1] if call.node.target is aten.addmm.default else inputs[0]
        pairs.append((module(x), output))
    return relative_error(pairs)


def _drop_dense_parameters(gm: fx.GraphModule, targets: set[str], nodes: set[fx.Node]
                           ) -> None:
    for node in nodes:
        if not node.users:
            gm.graph.erase_node(node)
    for target in targets:
        owner_path, _, attr = target.rpartition(".")
        owner = gm.get_submodule(owner_path)
        if not isinstance(owner, STLLinear) and isinstance(getattr(owner, attr, None),
                                                           nn.Parameter):
            delattr(owner, attr)
