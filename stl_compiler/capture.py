"""Capture a model as an FX graph with ``torch.export`` (non-strict), with clear errors.

Dynamic sizes: one capture must serve batch 1 and one-token sequences, and the padded tile
counts of STL ops (1 for a sequence of <= 4 tokens at t=4) must not be specialized. Capture
therefore reasons size-obliviously (a dynamic size may be 1 without a guard on it), and then
drops the guards ``size != 1`` that torch's own ops still emit (stride computations of
``expand`` / ``transpose`` on a possibly-1 dim, or a model's ``if batch != 1`` fast path):
torch.export's default makes exactly that assumption (dynamic dims are traced as >= 2 and
admitted at 0/1 at run time), so the graph is the one torch.export itself would serve batch
1 with. ``Dim(min=1)`` is raised to ``min=2`` for the same reason (the range check admits 1).

The example-input checks every front end runs before capturing (:func:`check_runs_on_example`,
:func:`describe_inputs`) live here too. A leaf module (torch only): ``api``, the exporters and
``passes.lower_sites`` (the re-capture) import it.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx.experimental._config as fx_config
from torch import fx, nn
from torch.utils import _pytree as pytree


class CaptureError(RuntimeError):
    """The model could not be captured as a graph; the message says why and what to do."""


_HINTS = (
    ("data-dependent", "the model branches on tensor values (data-dependent control flow); "
     "rewrite the branch with torch.cond or move it out of forward"),
    ("GuardOnDataDependentSymNode", "the model branches on tensor values; rewrite with "
     "torch.cond or compute the condition outside the model"),
    ("Constraints violated", "a dimension marked dynamic is specialized by the model; pass "
     "dynamic_shapes that keep it static, or example inputs with sizes >= 2"),
    ("DynamicCache", "the model returns a KV cache; for transformers models pass "
     "use_cache=False (in example_kwargs or the model config)"),
    ("past_key_values", "the model returns a KV cache; for transformers models pass "
     "use_cache=False"),
)

_DYNAMIC_SHAPES_HELP = ('"auto" (every input dim dynamic where the model allows it), None '
                        "(static shapes), or a torch.export dynamic_shapes spec (a dict by "
                        "input name or a tuple/list by position, of {dim: torch.export.Dim})")


def check_dynamic_shapes(dynamic_shapes: Any) -> None:
    """A ValueError naming the valid values unless ``dynamic_shapes`` is one of them."""
    if (dynamic_shapes is None or isinstance(dynamic_shapes, dict | tuple | list)
            or (isinstance(dynamic_shapes, str) and dynamic_shapes == "auto")):
        return
    raise ValueError(f"dynamic_shapes must be {_DYNAMIC_SHAPES_HELP}; got {dynamic_shapes!r}")


def auto_dynamic_shapes(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict:
    """Mark every dim of every tensor input ``Dim.AUTO``: dynamic where the model allows."""
    auto = torch.export.Dim.AUTO
    spec = lambda v: ({i: auto for i in range(v.dim())} if isinstance(v, torch.Tensor)
                      else None)
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    return {name: pytree.tree_map(spec, value) for name, value in bound.arguments.items()}


def _size_oblivious():
    """Reason about dynamic sizes without assuming they are not 1 (see the module docstring);
    torch < 2.12 has no such mode and specializes tile counts of 1 instead."""
    if hasattr(fx_config, "backed_size_oblivious"):
        return fx_config.patch(backed_size_oblivious=True)
    return contextlib.nullcontext()


_PRODUCT = r"L(\[[^\]]+\])+\.size\(\)\[\d+\](\*L(\[[^\]]+\])+\.size\(\)\[\d+\])*"
#: ``L['x'].size()[0] != 1``, ``(32*L['x'].size()[1]) != 32``, ``... > 1`` (spaces removed)
_NOT_ONE = re.compile(rf"^\(?((?P<c>\d+)\*)?{_PRODUCT}\)?(!=|>)(?P<rhs>\d+)$")
_ONE_LESS = re.compile(rf"^1<\(?{_PRODUCT}\)?$")


def _only_excludes_size_one(guard: str) -> bool:
    """``guard`` says a size (or a product of sizes, times c) is not 1 (or is > 1)."""
    compact = guard.replace(" ", "")
    match = _NOT_ONE.match(compact)
    if match:
        return int(match["rhs"]) == int(match["c"] or 1)
    return _ONE_LESS.match(compact) is not None


def _drop_size_one_guards(program: torch.export.ExportedProgram) -> None:
    """Drop the guards ``size != 1`` from ``program`` (why: the module docstring)."""
    guards = getattr(program, "_guards_code", None)
    if guards is not None:
        program._guards_code = [g for g in guards if not _only_excludes_size_one(g)]


def _dims_from_two(dynamic_shapes: Any) -> Any:
    """``Dim(min=0/1)`` → ``Dim(min=2)``, as torch.export does without size-oblivious
    reasoning: a model guard ``batch != 1`` would otherwise be a constraint violation,
    although the exported module admits 1. Roots of derived dims (``4 * Dim(...)``) are kept:
    their products are never 1."""
    dim_type = torch.export.Dim
    roots = set()
    pytree.tree_map(lambda d: roots.add(id(d.root)) if hasattr(d, "root") else None,
                    dynamic_shapes)
    raised: dict[str, Any] = {}

    def fix(dim: Any) -> Any:
        if type(dim) is not dim_type or dim.min > 1 or id(dim) in roots:
            return dim
        if dim.__name__ not in raised:
            raised[dim.__name__] = dim_type(dim.__name__, min=2, max=dim.max)
        return raised[dim.__name__]

    return pytree.tree_map(fix, dynamic_shapes)


#: torch's tracing machinery: warnings attributed to these modules are about torch, not the
#: model (``torch.nn`` is not among them: a model's ``warn(..., stacklevel=2)`` lands there)
_TRACING_MODULES = (r"torch\.(export|_export|fx|_dynamo|_subclasses|_functorch|_library|"
                    r"_higher_order_ops|_guards|_prims|_refs|_decomp|_logging|jit|utils\._pytree)")


@contextlib.contextmanager
def _quiet_torch_warnings() -> Iterator[None]:
    """Hide warnings raised by torch's own tracing machinery (export internals, deprecation
    notes about its private APIs) while capturing; the model's own warnings still show."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=_TRACING_MODULES)
        yield


