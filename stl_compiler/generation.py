"""Incremental decoding (generation with a KV cache) for models with causal STL layers.

A ``row_grouping="causal"`` :class:`~stl_compiler.nn.STLLinear` computes each tile of t
consecutive positions ``t*j .. t*j+t-1`` of a sequence together; with its causal basis, output
row ``a`` of a tile depends on input rows ``0..a`` of that tile. A full forward over a sequence
is therefore causal, but a decoding step that feeds only the new token at position ``p`` would
put that token in row 0 of a tile of its own and compute a different function: the layer must
also see its input rows at positions ``floor(p/t)*t .. p-1``.

:func:`enable_incremental` (which :func:`stl_compiler.swap_linears_` calls whenever the model
holds causal STL layers) registers hooks on the model: before each call they read where the
new tokens start from the KV cache the call receives (``cache.get_seq_length()``), and the
causal STL layers then prepend the rows they kept from earlier calls, compute, return only the
new rows, and keep the rows of the new partial tile. Those rows live on the cache object
itself (attribute :data:`ROWS_ATTR`, a :class:`TileRows`), so every cache carries its own
state: ``generate`` called twice, two interleaved conversations, a deep-copied prompt cache,
beam search (``reorder_cache`` is forwarded to the rows) all see the right rows. A call
without a cache (``use_cache=False``, training, a plain forward) computes the plain full
forward and reads no earlier state.

Two storage modes, chosen by the cache:

* dynamic caches (``DynamicCache``, the default of ``generate``): each layer keeps a small
  tensor of rows and their position range (all rows of the last call when it got the cache
  and had up to :data:`ROLLBACK_ROWS` new tokens, so that assisted decoding can crop back
  into it; else those of its last tile). Positions are Python ints, so the layer checks that
  the rows it needs are there and raises :class:`IncrementalDecodingError` otherwise (a cache
  cropped back further, a cache that advanced without the STL layers seeing it).
* compileable caches (``StaticCache``, ``cache_implementation="static"``): each layer keeps a
  fixed ``(batch, t-1, K)`` buffer updated in place, and the position stays a tensor, so a
  ``torch.compile``-d decode step has static shapes, no host synchronization and no graph
  break (CUDA graphs: the buffers are marked static addresses, like the cache's own). Calls
  must then follow each other in position order (a reset to position 0 is fine); nothing is
  checked at run time.

Positions are indices along the sequence dimension of the model's input (with left padding,
the padding counts): the same alignment as a full forward over the same input tensor, so
incremental logits equal full-forward logits up to rounding.
"""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from .nn import STLLinear
from .tiling import round_up

__all__ = [
    "ROLLBACK_ROWS",
    "ROWS_ATTR",
    "GenerationState",
    "IncrementalDecodingError",
    "TileRows",
    "disable_incremental",
    "enable_incremental",
    "generation_state",
]

#: Attribute of a KV cache object that holds its :class:`TileRows`.
ROWS_ATTR = "_stl_tile_rows"

#: A dynamic cache keeps the rows of a whole call of up to this many new tokens (else those
#: of its last tile): a cache cropped back into such a call (assisted / prompt-lookup
#: decoding rejecting candidates) finds the rows it needs.
ROLLBACK_ROWS = 64

#: Cache methods that change the batch, forwarded to the cache's :class:`TileRows`.
_FORWARDED = {"reorder_cache": "select", "batch_select_indices": "select",
              "batch_repeat_interleave": "repeat_interleave"}


class IncrementalDecodingError(RuntimeError):
    """A call continues a KV cache whose STL rows are missing or do not fit the call."""


