"""``stl_compile``: capture → rewrite (STL sites) → lower → fuse → report → backend."""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch
from torch import nn

from . import passes
from .capture import (
    InputSpec,
    capture,
    check_dynamic_shapes,
    check_runs_on_example,
    describe_inputs,
    input_specs,
)
from .config import STLConfig
from .nn import STLLinear
from .passes import PassContext
from .passes._graph import relative_error
from .report import SiteRow, STLReport

__all__ = ["stl_compile", "BACKENDS"]

BACKENDS = ("inductor", "eager", "tensorrt")


def stl_compile(model: nn.Module, example_inputs: tuple | Any, config: STLConfig | None = None,
                *, example_kwargs: dict[str, Any] | None = None, dynamic_shapes: Any = "auto",
                backend: str = "inductor", mode: str | None = None,
                options: dict[str, Any] | None = None, dynamic: bool | None = None
                ) -> nn.Module:
    """Convert ``model``'s matmuls into STL and compile it.

    One compile serves every batch size >= 1 and every sequence length the model allows
    (including 1 and odd lengths): dims marked dynamic are traced as torch.export does (the
    general path, size 1 admitted at run time); see docs/compiler.md, "Dynamic shapes".

    Args:
        model: the model, on a real device with its weights loaded; captured with
            ``torch.export`` (non-strict) in its current train/eval mode (call
            ``model.eval()`` first for inference). transformers models need
            ``use_cache=False``.
        example_inputs: positional example inputs: a tuple (one entry per positional
            parameter of ``forward``), or one tensor. Use sizes >= 2 for dims that should
            stay dynamic (torch.export fixes dims of size 0/1 in the example).
        config: what to convert and how (:class:`STLConfig`; default rank 24, basis "auto":
            the shipped fitted basis, bf16-conditioned for bf16 / fp16 sites;
            ``row_grouping=None``: "causal" for a causal model, found in the captured graph or
            the module tree by :mod:`stl_compiler.passes.detect_causal`, "tokens" otherwise).
        example_kwargs: keyword example inputs (for keyword-only or keyword parameters).
        dynamic_shapes: ``"auto"`` (default): every input dim dynamic where the model allows
            it (batch and sequence length); ``None``: static shapes; or a ``torch.export``
            dynamic_shapes spec, e.g. ``({0: Dim("batch", min=1, max=8)},)``.
        backend: ``"inductor"`` (``torch.compile``), ``"eager"`` (the rewritten
            ``GraphModule``), or ``"tensorrt"`` (``torch_tensorrt.dynamo.compile``).
        mode: ``torch.compile`` mode for ``backend="inductor"``: None (default: Inductor's
            default mode, no CUDA graphs), ``"reduce-overhead"`` (CUDA graphs: lowest launch
            overhead, but outputs are overwritten by the next call unless cloned and every
            new shape records a graph), ``"max-autotune"``, ``"max-autotune-no-cudagraphs"``.
        options: Inductor options for ``backend="inductor"`` (``torch.compile(options=)``);
            not together with ``mode``.
        dynamic: ``torch.compile(dynamic=)`` for ``backend="inductor"``: None (default:
            recompile once with dynamic sizes when a size changes), True (dynamic from the
            first call) or False (one specialized graph per shape).

    Returns:
        A module computing the STL model, with ``.stl_report`` (:class:`STLReport`): every
        site converted or left dense with the reason, FLOPs, and each site's relative output
        error on the example inputs. Parameters (encoded weights, ``ex``, ``d``) are
        trainable and in its ``state_dict``. Calls are checked against the example inputs:
        a wrong dtype, a wrong fixed size (e.g. the feature dim) or a size outside the
        dynamic_shapes range raises a ValueError naming the input.

    Raises:
        TypeError / ValueError: a bad argument; the message names it and the fix. A causal
            model with an explicit ``row_grouping="tokens"`` and an inexact basis that would
            convert a site raises ValueError unless ``config.allow_non_causal``.
        CaptureError: torch.export cannot capture the model (the construct and a workaround).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _check_compile_options(backend, mode, options, dynamic)
    config = config or STLConfig()
    if not isinstance(config, STLConfig):
        raise TypeError(f"config must be an STLConfig, got {type(config).__name__}")
    check_dynamic_shapes(dynamic_shapes)
    args, kwargs = _example_inputs(model, example_inputs, example_kwargs)
    ctx = PassContext(config, args, kwargs, dynamic_shapes, STLReport(), model=model)

    start = time.perf_counter()
    gm = capture(model, args, kwargs, dynamic_shapes)
    ctx.report.pass_seconds["capture"] = time.perf_counter() - start
    specs = input_specs(gm)
    if model.training:
        _warn_training_ops(model, gm)
    if config.measure_error:
        with torch.no_grad():
            reference = gm(*args, **kwargs)
        _warn_non_finite(reference)
    ctx.report.sites.extend(_preconverted_sites(model))
    gm = passes.rewrite(gm, ctx)
    gm = passes.lower(gm, ctx)
    gm = passes.fuse(gm, ctx)
    gm = passes.report(gm, ctx)
    if config.measure_error:
        with torch.no_grad():
            ctx.report.model_rel_error = _output_error(gm(*args, **kwargs), reference)
    if not ctx.report.converted:
        warnings.warn("stl_compile converted NOTHING: the model runs fully dense. See "
                      "module.stl_report for each site's reason.", stacklevel=2)

    compiled = _apply_backend(gm, backend, args, kwargs,
                              {"mode": mode, "options": options, "dynamic": dynamic})
    compiled.register_forward_pre_hook(_InputCheck(gm, specs), with_kwargs=True, prepend=True)
    compiled.stl_report = ctx.report
    return compiled


def _example_inputs(model: nn.Module, example_inputs: Any, example_kwargs: Any
                    ) -> tuple[tuple, dict[str, Any]]:
    """The example as ``(args, kwargs)``, checked: every mistake here would otherwise surface
    as an obscure torch.export error or as NaN in the report."""
    if getattr(model, "stl_report", None) is not None:
        raise ValueError(f"{type(model).__name__} is already the output of stl_compile (it "
                         "has .stl_report): its matmuls are STL already. Compile the original "
                         "model (to change the backend or config), or use this one as it is")
    meta = next((name for name, t in (*model.named_parameters(), *model.named_buffers())
                 if t.is_meta), None)
    if meta is not None:
        raise ValueError(f"{type(model).__name__} has tensors on the meta device (e.g. "
                         f"{meta!r}): they hold no values to convert. Load the weights first "
                         "(e.g. model.to_empty(device='cpu') then load_state_dict, or "
                         "from_pretrained without device_map='meta')")
    if isinstance(example_inputs, list):
        raise TypeError(f"example_inputs must be a tuple (one entry per positional input of "
                        f"forward) or one tensor, got a list of {len(example_inputs)}: pass "
                        "tuple(example_inputs), or (example_inputs,) if forward takes the "
                        "list as one input")
    if example_kwargs is not None and not isinstance(example_kwargs, dict):
        raise TypeError(f"example_kwargs must be a dict of keyword inputs, got "
                        f"{type(example_kwargs).__name__}")
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    kwargs = dict(example_kwargs or {})
    named = {f"input {i}": v for i, v in enumerate(args)} | kwargs
    nan = [name for name, value in named.items()
           if any(isinstance(t, torch.Tensor) and t.is_floating_point() and t.isnan().any()
                  for t in torch.utils._pytree.tree_leaves(value))]
    if nan:
        raise ValueError(f"example input(s) {nan} contain NaN: the report's errors would all "
                         "be NaN. Give finite example inputs (real data or torch.randn)")
    check_runs_on_example(model, args, kwargs, fix="pass one example per positional input "
                          "of forward in example_inputs and keyword (or keyword-only) inputs "
                          "in example_kwargs")
    return args, kwargs


def _warn_training_ops(model: nn.Module, gm: torch.fx.GraphModule) -> None:
    """A model captured in train() mode keeps its dropout (random masks) and batch-norm
    batch statistics in the graph: the compiled model is not the inference model, and the
    report's errors compare two random draws."""
    found = sorted({str(node.target).split(".")[1] for node in gm.graph.nodes
                    if node.op == "call_function" and _is_training_op(node)})
    if found:
        warnings.warn(f"{type(model).__name__} is in train() mode and its graph has "
                      f"training-only ops {found}: they are compiled in, and the report's "
                      "errors include their noise. Call model.eval() before stl_compile for "
                      "inference", stacklevel=3)


