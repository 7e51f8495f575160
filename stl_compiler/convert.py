"""Eager, in-place conversion: swap ``nn.Linear`` submodules for :class:`STLLinear`.

This is the module-level counterpart of :func:`stl_compiler.stl_compile` (which works on the
captured graph and also converts functional linears and activation matmuls). It suits
training with STL and per-layer calibration, where plain modules are easiest to handle.
"""

from __future__ import annotations

import warnings

from torch import nn

from .config import STLConfig
from .functional import dense_bytes, dense_flops, stl_bytes, stl_flops
from .nn import STLLinear
from .passes.detect_causal import (
    CAUSAL_NOT_KEPT,
    causal_in_modules,
    non_causal_message,
    refuse_non_causal,
    resolve_config,
    site_causality,
)

__all__ = ["swap_linears_", "COST_ROWS"]

#: Input rows at which swap_linears_ evaluates a layer's cost (no example input here; the
#: FLOP ratio of a linear layer does not depend on the rows beyond padding).
COST_ROWS = 4096


def swap_linears_(model: nn.Module, config: STLConfig | None = None, *,
                  train_basis: bool = True, keep_reference: bool = False) -> dict[str, str]:
    """Replace every ``nn.Linear`` of ``model`` that the config selects, in place.

    Each layer is encoded from its trained weight with the basis of its site (so an exact
    basis keeps the model's outputs); ``config.filter_fn(module, fqn)``, ``overrides``,
    ``min_dim`` (on in/out features) and the cost guard (``max_cost_ratio``,
    ``max_bytes_ratio``, evaluated for :data:`COST_ROWS` input rows) apply as in
    :func:`stl_compile`. ``keep_reference`` keeps each dense weight attached for
    :func:`stl_compiler.calibrate`. Layers that already are :class:`STLLinear` are kept as
    they are (never re-encoded: they may be calibrated or trained), reported as such and
    named in a warning when the config would convert them differently.

    Causal models are recognized from the module tree
    (:func:`stl_compiler.passes.detect_causal.causal_in_modules`: a transformers decoder,
    ``*ForCausalLM`` or generation model, attention modules with ``is_causal=True``):
    ``row_grouping=None`` resolves as in :func:`stl_compile` ("causal" for them, "tokens"
    otherwise or with exact bases). An explicit "tokens" grouping that would convert a layer of
    a causal model with an inexact, non-causal basis raises ValueError before anything is
    swapped, unless ``config.allow_non_causal``; then a warning says causality is not kept.
    With "causal" layers, :func:`stl_compiler.generation.enable_incremental` is applied, so
    transformers' ``model.generate`` (KV cache) computes what one full forward computes
    (docs/causal_lm.md).

    Returns:
        ``{fqn: "converted" | "skipped: <reason>" | "kept: <reason>"}`` for every
        ``nn.Linear`` and ``STLLinear`` found.
    """
    config = config or STLConfig()
    causality = causal_in_modules(model)
    config = resolve_config(config, causality)
    leaking = _non_causal_layers(model, config, causality)
    refuse_non_causal(causality, config, leaking, config.tile, "linear layer(s)")
    outcome: dict[str, str] = {}
    for fqn, module in list(model.named_modules()):
        if isinstance(module, STLLinear):
            outcome[fqn] = (f"kept: already an STLLinear (tile {module.tile}, rank "
                            f"{module.rank}); converted layers are never re-converted")
        elif isinstance(module, nn.Linear):
            outcome[fqn] = _swap_one(model, fqn, module, config, train_basis, keep_reference)
    if leaking:  # allowed by allow_non_causal: say so
        message = non_causal_message(causality, config, leaking, config.tile, "linear layer(s)")
        warnings.warn(f"swap_linears_: causality NOT kept (allow_non_causal=True): {message}",
                      stacklevel=2)
    _warn_already_converted(model, config, outcome)
    unused = config.unused_overrides(outcome)
    if unused:
        warnings.warn(f"swap_linears_: override pattern(s) {unused} match no linear layer of "
                      f"the model; check the names (module paths, fnmatch syntax)", stacklevel=2)
    from .generation import enable_incremental  # causal STL layers: generate with a KV cache

    enable_incremental(model)
    return outcome