class TileRows:
    """The STL part of one KV cache: per causal STL layer, its input rows of the current tile.

    ``rows`` (dynamic caches): ``key -> (rows (*batch, n, K), start, stop)``, the layer's input
    rows at positions ``start .. stop-1``. ``buffers`` (compileable caches): ``key ->
    (*batch, t-1, K)``, the rows of positions ``floor(p/t)*t .. p-1`` (``p`` the next position)
    in the first ``p mod t`` slots, zeros after. The batch dim (dim 0) follows the cache's
    ``reorder_cache``, ``batch_select_indices`` and ``batch_repeat_interleave``.
    """

    def __init__(self) -> None:
        self.rows: dict[str, tuple[Tensor, int, int]] = {}
        self.buffers: dict[str, Tensor] = {}

    def take(self, key: str, start: int, stop: int, like: Tensor) -> Tensor:
        """The stored rows of positions ``start .. stop-1`` for layer ``key`` (the earlier rows
        of the tile of a call whose first row is at ``stop``), in ``like``'s dtype."""
        entry = self.rows.get(key)
        if entry is None or entry[1] > start or entry[2] < stop:
            held = "none" if entry is None else f"positions {entry[1]}..{entry[2] - 1}"
            raise IncrementalDecodingError(
                f"STL layer {key!r} needs its input rows at positions {start}..{stop - 1} (the "
                f"earlier rows of the tile of position {stop}) to continue this KV cache, and "
                f"the cache holds {held}. The cache was advanced or rolled back (crop) past "
                f"the last tile without the model's STL layers seeing it; incremental decoding "
                f"with causal STL layers needs every token to go through the model that "
                f"stl_compiler.generation.enable_incremental set up, and a rollback (crop) "
                f"only back into the last call (up to {ROLLBACK_ROWS} new tokens) or its last "
                f"tile. Recompute the cache with a full forward from position 0")
        rows, first, _ = entry
        if rows.shape[:-2] != like.shape[:-2] or rows.shape[-1] != like.shape[-1]:
            raise IncrementalDecodingError(
                f"STL layer {key!r}: the cache's rows have batch shape {tuple(rows.shape[:-2])} "
                f"and {rows.shape[-1]} features, the call's input {tuple(like.shape[:-2])} and "
                f"{like.shape[-1]}; the batch of a KV cache can change only through its "
                f"reorder_cache / batch_select_indices / batch_repeat_interleave methods")
        return rows[..., start - first:stop - first, :].to(like.dtype)

    def store(self, key: str, rows: Tensor, start: int, stop: int) -> None:
        """Keep ``rows`` (``stop - start`` of them, detached) as layer ``key``'s rows."""
        self.rows[key] = (rows.detach(), start, stop)

    def buffer(self, key: str, like: Tensor, slots: int) -> Tensor:
        """Layer ``key``'s fixed buffer ``(*batch, slots, K)`` for inputs like ``like``
        (zeros when new or when the batch shape or width changed)."""
        shape = (*like.shape[:-2], slots, like.shape[-1])
        buf = self.buffers.get(key)
        if buf is None or tuple(buf.shape) != shape or buf.device != like.device:
            buf = torch.zeros(shape, dtype=like.dtype, device=like.device)
            if not torch.compiler.is_compiling():  # a fixed address for CUDA graphs
                torch._dynamo.mark_static_address(buf)
            self.buffers[key] = buf
        return buf

    def select(self, index: Tensor) -> None:
        """Keep / reorder the sequences ``index`` (dim 0), as the cache's ``reorder_cache``."""
        for key, (rows, start, stop) in self.rows.items():
            if rows.dim() >= 3:
                self.rows[key] = (rows.index_select(0, index.to(rows.device)), start, stop)
        for key, buf in self.buffers.items():
            picked = buf.index_select(0, index.to(buf.device))
            if picked.shape == buf.shape:
                buf.copy_(picked)  # in place: the address stays fixed
            else:
                self.buffers[key] = picked

    def repeat_interleave(self, repeats: int) -> None:
        """Repeat every sequence ``repeats`` times (dim 0), as ``batch_repeat_interleave``."""
        for key, (rows, start, stop) in self.rows.items():
            if rows.dim() >= 3:
                self.rows[key] = (rows.repeat_interleave(repeats, dim=0), start, stop)
        for key, buf in self.buffers.items():
            self.buffers[key] = buf.repeat_interleave(repeats, dim=0)


class _AlsoRows:
    """A cache method that, after running, applies the same batch change to the cache's
    :class:`TileRows`. Holds only the bound method (``deepcopy`` of the cache rebinds it)."""

    def __init__(self, method: Any, rows_method: str) -> None:
        self.method = method
        self.rows_method = rows_method

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.method(*args, **kwargs)
        rows = getattr(self.method.__self__, ROWS_ATTR, None)
        if rows is not None:
            getattr(rows, self.rows_method)(*args, **kwargs)
        return out


def _attach(cache: Any, rows: TileRows) -> None:
    """Make ``rows`` the STL state of ``cache`` and forward its batch-changing methods."""
    setattr(cache, ROWS_ATTR, rows)
    for name, rows_method in _FORWARDED.items():
        method = getattr(cache, name, None)
        if callable(method) and not isinstance(vars(cache).get(name), _AlsoRows):
            setattr(cache, name, _AlsoRows(method, rows_method))


