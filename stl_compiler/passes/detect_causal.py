"""Causal models: detect them, choose their row grouping, and check what a conversion keeps.

A model is *causal* when no position's output may depend on a later position (decoders,
language models). An STL tile of ``row_grouping="tokens"`` spans t consecutive positions, and
with an inexact basis each output row of a tile depends on the other rows, later ones
included: earlier logits would change when later tokens change. So:

- :func:`find_causality` says why a model is causal (or None): from the captured graph
  (``scaled_dot_product_attention(is_causal=True)``, a ``~ones(n, n).tril()`` mask as
  :func:`is_causal_mask` matches it) or from the module tree (a transformers config with
  ``is_decoder=True``, a ``*ForCausalLM`` / ``*LMHeadModel`` / generation model, attention
  submodules with ``is_causal=True`` or a boolean ``causal=True``).
- :func:`resolve_config` turns ``STLConfig.row_grouping=None`` (automatic) into "causal" for
  a causal model ("tokens" when every basis is exact: exact products keep causality up to
  round-off) and "tokens" for any other model.
- :func:`site_causality` / :func:`layer_causality` say per site whether causality is kept
  ("kept": by the structure of the basis; "round-off": an exact basis; "not kept").
- :func:`refuse_non_causal` raises the ValueError for an explicit "tokens" grouping on a
  causal model with an inexact basis (unless ``STLConfig.allow_non_causal``).

The passes :func:`detect_causal` (first in the pass list) and :func:`check_causal` (after the
rewrite passes) apply this to :func:`stl_compiler.stl_compile`;
:func:`stl_compiler.swap_linears_` uses the module-tree checks (it has no graph).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Iterable

import torch
from torch import fx, nn

from ..bases import STLBasis
from ..config import SKIP, STLConfig
from ..nn import STLLinear
from ..runtime.ops import causal_mask_ops
from ..tiling import TOKEN_GROUPINGS, is_causal
from ._graph import aten, module_path
from .context import PassContext
from .decompose_sdpa import attention_probs

__all__ = [
    "CAUSAL_KEPT", "CAUSAL_NOT_KEPT", "CAUSAL_ROUND_OFF", "MATMUL_DENSE_REASON",
    "causal_in_graph", "causal_in_modules", "check_causal", "detect_causal",
    "find_causality", "is_causal_mask", "is_exact", "layer_causality", "refuse_non_causal",
    "resolve_config", "site_causality",
]

#: per-site verdicts (``SiteRow.causal``)
CAUSAL_KEPT = "kept"  # by the structure of ex / d: no term reads a later row than it writes
CAUSAL_ROUND_OFF = "round-off"  # an exact basis: later rows cancel, up to rounding
CAUSAL_NOT_KEPT = "not kept"

#: why an activation × activation site stays dense under ``row_grouping="causal"``
MATMUL_DENSE_REASON = ("row_grouping='causal': an STL tile of QKᵀ / AV mixes query rows and key "
                       "columns, so a position would see later ones (causality); kept dense")

_MASKED_FILL = (aten.masked_fill.Scalar, aten.masked_fill.Tensor)
_CAUSAL_CLASS_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_ATTENTION_FLAGS = ("is_causal", "causal")


# ---------------------------------------------------------------------------------------------
# Detection


def is_causal_mask(mask: object, scores: fx.Node) -> bool:
    """:func:`stl_compiler.runtime.ops.causal_mask` for the scores' last two dims (the mask
    a ``masked_fill(scores, mask, -inf)`` reads to hide later keys): the chain of aten ops it
    traces to (``~ones(rows, cols, dtype=bool).tril()``), the diagonal 0, the sizes the
    scores'."""
    *chain, last = causal_mask_ops()
    node = mask
    for target in (last, *reversed(chain[1:])):  # bitwise_not, then tril: one operand each
        if not (isinstance(node, fx.Node) and node.target is target
                and (len(node.args) < 2 or node.args[1] == 0)):
            return False
        node = node.args[0]
    return (isinstance(node, fx.Node) and node.target is chain[0]
            and node.kwargs.get("dtype") is torch.bool
            and [str(d.meta["val"] if isinstance(d, fx.Node) else d) for d in node.args[0]]
            == [str(d) for d in scores.meta["val"].shape[-2:]])


def _sdpa_is_causal(node: fx.Node) -> bool:
    """An SDPA op (any ``aten.*scaled_dot_product*`` overload with an ``is_causal`` argument)
    called with ``is_causal=True``, or its decomposition :func:`attention_probs`."""
    if node.target is attention_probs:
        return len(node.args) > 4 and node.args[4] is True
    schema = getattr(node.target, "_schema", None)
    if schema is None or "scaled_dot_product" not in schema.name:
        return False
    names = [a.name for a in schema.arguments]
    if "is_causal" not in names:
        return False
    index = names.index("is_causal")
    value = node.args[index] if len(node.args) > index else node.kwargs.get("is_causal")
    return value is True


