"""Put the element-wise and row-wise ops after a decode in the decode's own shape, and name
spelled-out GELUs, so that the fusion passes see the chains they fuse.

Models that flatten tokens around their matmuls (transformers' ``Conv1D``: GPT-2 and kin)
decode ``(N, C)``, reshape to ``(B, S, C)``, apply activations, residual adds and norms there,
and reshape back to ``(N, C)`` for the next matmul. Element-wise ops, and norms and softmax
over the last dim, give the same values in either shape, so this pass computes them in the
decode's shape: the decode's reshape is dropped, another tensor operand of the same shape is
reshaped to the decode's shape, a value read outside the chain is reshaped back for those
readers, and the reshapes back to the decode's shape become no-ops. It also rewrites
``0.5 * x * (1 + tanh(√(2/π) * (x + 0.044715 * x³)))`` (transformers' ``NewGELUActivation``)
into ``gelu(x, approximate="tanh")``. Runs with ``config.fuse``, before the fusion passes.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from ..runtime import ops as _ops  # noqa: F401  (the stl:: ops named below)
from ._graph import aten, erase_dead, fake_propagate, insert_call
from .context import PassContext

stl = torch.ops.stl

_DECODES = (stl.decode.default, stl.decode_epilogue.default)
#: ops that act on each element, or on each row along the last dim, given the other args.
_POINTWISE = {
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.pow.Tensor_Scalar,
    aten.tanh.default, aten.relu.default, aten.gelu.default, aten.silu.default,
    aten.sigmoid.default, aten.neg.default, aten.rsqrt.default, aten.dropout.default,
    aten.to.dtype, aten.alias.default, aten.clone.default,
}
_LAST_DIM = {aten.layer_norm.default, aten.rms_norm.default, aten.softmax.int,
             aten.mean.dim}


def canonicalize_pointwise(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    if not ctx.config.fuse:
        return gm
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is aten.mul.Tensor:
            _name_tanh_gelu(gm.graph, node)
    for decode in [n for n in gm.graph.nodes if n.target in _DECODES]:
        _sink_reshape(gm.graph, decode)
    return gm


def _const(value: object, expected: float) -> bool:
    return isinstance(value, (int, float)) and math.isclose(value, expected, rel_tol=1e-6)


def _split(node: object, target, constant: float) -> fx.Node | None:
    """The tensor operand of ``target(tensor, constant)`` (either order), else None."""
    if not (isinstance(node, fx.Node) and node.target is target):
        return None
    a, b = node.args[:2]
    if isinstance(a, fx.Node) and _const(b, constant):
        return a
    if isinstance(b, fx.Node) and _const(a, constant) and target is not aten.pow.Tensor_Scalar:
        return b
    return None


def _name_tanh_gelu(graph: fx.Graph, out: fx.Node) -> None:
    """``mul(mul(x, 0.5), add(tanh(mul(add(x, mul(pow(x, 3), 0.044715)), √(2/π))), 1))``."""
    for half, one_plus in (out.args[:2], out.args[1::-1]):
        x = _split(half, aten.mul.Tensor, 0.5)
        inner = _split(one_plus, aten.add.Tensor, 1.0)
        if x is None or not (isinstance(inner, fx.Node) and inner.target is aten.tanh.default):
            continue
        poly = _split(inner.args[0], aten.mul.Tensor, math.sqrt(2 / math.pi))
        if not (isinstance(poly, fx.Node) and poly.target is aten.add.Tensor):
            continue
        for lin, cubic in (poly.args[:2], poly.args[1::-1]):
            if lin is x and _split(_split(cubic, aten.mul.Tensor, 0.044715),
                                   aten.pow.Tensor_Scalar, 3.0) is x:
                with graph.inserting_before(out):
                    gelu = insert_call(graph, aten.gelu.default, (x,), out,
                                       {"approximate": "tanh"})
                out.replace_all_uses_with(gelu)
                erase_dead(graph, [out, one_plus, inner, inner.args[0], poly, cubic,
                                   cubic.args[0] if cubic.args[0] is not x else cubic.args[1],
                                   half])
                return


def _leading_reshape(node: fx.Node) -> bool:
    """A reshape/view that keeps the last dim (only leading dims merge or split)."""
    if node.target not in (aten.reshape.default, aten.view.default, aten._unsafe_view.default):
        return False
    old, new = node.args[0].meta["val"].shape, node.meta["val"].shape
    return str(old[-1]) == str(new[-1]) and isinstance(new[-1], int)


def _pointwise(node: fx.Node) -> bool:
    if node.target in _POINTWISE:
        return True
    if node.target in _LAST_DIM:  # over the last dim only
        if node.target is aten.mean.dim:
            return list(node.args[1]) == [-1] and len(node.args) > 2 and node.args[2] is True
        if node.target is aten.softmax.int:
            return node.args[1] == -1
        return len(node.args[1]) == 1
    return False


def _sink_reshape(graph: fx.Graph, decode: fx.Node) -> None:
    """Rewrite ``reshape(decode) → pointwise/row-wise ops → reshape back`` in the decode's
    2-D shape ``(N, C)``; see the module docstring. Values of the reshaped shape, or of it with
    a last dim of 1 (keepdim reductions over the last dim), are computed in ``(N, C)`` or
    ``(N, 1)``; anything that would change meaning (an operand broadcasting over leading dims,
    a keepdim value read outside the chain) leaves the graph as it is."""
    if len(decode.users) != 1 or decode.meta["val"].dim() != 2:
        return
    (first,) = decode.users
    if not _leading_reshape(first):
        return
    wide = [str(d) for d in first.meta["val"].shape]
    reduced = wide[:-1] + ["1"]
    cols = decode.meta["val"].shape[-1]
    target = [str(d) for d in decode.meta["val"].shape]

    def kind(node: object) -> str | None:
        val = node.meta.get("val") if isinstance(node, fx.Node) else None
        if not isinstance(val, torch.Tensor):
            return None
        shape = [str(d) for d in val.shape]
        return "wide" if shape == wide else "reduced" if shape == reduced else (
            "small" if val.dim() <= 1 else "other")

    region, frontier, backs = [], [first], []
    while frontier:  # the ops computed on values of the reshaped shape, from the reshape on
        node = frontier.pop()
        for user in node.users:
            if user in region or user in backs:
                continue
            if _leading_reshape(user) and [str(d) for d in user.meta["val"].shape] == target:
                backs.append(user)
            elif _pointwise(user) and kind(user) in ("wide", "reduced"):
                region.append(user)
                frontier.append(user)
    inside = {first, *region}
    if not backs or any(
            kind(a) == "other" for n in region for a in n.args if isinstance(a, fx.Node)) or any(
            kind(n) == "reduced" and any(u not in inside for u in n.users) for n in region):
        return
    order = {n: i for i, n in enumerate(graph.nodes)}
    region.sort(key=order.__getitem__)
    shaped: dict[fx.Node, fx.Node] = {first: decode}  # node -> its value in the decode's shape
    for node in region:
        def narrow(arg, node=node):
            if not isinstance(arg, fx.Node) or kind(arg) not in ("wide", "reduced"):
                return arg  # scalars and 1-D weights keep their meaning
            if arg not in shaped:  # a tensor from outside the chain, of the reshaped shape
                with graph.inserting_before(node):
                    shaped[arg] = insert_call(graph, aten.reshape.default, (
                        arg, [-1, cols if kind(arg) == "wide" else 1]), node)
            return shaped[arg]
        node.args = tuple(narrow(a) for a in node.args)
        fake_propagate(node)
        shaped[node] = node
    for node in region:  # readers outside the chain get the original shape back
        outside = [u for u in node.users if u not in inside and u not in backs
                   and u not in shaped.values()]
        if outside:
            with graph.inserting_after(node):
                back = insert_call(graph, aten.reshape.default, (node, first.args[1]), node)
            for user in outside:
                user.replace_input_with(node, back)
    for back in backs:
        back.replace_all_uses_with(shaped[back.args[0]])
        graph.erase_node(back)
    if not first.users:
        graph.erase_node(first)