def _output_cache(output: Any) -> Any:
    """The KV cache a model call returned (transformers ``ModelOutput`` or tuple), or None."""
    for name in ("cache", "past_key_values"):
        value = getattr(output, name, None) if not isinstance(output, tuple) else None
        if value is not None:
            return value
    if isinstance(output, tuple):
        return next((v for v in output if callable(getattr(v, "get_seq_length", None))), None)
    return None


class GenerationState:
    """Per-model incremental-decoding state, shared by the model's causal STL layers.

    Built by :func:`enable_incremental`; :meth:`pre_hook` and :meth:`post_hook` are the
    model's forward hooks, :meth:`layer_forward` the causal layers' forward during a call with
    a cache. Between calls it holds nothing: the rows live on each cache (:class:`TileRows`).

    Args:
        tile: the least common multiple of the causal layers' tiles.
        head_is_stl: whether the model's output embedding (``lm_head``) is one of its causal
            STL layers; then a ``logits_to_keep`` argument is widened to whole tiles for the
            head and the logits cut back after the call.
    """

    def __init__(self, tile: int, head_is_stl: bool = False) -> None:
        self.tile = tile
        self.head_is_stl = head_is_stl
        self.active = False
        self._end_call()

    def _end_call(self) -> None:
        self.active = False
        self.static = False
        self.rows: TileRows | None = None
        self.start: int | Tensor = 0  # position of the call's first new token
        self.new: int | None = None  # number of new tokens (None: unknown)
        self.row_counts: tuple[int, ...] = ()  # rows a layer may see (compileable caches)
        self.out_rows: int | Tensor | None = None  # logits to keep after a widened head
        self.attach_output = False
        self.counts: dict[str, int] = {}

    # --- model hooks -------------------------------------------------------------------------

    def pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                 ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """Forward pre-hook (``with_kwargs``): find the call's cache and first position."""
        self._end_call()
        named = _named_inputs(module, args, kwargs)
        tokens = named.get("input_ids")
        if tokens is None:
            tokens = named.get("inputs_embeds")
        new = int(tokens.shape[1]) if isinstance(tokens, Tensor) and tokens.dim() >= 2 else None
        cache = named.get("cache")
        if cache is None:
            cache = named.get("past_key_values")
        if cache is None:
            use_cache = named.get("use_cache")
            if use_cache is None:
                use_cache = getattr(getattr(module, "config", None), "use_cache", False)
            # no cache in, and none out (or a traced graph): the plain full forward, with an
            # STL head widened to whole tiles when logits_to_keep cuts its rows
            if not use_cache or torch.compiler.is_compiling() or torch.jit.is_tracing():
                self.start, self.new = 0, new
                widened = self._widen_head(module, kwargs, named)
                return None if widened is None else (args, widened)
            rows, start, static = TileRows(), 0, False
            self.attach_output = True  # the model builds a cache: give it these rows
        else:
            if not callable(getattr(cache, "get_seq_length", None)):
                raise TypeError(f"causal STL layers decode incrementally with a transformers "
                                f"Cache (get_seq_length), got a {type(cache).__name__}")
            static = bool(getattr(cache, "is_compileable", False))
            position = named.get("cache_position")  # passed by transformers before 5.2x
            if static and isinstance(position, Tensor) and position.numel():
                start = position.reshape(-1)[0]  # a tensor: no host sync
            else:
                start = cache.get_seq_length()
            if isinstance(start, Tensor):  # a static cache's counter, updated in place
                start = start.clone() if static else int(start)
            rows = getattr(cache, ROWS_ATTR, None)
            if rows is None or (not static and start == 0):
                rows = TileRows()
                _attach(cache, rows)
        self.active, self.static, self.rows, self.start, self.new = True, static, rows, start, new
        self.row_counts = () if new is None else (new,)
        widened = self._widen_head(module, kwargs, named)
        return None if widened is None else (args, widened)

    def _widen_head(self, module: nn.Module, kwargs: dict[str, Any], named: dict[str, Any]
                    ) -> dict[str, Any] | None:
        """Make an STL ``lm_head`` see whole tiles when ``logits_to_keep`` cuts the rows:
        the new kwargs, or None to leave them."""
        keep = kwargs.get("logits_to_keep")
        new = self.new
        tuples = named.get("return_dict") is False or getattr(
            getattr(module, "config", None), "return_dict", True) is False
        if not self.head_is_stl or keep is None or new is None:
            return None
        if isinstance(keep, Tensor):  # row indices: compute every row, pick them after
            widened = 0
        elif isinstance(keep, int) and 0 < keep < new:
            start = self.start
            if isinstance(start, Tensor):  # no host sync inside a compiled graph
                start = None if torch.compiler.is_compiling() else int(start)
            if start is None:
                widened = new
            else:
                stop = start + new
                first = max(start, (stop - keep) // self.tile * self.tile)
                widened = stop - first
        else:
            return None
        self.row_counts = (new, widened or new)
        if widened == keep:  # the kept rows start at a tile (or at the call's first token)
            return None
        if tuples:
            raise ValueError(
                f"logits_to_keep={keep!r} would give the STL lm_head rows that do not start at a "
                f"tile, and with return_dict=False the logits cannot be cut back after a wider "
                f"head; pass return_dict=True (or logits_to_keep=0)")
        self.out_rows = keep
        return {**kwargs, "logits_to_keep": widened}

    def post_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        """Forward hook (``always_call``): hand the rows to a cache the model built, cut the
        logits of a widened head back, and end the call."""
        if not self.active and self.out_rows is None:
            return None
        try:
            if output is not None and self.attach_output:
                cache = _output_cache(output)
                if cache is not None and callable(getattr(cache, "get_seq_length", None)):
                    _attach(cache, self.rows)
            if output is not None and self.out_rows is not None:
                keep = self.out_rows
                logits = output.logits
                output.logits = logits[:, keep] if isinstance(keep, Tensor) \
                    else logits[:, logits.shape[1] - keep:]
                return output
        finally:
            self._end_call()
        return None

    # --- layers ------------------------------------------------------------------------------

    def layer_forward(self, layer: STLLinear, x: Tensor) -> Tensor:
        """``layer(x)`` for the new rows of the current call, in their places in the tiles.

        The input's last rows are the call's last positions (a layer that sees fewer rows than
        the call has new tokens, like an ``lm_head`` after ``logits_to_keep``, sees the last
        ones)."""
        key = layer._stl_generation_key
        count = self.counts.get(key, 0)
        self.counts[key] = count + 1
        if count:  # a layer called twice in one forward keeps two sets of rows
            key = f"{key}#{count}"
        squeeze = x.dim() == 1
        if squeeze:
            x = x.unsqueeze(0)
        n = x.shape[-2]
        first = self.start if self.new is None else self.start + (self.new - n)
        if self.static:
            if self.row_counts and n not in self.row_counts:
                raise IncrementalDecodingError(
                    f"STL layer {key!r} got {n} rows in a call with {self.new} new tokens; "
                    f"with a compileable cache a causal STL layer must see all of the call's "
                    f"rows (or the head's logits_to_keep rows)")
            y = self._static_rows(layer, key, x, first)
        else:
            if first < 0:
                raise IncrementalDecodingError(
                    f"STL layer {key!r} got {n} rows, more than the call's {self.new} new "
                    f"tokens after position {self.start}")
            y = self._dynamic_rows(layer, key, x, first)
        return y.squeeze(0) if squeeze else y

    def _dynamic_rows(self, layer: STLLinear, key: str, x: Tensor, first: int) -> Tensor:
        t = layer.tile
        stop = first + x.shape[-2]
        tile_start = first - first % t
        if tile_start < first:
            x = torch.cat([self.rows.take(key, tile_start, first, x), x], dim=-2)
        y = layer.forward_tiles(x)
        if stop > 0:
            # keep the last tile (a rollback within it needs its rows); after a short call
            # with a cache (a decoding step, a speculative-decoding check) all of it, so that
            # the cache can be cropped back to any of its tokens. A call that got no cache
            # (a plain forward building one: training, scoring) keeps the last tile only.
            short = not self.attach_output and stop - first <= ROLLBACK_ROWS
            keep_from = tile_start if short else (stop - 1) // t * t
            self.rows.store(key, x[..., keep_from - tile_start:, :].detach().clone(),
                           keep_from, stop)
        return y[..., first - tile_start:, :]

    def _static_rows(self, layer: STLLinear, key: str, x: Tensor, first: int | Tensor
                     ) -> Tensor:
        """Fixed shapes, position as a tensor: gather the tile-aligned rows
        ``floor(first/t)*t ..`` from the buffer and ``x``, compute, pick the new rows, and write
        the new partial tile back into the buffer, in place."""
        t = layer.tile
        n = x.shape[-2]
        buf = self.rows.buffer(key, x, t - 1)
        before = first % t  # earlier rows of the first tile, in the buffer's first slots
        size = round_up(n + t - 1, t)
        i = torch.arange(size, device=x.device)
        window = torch.cat([buf.to(x.dtype), x], dim=-2)  # (*batch, t-1+n, K)
        source = torch.where(i < before, i, i - before + (t - 1)).clamp(0, t - 2 + n)
        aligned = window.index_select(-2, source)
        aligned = torch.where((i < before + n).unsqueeze(-1), aligned, 0.0)  # zero tail rows
        y = layer.forward_tiles(aligned)
        y = y.index_select(-2, before + torch.arange(n, device=x.device))
        kept = (before + n) % t  # rows of the last, partial tile
        j = torch.arange(t - 1, device=x.device)
        tail = aligned.index_select(-2, (before + n - kept + j).clamp(0, size - 1))
        buf.copy_(torch.where((j < kept).unsqueeze(-1), tail, 0.0).detach())
        return y


def _named_inputs(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                  ) -> dict[str, Any]:
    """The call's inputs by name: ``kwargs``, the first positional as ``input_ids``, and the
    other positionals bound to the forward's signature."""
    if len(args) <= 1:
        return {"input_ids": args[0], **kwargs} if args else kwargs
    try:
        bound = inspect.signature(module.forward).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return {"input_ids": args[0], **kwargs}
    return {**bound.arguments, **bound.arguments.get("kwargs", {})}


def _causal_layers(model: nn.Module) -> list[tuple[str, STLLinear]]:
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, STLLinear) and module.row_grouping == "causal"]