def causal_in_graph(gm: fx.GraphModule) -> str | None:
    """Why the captured graph is causal (causal SDPA, a causal ``tril`` mask), or None.

    transformers builds its masks from index comparisons that this does not read; its models
    are recognized by :func:`causal_in_modules`."""
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        where = module_path(node) or "the model"
        if _sdpa_is_causal(node):
            return f"scaled_dot_product_attention(is_causal=True) in {where}"
        if (node.target in _MASKED_FILL and len(node.args) > 1
                and is_causal_mask(node.args[1], node)):
            return f"a causal ~ones(n, n).tril() attention mask in {where}"
    return None


def causal_in_modules(model: nn.Module) -> str | None:
    """Why the module tree says the model is causal, or None: a transformers config with
    ``is_decoder=True``, a ``*ForCausalLM`` / ``*LMHeadModel`` class or a transformers
    generation model (``GenerationMixin``), or an attention submodule whose ``is_causal``
    (transformers) or ``causal`` flag is True."""
    name = type(model).__name__
    if name.endswith(_CAUSAL_CLASS_SUFFIXES):
        return f"{name} is a causal language model"
    if _is_generation_model(model):
        return f"{name} generates text (transformers GenerationMixin)"
    for path, module in model.named_modules():
        config = getattr(module, "config", None)
        if getattr(config, "is_decoder", False) is True:
            return f"{path or name}'s config has is_decoder=True"
        for flag in _ATTENTION_FLAGS:
            if getattr(module, flag, None) is True and _looks_like_attention(module, flag):
                return f"attention module {path or name} has {flag}=True"
    return None


def _is_generation_model(model: nn.Module) -> bool:
    transformers = sys.modules.get("transformers")  # not imported: not a transformers model
    mixin = getattr(transformers, "GenerationMixin", None) if transformers else None
    return mixin is not None and isinstance(model, mixin)


def _looks_like_attention(module: nn.Module, flag: str) -> bool:
    """``is_causal`` counts on any module (transformers sets it on attention layers); the
    generic ``causal`` only on a module whose class name says attention."""
    return flag == "is_causal" or "attention" in type(module).__name__.lower()


def find_causality(model: nn.Module | None = None, gm: fx.GraphModule | None = None
                   ) -> str | None:
    """Why the model is causal (graph evidence first, then the module tree), or None."""
    if gm is not None:
        found = causal_in_graph(gm)
        if found is not None:
            return found
    return causal_in_modules(model) if model is not None else None


# ---------------------------------------------------------------------------------------------
# Policy


def is_exact(basis: STLBasis) -> bool:
    """Whether ``basis`` computes the tile product exactly (Strassen, dps48, naive)."""
    return basis.exactness_error() <= 1e-6 * math.sqrt(basis.tile ** 3)


def _config_bases(config: STLConfig) -> list[STLBasis]:
    """Every basis the config names (its own and its overrides'), as "tokens" resolves them."""
    tokens = dataclasses.replace(config, row_grouping="tokens")
    overrides = [o for o in config.overrides.values() if o != SKIP]
    return [tokens._resolve(o) for o in [{}, *overrides]]


def resolve_config(config: STLConfig, causality: str | None) -> STLConfig:
    """``config`` with ``row_grouping=None`` (automatic) resolved for a model that is causal
    for the reason ``causality`` (None: not causal); an explicit grouping is kept.

    Causal: "causal", or "tokens" when every basis is exact (causality kept up to round-off,
    attention matmuls stay convertible). Not causal: "tokens"."""
    if config.row_grouping is not None:
        return config
    if causality is None or all(is_exact(b) for b in _config_bases(config)):
        return dataclasses.replace(config, row_grouping="tokens")
    try:
        return dataclasses.replace(config, row_grouping="causal")
    except ValueError as error:
        raise ValueError(
            f"this model is causal ({causality}), so row_grouping=None (automatic) chose "
            f"'causal', and: {error}. Alternatively pass row_grouping='tokens' with "
            f"allow_non_causal=True to accept that earlier positions see later ones") from error


def site_causality(basis: STLBasis, row_grouping: str, kind: str = "linear") -> str:
    """Whether a site converted with ``basis`` keeps a causal model causal.

    "batch": always (a tile's rows are the same position of t sequences; whether they stay
    independent is isolation, reported apart). Token tiles: a linear site keeps it by
    structure with a causal basis (:func:`stl_compiler.tiling.is_causal`); an activation ×
    activation site (QKᵀ, AV, whose columns are positions too) only with an exact basis that
    is also causal (naive). Other exact bases keep it up to round-off."""
    if row_grouping not in TOKEN_GROUPINGS:
        return CAUSAL_KEPT
    exact = is_exact(basis)
    structural = is_causal(basis) and (kind == "linear" or exact)
    if structural:
        return CAUSAL_KEPT
    return CAUSAL_ROUND_OFF if exact else CAUSAL_NOT_KEPT