def _is_training_op(node: torch.fx.Node) -> bool:
    name = str(node.target)
    if "dropout" in name:
        return not (len(node.args) > 1 and node.args[1] == 0)  # p == 0 changes nothing
    if "bernoulli" in name:
        return True
    return "batch_norm" in name and len(node.args) > 5 and node.args[5] is True


def _warn_non_finite(reference: Any) -> None:
    if any(isinstance(t, torch.Tensor) and t.is_floating_point() and not t.isfinite().all()
           for t in torch.utils._pytree.tree_leaves(reference)):
        warnings.warn("the model's output on the example inputs is not finite (inf/NaN): the "
                      "report's errors are meaningless. Check the example inputs (e.g. "
                      "scale, masks) and the weights", stacklevel=3)


class _InputCheck:
    """Forward pre-hook of a compiled model: each call's inputs against the captured ones.

    A few Python comparisons per input; without them a wrong dtype or feature size fails
    deep inside the graph ("Guard failed: input.size()[2] == 64", a dtype error in a custom
    op). Dynamic dims are left to the graph's own guards but for their range."""

    def __init__(self, gm: torch.fx.GraphModule, specs: list[InputSpec | None]) -> None:
        self.in_spec = getattr(gm, "_in_spec", None)
        self.specs = specs
        kwargs_spec = None
        if self.in_spec is not None and self.in_spec.num_children == 2:
            kwargs_spec = (self.in_spec.child(1) if hasattr(self.in_spec, "child")
                           else self.in_spec.children_specs[1])
        #: keyword inputs in the order the graph takes them
        self.keywords = list(kwargs_spec.context) if kwargs_spec is not None else []

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self.in_spec is None or torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return
        ordered = {k: kwargs[k] for k in self.keywords if k in kwargs} | kwargs
        leaves, spec = torch.utils._pytree.tree_flatten((args, ordered))
        if spec != self.in_spec or len(leaves) != len(self.specs):
            expected = ", ".join(s.describe() if s else "(non-tensor)" for s in self.specs)
            named = {f"input {i}": v for i, v in enumerate(args)} | kwargs
            raise ValueError(f"the compiled model takes ({expected}) as it was compiled "
                             f"(positional / keyword as in the example), got "
                             f"({describe_inputs(named)})")
        for spec_, value in zip(self.specs, leaves):
            problem = spec_.mismatch(value) if spec_ is not None else None
            if problem is not None:
                raise ValueError(f"input {spec_.name!r}: {problem}")


