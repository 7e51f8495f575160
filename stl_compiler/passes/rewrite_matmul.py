"""Rewrite activation × activation products (``matmul``, ``bmm``, ``mm``, batched-matmul
``einsum``: attention QKᵀ and AV) into :class:`~stl_compiler.nn.STLMatmul` sites, with both
operands encoded at run time. Other matmul-like ops stay dense and are reported.

In a model that already holds ``STLLinear`` layers (calibrated or trained), these sites stay
dense unless ``STLConfig.targets`` names "matmul" explicitly: converting them would add
uncalibrated error to a tuned model. Either way a warning says what happened. This is the last
rewrite pass, so it also warns about override patterns that matched no site.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import fx

from ..functional import dense_bytes, dense_flops, stl_bytes, stl_flops
from ..nn import STLLinear, STLMatmul
from ..report import SiteRow
from ._graph import (
    LINEAR_SITE,
    aten,
    insert_call,
    module_path,
    relative_error,
    set_submodule,
    shape_of,
    weight_operand,
)
from .context import PassContext, warn_unused_overrides
from .detect_causal import MATMUL_DENSE_REASON, detect_causal, site_causality

_MATMULS = (aten.matmul.default, aten.bmm.default, aten.mm.default)
#: Matmul-like ops the pass knows it does not rewrite: reported as dense.
UNSUPPORTED = (aten.baddbmm.default, aten.addbmm.default, aten.mv.default,
               aten.addmv.default, aten.dot.default, aten.convolution.default,
               aten.conv1d.default, aten.conv2d.default, aten.conv3d.default)


def einsum_as_matmul(equation: str) -> bool | None:
    """For a two-operand batched-matmul einsum, whether the second operand is transposed
    (``"bhqd,bhkd->bhqk"`` → True, ``"bij,bjk->bik"`` → False); None for anything else."""
    eq = equation.replace(" ", "").replace("...", "#")
    if "->" not in eq:
        return None
    lhs, out = eq.split("->")
    operands = lhs.split(",")
    if len(operands) != 2 or min(map(len, operands)) < 2:
        return None
    a, b = operands
    batch, i, j = a[:-2], a[-2], a[-1]
    if b[:-2] != batch or out[:-2] != batch or len(set(a)) != len(a):
        return None
    if b[-2] == j and out[-2:] == i + b[-1] and b[-1] not in a:
        return False
    if b[-1] == j and out[-2:] == i + b[-2] and b[-2] not in a:
        return True
    return None


def _inside_stl_module(node: fx.Node) -> bool:
    """The node is part of an STL layer the model already had (its batched GEMM)."""
    stack = node.meta.get("nn_module_stack") or {}
    return any(cls.startswith(f"{STLLinear.__module__}.STL") for _, cls in stack.values())


def site_name(node: fx.Node) -> str:
    path = module_path(node)
    label = node.meta.get("stl_site_label", node.name)
    return f"{path}.{label}" if path else label


def rewrite_matmul(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    detect_causal(gm, ctx)  # resolves row_grouping=None (a no-op after the detect_causal pass)
    stl_layers = sorted({module_path(n) for n in gm.graph.nodes if _inside_stl_module(n)})
    targets = ctx.config.targets_for(has_stl_layers=bool(stl_layers))
    for node in list(gm.graph.nodes):
        if (node.op != "call_function" or _inside_stl_module(node)
                or LINEAR_SITE in node.meta):  # a linear site: rewrite_linear reported it
            continue
        if node.target in UNSUPPORTED:
            _report_dense(ctx, node, f"unsupported op: the STL pass does not rewrite "
                                     f"{node.target.overloadpacket}")
            continue
        if node.target is aten.einsum.default:
            equation, operands = node.args[0], node.args[1]
            transposed = einsum_as_matmul(equation) if len(operands) == 2 else None
            if transposed is None:
                _report_dense(ctx, node, f"unsupported pattern: einsum {equation!r} is not a "
                                         f"batched matmul")
                continue
            a, b = operands
        elif node.target in _MATMULS:
            (a, b), transposed = node.args[:2], False
        else:
            continue
        _rewrite_one(gm, ctx, node, a, b, transposed, targets)
    if stl_layers:
        _warn_next_to_stl_layers(ctx, len(stl_layers))
    warn_unused_overrides(ctx)
    return gm


def _warn_next_to_stl_layers(ctx: PassContext, layers: int) -> None:
    """Say what happened to act×act sites in a model that already held STL layers."""
    matmuls = [s for s in ctx.report.sites if s.kind == "matmul"]
    converted = [s.name for s in matmuls if s.converted]
    held = [s.name for s in matmuls if s.reason.startswith(_HELD_DENSE)]
    if converted:
        warnings.warn(f"stl_compile: {len(converted)} activation x activation site(s) converted "
                      f"UNCALIBRATED in a model with {layers} STL layer(s) already "
                      f"(calibrated or trained): {', '.join(converted[:4])}"
                      f"{' ...' if len(converted) > 4 else ''}; their error adds to the "
                      f"model's (see module.stl_report)", stacklevel=5)
    elif held:
        warnings.warn(f"stl_compile: the model already holds {layers} STL layer(s), so its "
                      f"{len(held)} activation x activation site(s) stay dense (converting them "
                      f"would add uncalibrated error); STLConfig(targets={{'linear', "
                      f"'matmul'}}) converts them anyway", stacklevel=5)


_HELD_DENSE = "kept dense next to the model's STL layers"


def _report_dense(ctx: PassContext, node: fx.Node, reason: str) -> None:
    ctx.report.sites.append(SiteRow(name=site_name(node), kind="other",
                                    op=str(node.target.overloadpacket), x_shape=(), w_shape=(),
                                    converted=False, reason=reason))


def _rewrite_one(gm: fx.GraphModule, ctx: PassContext, node: fx.Node, a: fx.Node, b: fx.Node,
                 transposed: bool, targets: frozenset[str]) -> None:
    config = ctx.config
    name = site_name(node)
    a_shape, b_shape = shape_of(a), shape_of(b)
    if a_shape is not None and b_shape is not None and transposed:
        b_shape = (*b_shape[:-2], b_shape[-1], b_shape[-2])
    row = SiteRow(name=name, kind="matmul", op=str(node.target.overloadpacket),
                  x_shape=a_shape or (), w_shape=b_shape or (), converted=False)
    ctx.report.sites.append(row)
    if a_shape is None or b_shape is None or len(a_shape) < 2 or len(b_shape) < 2:
        row.reason = "unsupported pattern: an operand is 1-D or of unknown shape"
        return
    n, k, m = a_shape[-2], a_shape[-1], b_shape[-1]
    batch = math.prod(torch.broadcast_shapes(a_shape[:-2], b_shape[:-2]))
    itemsize = a.meta["val"].element_size()
    row.dense_flops = batch * dense_flops(n, k, m)
    row.dense_bytes = batch * dense_bytes(n, k, m, itemsize=itemsize)
    dtype = a.meta["val"].dtype  # the site's compute dtype: what basis="auto" resolves by
    row.reason = _skip_reason(gm, ctx, name, a, b, n, k, m, targets, dtype)
    if row.reason:
        return
    spec = config.site_spec(name, dtype=dtype)
    row.stl_flops = batch * stl_flops(n, k, m, spec.tile, spec.rank, encode_w=True)
    row.stl_bytes = batch * stl_bytes(n, k, m, spec.tile, spec.rank, encode_w=True,
                                      itemsize=itemsize)
    row.reason = config.cost_reason(row.dense_flops, row.stl_flops, row.dense_bytes,
                                    row.stl_bytes, f" (n={n}, k={k}, m={m})")
    if row.reason:
        return
    module = STLMatmul(spec.basis, dtype=dtype, device=a.meta["val"].device)
    set_submodule(gm, name, module)
    with gm.graph.inserting_before(node):
        if transposed:
            b = insert_call(gm.graph, aten.transpose.int, (b, -2, -1), node)
        new = gm.graph.call_module(name, (a, b))
    new.meta.update(node.meta)
    # the lowered nodes of this site must be attributed to it, not to its parent module
    stack = dict(node.meta.get("nn_module_stack") or {})
    stack[f"stl_site_{name}"] = (name, f"{STLMatmul.__module__}.{STLMatmul.__qualname__}")
    new.meta["nn_module_stack"] = stack
    row.converted, row.tile, row.rank, row.basis = True, spec.tile, spec.rank, spec.basis.name
    row.isolated = True  # "tokens" grouping: a tile's rows are positions of one sequence
    if ctx.report.causal_model is not None:
        row.causal = site_causality(spec.basis, config.row_grouping, kind="matmul")
    row.rel_error = _measure(ctx, module, node, transposed)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _skip_reason(gm: fx.GraphModule, ctx: PassContext, name: str, a: fx.Node, b: fx.Node,
                 n: int, k: int, m: int, targets: frozenset[str], dtype: torch.dtype) -> str:
    config = ctx.config
    if weight_operand(gm, a) is not None or weight_operand(gm, b) is not None:
        return "unsupported pattern: parameter operand not in the linear (x @ W) position"
    if "matmul" not in targets:
        if config.targets is None:
            return (f"{_HELD_DENSE} (uncalibrated otherwise); targets={{'linear', "
                    f"'matmul'}} converts it")
        return "filtered: 'matmul' not in config.targets"
    if config.row_grouping == "batch":
        return ("row_grouping='batch': activation x activation rows are positions of one "
                "sequence, so STL would mix them (causality); kept dense")
    if config.row_grouping == "causal":
        return MATMUL_DENSE_REASON
    spec = config.site_spec(name, dtype=dtype)
    if spec is None:
        return "skipped by an override"
    if config.filter_fn is not None and not config.filter_fn(None, name):
        return "filtered by filter_fn"
    if min(k, m) < config.min_dim:
        return f"too small: min(k, m)={min(k, m)} < min_dim={config.min_dim}"
    if not config.pad and (n % spec.tile or k % spec.tile or m % spec.tile):
        return f"not divisible by tile {spec.tile} and pad=False"
    return ""


@torch.no_grad()
def _measure(ctx: PassContext, module: STLMatmul, node: fx.Node, transposed: bool
             ) -> float | None:
    recorded = ctx.site_io.get(node.name)
    if recorded is None:
        return None
    (a, b), output = recorded[0][:2], recorded[1]
    if transposed:
        b = b.transpose(-2, -1)
    return relative_error([(module(a, b), output)])