def capture(module: nn.Module, args: tuple, kwargs: dict[str, Any], dynamic_shapes: Any
            ) -> fx.GraphModule:
    """``torch.export.export(..., strict=False).module()`` with actionable errors; dynamic
    dims admit every size >= 1 the model allows (see the module docstring)."""
    check_dynamic_shapes(dynamic_shapes)
    if dynamic_shapes == "auto":
        dynamic_shapes = auto_dynamic_shapes(module, args, kwargs)
    elif dynamic_shapes is not None:
        dynamic_shapes = _dims_from_two(dynamic_shapes)
    try:
        with _size_oblivious(), _quiet_torch_warnings():
            program = torch.export.export(module, args, kwargs, dynamic_shapes=dynamic_shapes,
                                          strict=False)
    except Exception as err:  # noqa: BLE001 - re-raised with a hint, cause chained
        text = f"{type(err).__name__}: {err}"
        hints = [hint for needle, hint in _HINTS if needle in text]
        hint = hints[0] if hints else ("simplify the construct named above, or convert the "
                                       "model's nn.Linear layers eagerly with "
                                       "stl_compiler.swap_linears_ instead")
        first = text.strip().splitlines()[0][:500]
        raise CaptureError(f"torch.export could not capture {type(module).__name__}: {first}\n"
                           f"How to work around it: {hint}") from err
    _drop_size_one_guards(program)
    module = program.module()
    _views_to_reshapes(module.graph)
    module.recompile()
    return module