def _non_causal_layers(model: nn.Module, config: STLConfig, causality: str | None
                       ) -> list[str]:
    """The ``nn.Linear`` layers of a causal model that would convert without keeping it causal
    (checked before any swap, so that a refusal leaves the model untouched)."""
    if causality is None:
        return []
    return [fqn for fqn, module in model.named_modules()
            if isinstance(module, nn.Linear) and not isinstance(module, STLLinear)
            and not _skip_reason(model, fqn, module, config)
            and site_causality(config.site_spec(fqn, dtype=module.weight.dtype).basis,
                               config.row_grouping) == CAUSAL_NOT_KEPT]


def _swap_one(model: nn.Module, fqn: str, module: nn.Linear, config: STLConfig,
              train_basis: bool, keep_reference: bool) -> str:
    reason = _skip_reason(model, fqn, module, config)
    if reason:
        return f"skipped: {reason}"
    basis = config.site_spec(fqn, dtype=module.weight.dtype).basis  # "auto": by the dtype
    layer = STLLinear.from_linear(module, basis, row_grouping=config.row_grouping,
                                  train_basis=train_basis, keep_reference=keep_reference)
    parent_name, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent_name), child, layer)
    return "converted"


def _skip_reason(model: nn.Module, fqn: str, module: nn.Linear, config: STLConfig) -> str:
    """Why ``module`` stays dense ("" when it converts), without the "skipped: " prefix."""
    spec = config.site_spec(fqn, dtype=module.weight.dtype)
    k, m = module.in_features, module.out_features
    if module is model:
        return ("the model itself is an nn.Linear and cannot be swapped in place; use "
                "STLLinear.from_linear")
    if "linear" not in config.targets_for():
        return "'linear' not in config.targets"
    if spec is None:
        return "override says skip"
    if config.filter_fn is not None and not config.filter_fn(module, fqn):
        return "filtered by filter_fn"
    if min(k, m) < config.min_dim:
        return f"too small (a dim < min_dim={config.min_dim})"
    if not config.pad and (k % spec.tile or m % spec.tile):
        return f"dims not multiples of tile {spec.tile} and pad=False"
    itemsize = module.weight.element_size()
    cost = config.cost_reason(
        dense_flops(COST_ROWS, k, m), stl_flops(COST_ROWS, k, m, spec.tile, spec.rank),
        dense_bytes(COST_ROWS, k, m, itemsize=itemsize),
        stl_bytes(COST_ROWS, k, m, spec.tile, spec.rank, itemsize=itemsize))
    return cost


def _warn_already_converted(model: nn.Module, config: STLConfig, outcome: dict[str, str]
                            ) -> None:
    """Name the STLLinear layers whose tile/rank/grouping differ from what config asks."""
    differing = []
    for fqn, result in outcome.items():
        if not result.startswith("kept"):
            continue
        layer = model.get_submodule(fqn)
        spec = config.site_spec(fqn, dtype=layer.weight_encoded.dtype)
        if spec is not None and ((layer.tile, layer.rank, layer.row_grouping)
                                 != (spec.tile, spec.rank, config.row_grouping)):
            differing.append(f"{fqn or '<model>'} (tile {layer.tile}, rank {layer.rank}, "
                             f"{layer.row_grouping!r}; config asks tile {spec.tile}, rank "
                             f"{spec.rank}, {config.row_grouping!r})")
    if differing:
        shown = "; ".join(differing[:5]) + (" ..." if len(differing) > 5 else "")
        warnings.warn(f"swap_linears_: {len(differing)} layer(s) are already STL and are kept as "
                      f"they are: {shown}. To change them, convert the dense model again",
                      stacklevel=3)
