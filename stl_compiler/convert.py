"""Eager, in-place conversion: swap ``nn.Linear`` submodules for :class:`STLLinear`.

This is the module-level counterpart of :func:`stl_compiler.stl_compile` (which works on the
captured graph and also converts functional linears and activation matmuls). It suits
training with STL and per-layer calibration, where plain modules are easiest to handle.
"""

from __future__ import annotations

from torch import nn

from .config import STLConfig
from .nn import STLLinear

__all__ = ["swap_linears_"]


def swap_linears_(model: nn.Module, config: STLConfig | None = None, *,
                  train_basis: bool = True, keep_reference: bool = False) -> dict[str, str]:
    """Replace every ``nn.Linear`` of ``model`` that the config selects, in place.

    Each layer is encoded from its trained weight with the basis of its site (so an exact
    basis keeps the model's outputs); ``config.filter_fn(fqn, module)``, ``overrides`` and
    ``min_dim`` (on in/out features) apply as in :func:`stl_compile`. ``keep_reference``
    keeps each dense weight attached for :func:`stl_compiler.calibrate`.

    Returns:
        ``{fqn: "converted" | reason it was kept dense}`` for every ``nn.Linear`` found.
    """
    config = config or STLConfig()
    outcome: dict[str, str] = {}
    for fqn, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or isinstance(module, STLLinear):
            continue
        spec = config.site_spec(fqn)
        if module is model:
            outcome[fqn] = ("skipped: the model itself is an nn.Linear and cannot be swapped in "
                            "place; use STLLinear.from_linear")
        elif "linear" not in config.targets:
            outcome[fqn] = "skipped: 'linear' not in config.targets"
        elif spec is None:
            outcome[fqn] = "skipped: override says skip"
        elif config.filter_fn is not None and not config.filter_fn(fqn, module):
            outcome[fqn] = "skipped: filtered by filter_fn"
        elif min(module.in_features, module.out_features) < config.min_dim:
            outcome[fqn] = f"skipped: too small (a dim < min_dim={config.min_dim})"
        elif not config.pad and (module.in_features % spec.tile or module.out_features % spec.tile):
            outcome[fqn] = f"skipped: dims not multiples of tile {spec.tile} and pad=False"
        else:
            layer = STLLinear.from_linear(module, spec.basis, row_grouping=config.row_grouping,
                                          train_basis=train_basis,
                                          keep_reference=keep_reference)
            parent_name, _, child = fqn.rpartition(".")
            setattr(model.get_submodule(parent_name), child, layer)
            outcome[fqn] = "converted"
    return outcome
