"""Rewrite ``aten.linear`` / ``addmm`` / ``mm`` / ``matmul`` whose weight is a parameter.

The weight may be the parameter itself or its transpose (``x @ self.weight.T``, as Falcon's
``FalconLinear`` computes): either way the site is a linear, its weight encoded once. Each
distinct weight becomes one :class:`~stl_compiler.nn.STLLinear` submodule (encoded weight,
``ex``, ``d`` and bias as its parameters) called from every node that used it; the dense
parameters leave the module. A weight that something else also reads (an embedding tied to an
lm_head) is left dense and reported, so ties are never silently broken. Sites whose STL cost
exceeds dense (``STLConfig.max_cost_ratio`` / ``max_bytes_ratio``) stay dense.

``STLLinear`` layers the model already held are not rewritten; their report rows (added by
``stl_compile``) get their FLOPs and bytes here, from the example shapes in the graph.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import fx, nn

from ..functional import dense_bytes, dense_flops, stl_bytes, stl_flops
from ..nn import STLLinear
from ..report import SiteRow
from ..tiling import padded_rows, round_up
from ._graph import (
    LINEAR_SITE,
    aten,
    erase_dead,
    module_path,
    parameter_of,
    relative_error,
    set_submodule,
    shape_of,
    weight_operand,
)
from .context import PassContext, filter_module
from .detect_causal import detect_causal, site_causality


@dataclass
class LinearCall:
    node: fx.Node
    x: fx.Node
    weight: fx.Node  # the parameter's get_attr node
    bias: fx.Node | None
    transposed: bool  # weight stored (out, in) as in nn.Linear; else (in, out)
    via: fx.Node | None = None  # the transpose node between the parameter and the matmul

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
    if node.target is aten.linear.default:
        weight = parameter_of(gm, call.weight)
        return call if weight is not None and weight.dim() == 2 else None
    operand = weight_operand(gm, call.weight)
    if operand is None or parameter_of(gm, operand[0]).dim() != 2:
        return None
    call.weight, call.via = operand
    call.transposed = call.via is not None
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
    detect_causal(gm, ctx)  # resolves row_grouping=None (a no-op after the detect_causal pass)
    config = ctx.config
    _cost_preconverted_sites(gm, ctx)
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
        itemsize = weight.element_size()
        rows = [math.prod((shape_of(c.x) or (k,))[:-1]) for c in calls]
        row.dense_flops = sum(dense_flops(n, k, m) for n in rows)
        row.dense_bytes = sum(dense_bytes(n, k, m, itemsize=itemsize) for n in rows)
        ctx.report.sites.append(row)
        for call in calls:
            call.node.meta[LINEAR_SITE] = name

        # the site computes in its weight's dtype: it decides what basis="auto" resolves to
        reason = _skip_reason(gm, ctx, name, calls, k, m, weight.dtype)
        spec = config.site_spec(name, dtype=weight.dtype) if not reason else None
        if spec is not None:
            padded = [padded_rows(shape_of(c.x) or (k,), spec.tile, config.row_grouping)
                      for c in calls]
            row.stl_flops = sum(stl_flops(n, k, m, spec.tile, spec.rank) for n in padded)
            row.stl_bytes = sum(stl_bytes(n, k, m, spec.tile, spec.rank, itemsize=itemsize)
                                for n in padded)
            reason = config.cost_reason(row.dense_flops, row.stl_flops, row.dense_bytes,
                                        row.stl_bytes)
        if reason:
            row.reason = reason
            continue
        bias = parameter_of(gm, calls[0].bias)
        weight_t = weight.t() if calls[0].transposed else weight
        module = STLLinear.from_weight(weight_t, bias, spec.basis,
                                       row_grouping=config.row_grouping)
        used = {target} | ({calls[0].bias.target} if bias is not None else set())
        path = name if _owner_is_replaceable(gm, name, used) else f"{target}_stl"
        set_submodule(gm, path, module)

        row.converted, row.tile, row.rank, row.basis = True, spec.tile, spec.rank, spec.basis.name
        row.isolated = module.rows_isolated
        if ctx.report.causal_model is not None:
            row.causal = site_causality(spec.basis, config.row_grouping)
        row.rel_error = _measure(ctx, module, calls)
        for call in calls:
            with gm.graph.inserting_before(call.node):
                new = gm.graph.call_module(path, (call.current_x(),))
            new.meta.update(call.node.meta)
            call.node.replace_all_uses_with(new)
            gm.graph.erase_node(call.node)
        erase_dead(gm.graph, [c.via for c in calls if c.via is not None])
        attr_nodes = {c.weight for c in calls} | {c.bias for c in calls if c.bias is not None}
        _drop_dense_parameters(gm, used, attr_nodes)
    return gm


def _skip_reason(gm: fx.GraphModule, ctx: PassContext, name: str, calls: list[LinearCall],
                 k: int, m: int, dtype: torch.dtype) -> str:
    config = ctx.config
    own = {c.node for c in calls} | {c.via for c in calls if c.via is not None}
    for call in calls:
        readers = [u for u in call.weight.users if u not in own]
        if call.via is not None:
            readers += [u for u in call.via.users if u not in own]
        if readers:
            return (f"tied weight: also read by {readers[0].target} (converting would untie "
                    f"it); untie it in the model or skip this site")
    if len({c.transposed for c in calls}) > 1:
        return "unsupported pattern: one weight used both as W and as its transpose"
    biases = {c.bias.target if isinstance(c.bias, fx.Node) else c.bias for c in calls}
    if len(biases) > 1:
        return "unsupported pattern: one weight used with different biases"
    bias = calls[0].bias
    if bias is not None and parameter_of(gm, bias) is None:
        return "unsupported pattern: bias computed at run time"
    if "linear" not in config.targets_for():
        return "filtered: 'linear' not in config.targets"
    spec = config.site_spec(name, dtype=dtype)
    if spec is None:
        return "skipped by an override"
    owner = filter_module(gm, ctx, calls[0].weight.target.rpartition(".")[0])
    if config.filter_fn is not None and not config.filter_fn(owner, name):
        return "filtered by filter_fn"
    if min(k, m) < config.min_dim:
        return f"too small: min(in, out)={min(k, m)} < min_dim={config.min_dim}"
    if not config.pad and (k % spec.tile or m % spec.tile):
        return f"not divisible by tile {spec.tile} and pad=False"
    return ""


def _cost_preconverted_sites(gm: fx.GraphModule, ctx: PassContext) -> None:
    """FLOPs, bytes and example shape of the STLLinear layers the model already held, from
    the ``stl::encode`` node each call of such a layer starts with."""
    rows = {s.name: s for s in ctx.report.sites if s.preconverted}
    for node in gm.graph.nodes:
        row = rows.get(module_path(node))
        if row is None or node.target is not torch.ops.stl.encode.default:
            continue
        shape = shape_of(node.args[0])  # the layer's input, its tile rows at dim -2
        if shape is None:
            continue
        k, m = row.w_shape
        itemsize = node.args[0].meta["val"].element_size()
        real = math.prod(shape[:-1])
        padded = math.prod(shape[:-2]) * round_up(shape[-2], row.tile)
        first = row.dense_flops == 0
        row.x_shape = shape if first else row.x_shape
        row.calls = 1 if first else row.calls + 1
        row.dense_flops += dense_flops(real, k, m)
        row.stl_flops += stl_flops(padded, k, m, row.tile, row.rank)
        row.dense_bytes += dense_bytes(real, k, m, itemsize=itemsize)
        row.stl_bytes += stl_bytes(padded, k, m, row.tile, row.rank, itemsize=itemsize)


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