def enable_incremental(model: nn.Module) -> GenerationState | None:
    """Let ``model`` decode incrementally (transformers ``generate`` with a KV cache) with its
    ``row_grouping="causal"`` :class:`~stl_compiler.nn.STLLinear` layers.

    :func:`stl_compiler.swap_linears_` calls it, so ``model.generate(...)`` works after the
    conversion; call it yourself after building or replacing causal STL layers by hand (it
    replaces any earlier state of the model). Calls of ``model`` that pass a transformers
    ``Cache`` (or build one: ``use_cache``) continue it incrementally, and their logits equal
    those of one full forward over the same tokens, up to rounding; calls without a cache
    compute the plain full forward. Call the model it was enabled on (a submodule called on
    its own does not see the cache). See docs/causal_lm.md, "Generation".

    Returns:
        the model's :class:`GenerationState`, or None when it has no causal STL layer.

    Warns when a layer's ``ex`` / ``d`` are no longer causal (trained without keeping the
    structure): its outputs then depend on later rows of the tile, so neither the full forward
    nor incremental decoding is causal, and the two differ.
    """
    disable_incremental(model)
    layers = _causal_layers(model)
    if not layers:
        return None
    broken = [name for name, layer in layers if not layer.keeps_causality]
    if broken:
        shown = ", ".join(broken[:5]) + (" ..." if len(broken) > 5 else "")
        warnings.warn(f"enable_incremental: {len(broken)} causal STL layer(s) no longer have a "
                      f"causal basis ({shown}): their outputs depend on later tokens of a "
                      f"tile, and incremental decoding will not equal the full forward",
                      stacklevel=2)
    head = None
    if callable(getattr(model, "get_output_embeddings", None)):
        try:
            head = model.get_output_embeddings()
        except (NotImplementedError, AttributeError):
            head = None
    state = GenerationState(math.lcm(*(layer.tile for _, layer in layers)),
                            head_is_stl=any(head is layer for _, layer in layers))
    for name, layer in layers:
        layer._stl_generation = state
        layer._stl_generation_key = name or "<model>"
    model.register_forward_pre_hook(state.pre_hook, with_kwargs=True, prepend=True)
    model.register_forward_hook(state.post_hook, always_call=True)
    return state


def generation_state(model: nn.Module) -> GenerationState | None:
    """The :class:`GenerationState` that :func:`enable_incremental` installed on ``model``."""
    for hook in model._forward_pre_hooks.values():
        if isinstance(getattr(hook, "__self__", None), GenerationState):
            return hook.__self__
    return None


def disable_incremental(model: nn.Module) -> None:
    """Remove :func:`enable_incremental`'s hooks and state from ``model``: every call then
    computes the plain full forward (incremental decoding of causal STL layers gives wrong
    logits; use ``generate(..., use_cache=False)``)."""
    for hooks, extras in ((model._forward_pre_hooks, (model._forward_pre_hooks_with_kwargs,)),
                          (model._forward_hooks, (model._forward_hooks_with_kwargs,
                                                  model._forward_hooks_always_called))):
        for hook_id in [k for k, hook in hooks.items()
                        if isinstance(getattr(hook, "__self__", None), GenerationState)]:
            del hooks[hook_id]
            for extra in extras:
                extra.pop(hook_id, None)
    for _, layer in _causal_layers(model):
        vars(layer).pop("_stl_generation", None)
        vars(layer).pop("_stl_generation_key", None)