def layer_causality(layer: STLLinear) -> str:
    """:func:`site_causality` of an ``STLLinear`` the model already holds (its ``ew`` is
    folded into the encoded weight, so exactness is read from the layer's own map): the part
    of each output tile row that comes from later input rows of its tile, relative to the
    whole map, computed in float64 from ``ex``, ``d`` and the encoded weight."""
    if layer.row_grouping not in TOKEN_GROUPINGS or is_causal(layer):
        return CAUSAL_KEPT
    leak = _future_leak(layer.ex.detach(), layer.d.detach(), layer.weight_encoded.detach(),
                        layer.tile)
    tolerance = max(1e-6, 16 * torch.finfo(layer.weight_encoded.dtype).eps)
    return CAUSAL_ROUND_OFF if leak <= tolerance else CAUSAL_NOT_KEPT


def _future_leak(ex: torch.Tensor, d: torch.Tensor, weight_encoded: torch.Tensor, tile: int,
                 chunk: int = 1 << 16) -> float:
    """‖part of the layer's map from input row a to output row b < a‖ / ‖whole map‖, where
    the map of tile pair (L, J) is ``M[b, j; a, l] = Σ_p d[p, bj] ex[p, al] Wh[p, L, J]``."""
    t, rank = tile, ex.shape[0]
    ex, d = ex.double().reshape(rank, t, t), d.double().reshape(rank, t, t)
    flat = weight_encoded.reshape(rank, -1)
    total = leak = 0.0
    for start in range(0, flat.shape[1], chunk):
        wh = flat[:, start:start + chunk].double()
        for a in range(t):
            for b in range(t):
                coeff = torch.einsum("pj,pl->jlp", d[:, b], ex[:, a]).reshape(t * t, rank)
                part = float((coeff @ wh).square().sum())
                total += part
                leak += part if a > b else 0.0
    return math.sqrt(leak / total) if total else 0.0


def non_causal_message(causality: str, config: STLConfig, sites: Iterable[str], tile: int,
                       what: str = "STL site(s)") -> str:
    """The error (or, under ``allow_non_causal``, the warning) for sites that let a causal
    model's positions see later ones: what is wrong, then what to do."""
    names = list(sites)
    shown = ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")
    problem = (f"row_grouping={config.row_grouping!r} on a causal model ({causality}): "
               f"{len(names)} {what} ({shown}) use an inexact basis that is not causal, so "
               f"each position's output {{}} depend on up to {tile - 1} later positions of its "
               f"{tile}-token tile (earlier logits change when later tokens change)")
    remedy = ("row_grouping=None (automatic: 'causal' for this model) or 'causal', or an exact "
              "basis ('strassen', 'dps48', 'naive')")
    if config.allow_non_causal:
        return (f"{problem.format('does')}; allowed by allow_non_causal=True. To keep it "
                f"causal use {remedy}")
    return (f"{problem.format('would')}. Use {remedy}, or pass allow_non_causal=True to accept "
            f"the leak (e.g. to time the fastest grouping)")


def refuse_non_causal(causality: str | None, config: STLConfig, offending: list[str],
                      tile: int, what: str = "STL site(s)") -> None:
    """Raise the ValueError of :func:`non_causal_message` when a causal model would convert
    ``offending`` sites without keeping causality and ``allow_non_causal`` is off."""
    if causality is not None and offending and not config.allow_non_causal:
        raise ValueError(non_causal_message(causality, config, offending, tile, what))


# ---------------------------------------------------------------------------------------------
# Passes


def detect_causal(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Find whether the model is causal (``ctx.report.causal_model``) and resolve
    ``row_grouping=None`` in ``ctx.config``; runs first, before SDPA is decomposed. Idempotent:
    the rewrite passes call it too when the pass list left it out."""
    if ctx.report.row_grouping is not None and ctx.config.row_grouping is not None:
        return gm
    ctx.report.causal_model = find_causality(ctx.model, gm)
    ctx.report.row_grouping_auto = ctx.config.row_grouping is None
    ctx.config = resolve_config(ctx.config, ctx.report.causal_model)
    ctx.report.row_grouping = ctx.config.row_grouping
    if ctx.report.causal_model is not None and ctx.model is not None:
        for row in ctx.report.sites:  # STLLinear layers the model already held
            if row.preconverted:
                row.causal = layer_causality(ctx.model.get_submodule(row.name))
    return gm


def check_causal(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """After the rewrite passes: refuse (ValueError) sites converted now that do not keep a
    causal model causal, unless ``allow_non_causal``. Runs before the (slow) lowering."""
    offending = [s for s in ctx.report.sites
                 if s.converted and not s.preconverted and s.causal == CAUSAL_NOT_KEPT]
    tile = next((s.tile for s in ctx.report.sites if s.tile), ctx.config.tile)
    refuse_non_causal(ctx.report.causal_model, ctx.config, [s.name for s in offending], tile)
    return gm