def _check_compile_options(backend: str, mode: str | None, options: dict[str, Any] | None,
                           dynamic: bool | None) -> None:
    """``mode`` / ``options`` / ``dynamic`` are torch.compile's; validated here, before the
    (slow) capture, with the valid values in the message."""
    given = [name for name, value in (("mode", mode), ("options", options),
                                      ("dynamic", dynamic)) if value is not None]
    if given and backend != "inductor":
        raise ValueError(f"{', '.join(given)} apply to backend='inductor' (torch.compile) "
                         f"only, got backend={backend!r}")
    if mode is not None and options is not None:
        raise ValueError("pass mode or options, not both (torch.compile takes one): a mode "
                         "is a preset of options; add its options to options= instead")
    if mode is not None:
        from torch._inductor import list_mode_options

        modes = sorted(list_mode_options())
        if mode not in modes:
            raise ValueError(f"mode must be None or one of {modes}, got {mode!r}")
    if options is not None:
        if not isinstance(options, dict):
            raise TypeError(f"options must be a dict of Inductor options, got "
                            f"{type(options).__name__}")
        from torch._inductor import list_options

        unknown = sorted(set(options) - set(list_options()))
        if unknown:
            raise ValueError(f"unknown Inductor options {unknown}; the valid names are in "
                             "torch._inductor.list_options()")
    if dynamic is not None and not isinstance(dynamic, bool):
        raise TypeError(f"dynamic must be None, True or False, got {dynamic!r}")


def _preconverted_sites(model: nn.Module) -> list[SiteRow]:
    """STLLinear layers already in the model (swap_linears_, calibrated, trained with STL):
    captured as STL ops as they are, listed so the report covers them too. Their tile, rank,
    weight shape and row isolation come from the layer; ``rewrite_linear`` adds their FLOPs
    and bytes (dense and STL) from the example shapes in the captured graph."""
    return [SiteRow(name=name, kind="linear", op="STLLinear (already converted)",
                    x_shape=(), w_shape=(m.in_features, m.out_features), converted=True,
                    tile=m.tile, rank=m.rank, basis="from the model", isolated=m.rows_isolated,
                    preconverted=True)
            for name, m in model.named_modules() if isinstance(m, STLLinear)]


def _apply_backend(gm: nn.Module, backend: str, args: tuple, kwargs: dict,
                   compile_options: dict[str, Any]) -> nn.Module:
    if backend == "eager":
        return gm
    if backend == "inductor":
        return torch.compile(gm, backend="inductor", **compile_options)
    from .exporters.tensorrt import compile_with_torch_tensorrt

    return compile_with_torch_tensorrt(gm, args, kwargs)


def _output_error(output: Any, reference: Any) -> float | None:
    """Relative error over all floating-point tensors of a (nested) model output."""
    flat_out = torch.utils._pytree.tree_leaves(output)
    flat_ref = torch.utils._pytree.tree_leaves(reference)
    pairs = [(o, r) for o, r in zip(flat_out, flat_ref)
             if isinstance(r, torch.Tensor) and r.is_floating_point()]
    return relative_error(pairs)