def check_runs_on_example(module: nn.Module, args: tuple, kwargs: dict[str, Any], *,
                          fix: str = "give example inputs that forward accepts (one per "
                          "input, keyword ones in example_kwargs)") -> None:
    """Run ``module`` eagerly (eval mode, no grad) on the example inputs.

    A model that fails on its example cannot be exported, and ``torch.export`` reports that
    as a symbolic-shape error about dims it invented; the eager error names the real problem.

    Raises:
        ValueError: the example does not fit ``forward``'s parameters, or the model raises
            on it (the model's error is quoted and chained); ``fix`` ends the message.
    """
    named = {f"input {i}": v for i, v in enumerate(args)} | kwargs
    try:
        signature = inspect.signature(module.forward)
    except (TypeError, ValueError):  # a forward without an inspectable signature
        signature = None
    if signature is not None:
        try:
            named = dict(signature.bind(*args, **kwargs).arguments)
        except TypeError as err:
            raise ValueError(f"the example inputs ({describe_inputs(named)}) do not fit "
                             f"{type(module).__name__}.forward{signature}: {err}; {fix}") \
                from None
    with eval_mode(module), torch.no_grad():
        try:
            module(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - the model's own error, quoted and chained
            first = (str(err).strip().splitlines() or [""])[0][:300]
            raise ValueError(f"the model fails on the example input ({describe_inputs(named)}):"
                             f" {type(err).__name__}: {first}; {fix}") from err


def describe_inputs(named: dict[str, Any]) -> str:
    """``"x: float32[2, 16, 64], mask: bool[2, 16]"``: example inputs by name."""

    def one(value: Any) -> str:
        if isinstance(value, torch.Tensor):
            return f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}"
        return type(value).__name__

    return ", ".join(f"{name}: {one(value)}" for name, value in named.items()) or "no inputs"


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode for the export, restored afterwards. A module made by ``torch.export``
    (``stl_compile`` output) refuses ``eval()``: its mode was fixed when it was captured."""
    was_training = module.training
    try:
        module.eval()
    except NotImplementedError:
        yield
        return
    try:
        yield
    finally:
        module.train(was_training)


@dataclass(frozen=True)
class InputSpec:
    """One tensor input of a captured graph: dtype, and per dim a fixed size or the
    ``(min, max)`` range torch.export allows (``max`` None: unbounded)."""

    name: str
    dtype: torch.dtype
    dims: tuple[int | tuple[int, int | None], ...]

    def describe(self) -> str:
        sizes = [str(d) if isinstance(d, int) else "*" for d in self.dims]
        return f"{self.name}: {str(self.dtype).removeprefix('torch.')}[{', '.join(sizes)}]"

    def mismatch(self, value: Any) -> str | None:
        """What is wrong with ``value`` as this input, or None."""
        if not isinstance(value, torch.Tensor):
            return f"expected a tensor ({self.describe()}), got {type(value).__name__}"
        if value.dtype != self.dtype:
            return (f"expected dtype {self.dtype}, got {value.dtype}; the model was compiled "
                    f"for {self.dtype}: cast the input (x.to({self.dtype})) or compile again "
                    f"with {value.dtype} example inputs")
        if value.dim() != len(self.dims):
            return f"expected {len(self.dims)} dims ({self.describe()}), got shape " \
                   f"{list(value.shape)}"
        for i, (want, got) in enumerate(zip(self.dims, value.shape)):
            if isinstance(want, int):
                if got != want:
                    return (f"dim {i} must be {want} (fixed when the model was compiled: "
                            f"{self.describe()}), got shape {list(value.shape)}")
                continue
            low, high = want
            # torch.export traces dynamic dims as >= 2 and admits 0/1 at run time
            if (low > 2 and got < low) or (high is not None and got > high):
                allowed = f"{low if low > 2 else 1}..{high if high is not None else 'any'}"
                return (f"dim {i} must be in {allowed} (the dynamic_shapes range it was "
                        f"compiled for), got shape {list(value.shape)}")
        return None


def input_specs(gm: fx.GraphModule) -> list[InputSpec | None]:
    """The spec of each flat input of a ``capture`` result (None for non-tensor inputs)."""
    ranges = getattr(gm, "range_constraints", {})

    def dim(size: Any) -> int | tuple[int, int | None]:
        if isinstance(size, int):
            return size
        expr = size.node.shape_env.replace(size.node.expr)  # a dim specialized in capture
        if expr.is_number:
            return int(expr)
        bounds = ranges.get(size.node.expr)  # the ranges torch.export checks
        if bounds is None:
            return (0, None)
        upper = bounds.upper
        return (int(bounds.lower), None if not upper.is_finite or upper > 2**62 else int(upper))

    specs: list[InputSpec | None] = []
    for node in gm.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        specs.append(InputSpec(node.name, val.dtype, tuple(dim(s) for s in val.shape))
                     if isinstance(val, torch.Tensor) else None)
    return specs


def _views_to_reshapes(graph: fx.Graph) -> None:
    """``view`` nodes were chosen for the example's fake strides, which torch 2.11 gets wrong
    for some graphs (nn.MultiheadAttention) and which differ at other shapes once STL ops
    produce fresh tensors; a reshape copies only when it must. Captured graphs are
    functional: no view result is mutated."""
    for node in graph.nodes:
        if node.target is torch.ops.aten.view.default:
            node.target = torch.ops.aten.reshape.default
