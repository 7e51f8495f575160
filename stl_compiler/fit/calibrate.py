"""Data-aware calibration of converted layers (paper Lemma A.1: a linear regression).

Each :class:`~stl_compiler.STLLinear` is fitted, in forward order, to the dense output of the
layer it replaced, on its own calibration inputs: the encoded weight in closed form given
``ex`` and ``d`` (least squares), then alternating refinement of ``d`` (least squares) and
``ex`` (a few gradient steps), keeping the best iterate so a layer never gets worse.

Options for ``row_grouping="batch"`` and ``"causal"`` models (see :func:`calibrate`):
``basis="row_separable"`` restarts every layer from a basis whose product terms each read and
write a single tile row, and ``target="teacher"`` fits each layer to the dense model's own
activations (correcting the error of the layers before it) instead of the dense layer applied
to the student's inputs. A batch-grouped layer with a row-separable basis stays
row-separable, a causal-grouped layer with a causal basis stays causal
(:func:`support_masks`): the decoder solve and the encoder steps only change entries that
keep the promise (each term's own tile row; rows up to / from each term's pivot row).

In a torch.distributed job every sum over the calibration data (Gram matrices, right-hand
sides, errors, the encoder's gradient) is all-reduced, so every rank computes the same fit,
the single-process fit on the union of the ranks' data (docs/distributed.md).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from ..nn import STLLinear
from ..runtime.ops import encode
from ..tiling import (
    group_rows,
    is_causal,
    is_row_separable,
    pad_last2,
    round_up,
    rows_touched,
    to_tiles,
)
from . import distributed as dist_
from ._progress import Progress
from .fitting import pivot_masks

__all__ = ["calibrate", "calibrate_layer", "CalibrationTable", "row_separable_basis",
           "support_masks", "row_support", "run_batch", "check_not_compiled", "BASES",
           "TARGETS"]

BASES = ("converted", "row_separable")
TARGETS = ("layer", "teacher")


def run_batch(module: nn.Module, batch: object) -> object:
    """Call ``module`` on one batch: a tensor, a tuple/list of args, or a dict of kwargs."""
    if isinstance(batch, dict):
        return module(**batch)
    if isinstance(batch, (tuple, list)):
        return module(*batch)
    return module(batch)


def check_not_compiled(module: nn.Module, who: str) -> None:
    """Refuse the output of ``stl_compile``: fitting works on the eager, converted model."""
    if getattr(module, "stl_report", None) is not None:
        raise ValueError(f"{who} got the output of stl_compile (it has .stl_report); calibrate "
                         f"before stl_compile: swap_linears_(model, config, keep_reference=True)"
                         f" -> calibrate -> distill -> stl_compile (stl_compile keeps the "
                         f"calibrated STL layers)")


def _nonfinite(value: object, where: str, label: str = "item") -> str | None:
    """A message naming the first tensor of ``value`` holding NaN or Inf, else None."""
    items = (value.items() if isinstance(value, dict) else
             enumerate(value) if isinstance(value, (tuple, list)) else [(None, value)])
    for key, item in items:
        if (isinstance(item, Tensor) and item.is_floating_point()
                and not bool(torch.isfinite(item).all())):
            part = "" if key is None else f" ({label} {key!r})"
            return f"{where}{part} contains NaN or Inf"
    return None


def _first_nonfinite_batch(batches: list, where: str) -> str | None:
    for i, batch in enumerate(batches):
        error = _nonfinite(batch, f"calibration batch {i}{where}")
        if error:
            return (f"{error}: calibration would turn every STL parameter into NaN; remove or "
                    f"clean that batch (e.g. torch.nan_to_num) and call calibrate again")
    return None


def _fmt(value: float | None) -> str:
    return "not called" if value is None else f"{value:.4f}"


@dataclass
class CalibrationTable:
    """Per-layer relative output error ``‖y − y_dense‖ / ‖y_dense‖`` before and after
    (``None`` for a layer the calibration batches never call)."""

    rows: list[dict]

    def to_json(self) -> str:
        return json.dumps(self.rows, indent=1)

    def __str__(self) -> str:
        width = max([len("layer")] + [len(r["layer"]) for r in self.rows])
        lines = [f"{'layer':<{width}}  rank  error before  error after"]
        lines += [f"{r['layer']:<{width}}  {r['rank']:>4}  {_fmt(r['error_before']):>12}  "
                  f"{_fmt(r['error_after']):>11}" for r in self.rows]
        return "\n".join(lines)


def _reference(name: str, layer: STLLinear, teacher: nn.Module | None
               ) -> tuple[Tensor, Tensor | None]:
    """Dense ``(weight (out, in), bias)`` the layer must reproduce."""
    if teacher is not None:
        try:
            dense = teacher.get_submodule(name)
        except AttributeError:
            dense = None
        if not isinstance(dense, nn.Linear):
            raise ValueError(f"teacher has no nn.Linear named {name!r} (found "
                             f"{type(dense).__name__}); the teacher must be the dense model "
                             f"the student was converted from")
        return dense.weight.detach(), None if dense.bias is None else dense.bias.detach()
    ref = getattr(layer, "reference_weight", None)
    if ref is None:
        raise ValueError(f"STL layer {name!r} has no dense reference: convert with "
                         f"keep_reference=True (STLLinear.from_linear / swap_linears_) or pass "
                         f"teacher=<the dense model>")
    return ref, None if layer.bias is None else layer.bias.detach()


def _dense_targets(inputs: list[Tensor], weight: Tensor, bias: Tensor | None) -> list[Tensor]:
    """The dense layer on the student's inputs, in float64 (``target="layer"``)."""
    return [torch.nn.functional.linear(x.double(), weight.double(),
                                       None if bias is None else bias.double())
            for x in inputs]


class _LayerData:
    """Calibration inputs of one layer, arranged in row tiles exactly as its forward does."""

    def __init__(self, layer: STLLinear, inputs: list[Tensor], targets: list[Tensor]) -> None:
        t = layer.tile
        kp, mp = round_up(layer.in_features, t), round_up(layer.out_features, t)
        self.inputs = inputs
        self.targets = [y.double() for y in targets]
        xt, yt, valid = [], [], []
        own_bias = 0.0 if layer.bias is None else layer.bias.detach().double()
        for x, y in zip(inputs, self.targets):
            rows, target = (group_rows(v if v.dim() > 1 else v[None], layer.row_grouping)
                            for v in (x.double(), y - own_bias))
            n = rows.shape[-2]
            npad = round_up(n, t)
            xt.append(pad_last2(rows, npad, kp).reshape(-1, npad, kp))
            yt.append(to_tiles(pad_last2(target, npad, mp), t).reshape(-1, mp // t, t * t))
            counts = (n - torch.arange(0, npad, t, device=x.device)).clamp(max=t)
            valid.append(counts.repeat(xt[-1].shape[0]))
        device = layer.weight_encoded.device
        self.kt = kp // t
        self.x_rows = xt                                  # (B, npad, kp) per input
        self.y_tiles = torch.cat(yt) if yt else torch.zeros(  # (N, Mt, t²): dense − own bias
            0, mp // t, t * t, dtype=torch.float64, device=device)
        self.valid = torch.cat(valid) if valid else torch.zeros(  # (N,) real rows per row tile
            0, dtype=torch.long, device=device)
        # mask[i, c]: entry c = a*t + b of row tile i is a real row (a < valid[i])
        self.mask = (torch.arange(t * t, device=self.valid.device) // t)[None, :] \
            < self.valid[:, None]

    def encoded(self, ex: Tensor, tile: int) -> Tensor:
        """``(r, N, Kt)``: the layer's own stl::encode of every row tile."""
        if not self.x_rows:  # no calibration input on this rank
            return ex.new_zeros(ex.shape[0], 0, self.kt)
        return torch.cat([encode(x, ex, tile).reshape(ex.shape[0], -1, x.shape[-1] // tile)
                          for x in self.x_rows], dim=1)


def _rel_error(layer: STLLinear, data: _LayerData) -> float:
    """Relative error over the data of every rank."""
    sums = data.y_tiles.new_zeros(2)
    with torch.no_grad():
        for x, y in zip(data.inputs, data.targets):
            sums += torch.stack([(layer(x).double() - y).square().sum(), y.square().sum()])
    num, den = dist_.all_reduce_sum(sums).tolist()
    return (num / max(den, 1e-300)) ** 0.5


#: The default of ``calibrate(ridge=...)``: Tikhonov weight relative to the mean diagonal of each
#: least-squares Gram matrix. 1e-8 (a numerical guard only) let the encoded weight of layers
#: with near-degenerate inputs grow large (|entries| 73 on the digits ViT's first qkv at r=16):
#: exact in fp32, but in bf16 those weights cancel badly (r=16 calibrated accuracy 88.7% in fp32,
#: 29.8% in bf16). 1e-4 bounds them (|entries| 4.3) and measured better in fp32 too (91.3%; r=24
#: 95.3 → 96.4%, bf16 92.0 → 96.2%); 1e-2 costs accuracy (docs/quality.md, "Calibration ridge").
DEFAULT_RIDGE = 1e-4


def _ridge_solve(gram: Tensor, rhs: Tensor, ridge: float) -> Tensor:
    scale = float(gram.diagonal().mean().clamp_min(1e-300))
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + ridge * scale * eye, rhs)


def support_masks(layer: STLLinear, tol: float = 1e-6) -> tuple[Tensor, Tensor] | None:
    """``(ex_mask, d_mask)``, bool ``(rank, t*t)``: the entries of ``ex`` / ``d`` that
    calibration and distillation may change without breaking the promise of the layer's row
    grouping; None when there is nothing to preserve (``row_grouping="tokens"``, or a basis
    that does not keep the promise already): its updates are unconstrained.

    ``row_grouping="batch"`` with a row-separable basis: a term that touches one tile row
    may use every entry of that row, in ``ex`` and ``d``, so the layer stays row-separable
    (batched sequences stay independent). ``row_grouping="causal"`` with a causal basis:
    term ``p`` has a pivot row, the first row it writes (the last row it reads if it writes
    none), and may read rows ``<= pivot`` and write rows ``>= pivot``
    (:func:`~stl_compiler.fit.fitting.pivot_masks`), so every update keeps the layer causal
    (:func:`~stl_compiler.tiling.is_causal`). In both, a term that touches no row (zero
    ``ex`` and ``d``) keeps its zeros. ``tol`` is that of
    :func:`~stl_compiler.tiling.is_row_separable` / ``is_causal``. Masks of a sharded
    (DTensor) layer are of the full parameters (a collective).
    """
    if layer.row_grouping not in ("batch", "causal"):
        return None
    t = layer.tile
    ex, d = (p.full_tensor() if dist_.is_sharded(p) else p for p in (layer.ex, layer.d))
    rows = SimpleNamespace(tile=t, ex=ex, d=d)
    reads, writes = (rows_touched(m.detach(), t, tol) for m in (ex, d))
    either = reads | writes
    touched = either.any(1)[:, None]
    if layer.row_grouping == "causal":
        if not is_causal(rows, tol):
            return None
        row = torch.arange(t, device=reads.device)
        first_write = torch.where(writes, row, t).amin(1)
        last_read = torch.where(reads, row, -1).amax(1).clamp_min(0)
        pivots = torch.where(writes.any(1), first_write, last_read)
        masks = pivot_masks(t, pivots.cpu(), "causal")
        return tuple(m.to(reads.device) & touched for m in masks)
    if not is_row_separable(rows, tol):
        return None
    one_row = (either.sum(1) == 1)[:, None]
    return tuple(torch.where(one_row, either, touched_rows).repeat_interleave(t, dim=1)
                 for touched_rows in (reads, writes))


def row_support(layer: STLLinear, tol: float = 1e-6) -> tuple[Tensor, Tensor] | None:
    """The former name of :func:`support_masks` (it now also covers ``"causal"`` layers)."""
    return support_masks(layer, tol)


def _masked_solve(gram: Tensor, rhs: Tensor, keep: Tensor | None, ridge: float) -> Tensor:
    """:func:`_ridge_solve` of ``gram x = rhs`` over the unknowns ``keep`` only (the others
    are 0); ``rhs`` is ``(n, 1)``."""
    if keep is None:
        return _ridge_solve(gram, rhs, ridge)
    x = rhs.new_zeros(rhs.shape)
    if bool(keep.any()):
        x[keep] = _ridge_solve(gram[keep][:, keep], rhs[keep], ridge)
    return x


def _solve_weight(xh: Tensor, d: Tensor, data: _LayerData, ridge: float) -> Tensor:
    """Least-squares encoded weight ``(r, Kt, Mt)`` given encoded inputs and decoder."""
    r, _, kt = xh.shape
    gram = xh.new_zeros(r * kt, r * kt)
    for v in data.valid.unique().tolist():
        sel = data.valid == v
        h = xh[:, sel].permute(1, 0, 2).reshape(-1, r * kt)          # (Nv, r·Kt)
        dd = (d * data.mask[sel][0]) @ d.T                            # D diag(mask) Dᵀ
        gram += (h.T @ h) * dd.repeat_interleave(kt, 0).repeat_interleave(kt, 1)
    e = torch.einsum("pc,njc->pnj", d, data.y_tiles * data.mask[:, None, :])
    rhs = torch.einsum("pnl,pnj->plj", xh, e).reshape(r * kt, -1)
    dist_.all_reduce_sum(gram)
    dist_.all_reduce_sum(rhs)
    return _ridge_solve(gram, rhs, ridge).reshape(r, kt, -1)


def _solve_decoder(xh: Tensor, wh: Tensor, data: _LayerData, tile: int, ridge: float,
                   support: Tensor | None = None) -> Tensor:
    """Least-squares decoder ``(r, t²)`` given encoded inputs and weight; with ``support``
    (bool ``(r, t²)``) only those entries are solved for, the others are 0."""
    z = torch.bmm(xh, wh)                                             # (r, N, Mt)
    # entry c = a*t + b of a row tile is real when the tile has more than a real rows
    gram = torch.stack([torch.einsum("pnj,qnj->pq", z[:, data.valid > a], z[:, data.valid > a])
                        for a in range(tile)])                        # (t, r, r)
    rhs = torch.einsum("pnj,njc->pc", z, data.y_tiles * data.mask[:, None, :])  # (r, t²)
    dist_.all_reduce_sum(gram)
    dist_.all_reduce_sum(rhs)
    return torch.stack([_masked_solve(gram[c // tile], rhs[:, c:c + 1],
                                      None if support is None else support[:, c],
                                      ridge)[:, 0]
                        for c in range(tile * tile)], dim=1)


def _refine_encoder(layer: STLLinear, data: _LayerData, iters: int, lr: float,
                    support: Tensor | None = None) -> None:
    """A few Adam steps on ``ex`` alone (weight and decoder fixed) on the output MSE; with
    ``support`` (bool, ``ex``'s shape) the other entries get a zero gradient, so Adam leaves
    them exactly as they are.

    In float64, like the solves: the sum over batches (and ranks) then rounds far below the
    float32 the layer keeps, so the result does not depend on how the data is split."""
    ex = layer.ex.detach().double().requires_grad_(True)
    params = {n: p.detach().double() for n, p in layer.named_parameters()} | {"ex": ex}
    opt = torch.optim.Adam([ex], lr=lr)
    for _ in range(iters):
        opt.zero_grad()
        if data.inputs:
            sum((torch.func.functional_call(layer, params, (x.double(),)) - y).square().sum()
                for x, y in zip(data.inputs, data.targets)).backward()
        if ex.grad is None:
            ex.grad = torch.zeros_like(ex)
        dist_.all_reduce_sum(ex.grad)  # the gradient of the loss summed over every rank
        if support is not None:
            ex.grad.masked_fill_(~support, 0.0)
        opt.step()
    with torch.no_grad():
        layer.ex.copy_(ex)


def row_separable_basis(tile: int, rank: int, generator: torch.Generator | None = None
                        ) -> tuple[Tensor, Tensor]:
    """``(ex, d)``, each ``(rank, t*t)`` float64: ``rank/t`` product terms per tile row, term
    ``p`` reading and writing only row ``p // (rank/t)`` (``ex[p] = e_a ⊗ u_j``,
    ``d[p] = e_a ⊗ v_j`` with random unit t-vectors ``u_j, v_j``, the same for every row).

    With ``row_grouping="batch"`` the rows of a tile are unrelated sequences, so any term that
    reads one row and writes another only adds noise; this basis has none (an output row
    depends on its own input row only). Its encoded weight must be fitted (:func:`calibrate`).
    """
    if rank % tile:
        raise ValueError(f"a row-separable basis needs the rank to be a multiple of the tile "
                         f"({tile}), got rank={rank}")
    per = rank // tile
    u = torch.randn(per, tile, generator=generator, dtype=torch.float64)
    v = torch.randn(per, tile, generator=generator, dtype=torch.float64)
    u, v = u / u.norm(dim=1, keepdim=True), v / v.norm(dim=1, keepdim=True)
    ex = torch.zeros(rank, tile * tile, dtype=torch.float64)
    d = torch.zeros(rank, tile * tile, dtype=torch.float64)
    for a in range(tile):
        ex[a * per:(a + 1) * per, a * tile:(a + 1) * tile] = u
        d[a * per:(a + 1) * per, a * tile:(a + 1) * tile] = v
    return ex, d


def calibrate_layer(layer: STLLinear, inputs: list[Tensor], targets: list[Tensor],
                    steps: int = 4, *, name: str = "layer",
                    restart: tuple[Tensor, Tensor] | None = None, progress: bool = False,
                    ridge: float = DEFAULT_RIDGE
                    ) -> tuple[float, float]:
    """Fit one STL layer, in place, so that ``layer(inputs[i])`` approaches ``targets[i]``:
    the per-layer step of :func:`calibrate` (closed-form encoded weight, then ``steps``
    rounds of decoder / encoder refinement; the best iterate is kept, so the error never
    grows). Returns the relative output error ``‖y − target‖ / ‖target‖`` before and after.

    :func:`calibrate` is the way to calibrate a model (it captures each layer's inputs and
    targets in forward order); this step is public for experiments that choose each layer's
    targets themselves (tools/char_lm_experiments.py fits a layer to the teacher's output
    plus the residual-stream error accumulated before it).

    Args:
        layer: the layer (its ``row_grouping`` promise is kept, as in :func:`calibrate`).
        inputs: the layer's inputs, one tensor per batch.
        targets: the output wanted for each input (same shapes as ``layer``'s outputs).
        steps: refinement rounds (0: only the closed-form encoded weight).
        name: the layer's name, for the progress bar and warnings.
        restart: ``(ex, d)`` to restart from (e.g. :func:`row_separable_basis`); the layer as
            it is stays the best candidate until an iterate beats it.
        progress: show a progress bar on stderr.
        ridge: relative Tikhonov weight of the least-squares solves (as in :func:`calibrate`).

    In a torch.distributed job every rank calls it with its own inputs and targets: the sums
    are all-reduced, so every rank computes the same fit.
    """
    _check_ridge(ridge)
    data = _LayerData(layer, inputs, targets)
    bar = Progress(max(steps, 1), f"calibrate {name}", progress)
    before = _rel_error(layer, data)
    t = layer.tile
    params = (layer.weight_encoded, layer.ex, layer.d)
    best = (before if math.isfinite(before) else math.inf, [p.detach().clone() for p in params])
    if restart is not None:  # new ex, d; the weight is solved below (the original stays best
        with torch.no_grad():  # candidate, so the layer still never gets worse)
            layer.ex.copy_(restart[0])
            layer.d.copy_(restart[1])
    # a row-separable "batch" layer stays so (its sequences stay independent), a causal
    # "causal" layer stays causal
    ex_support, d_support = support_masks(layer) or (None, None)
    scale = max(float(layer.ex.detach().abs().mean()), 1e-6)
    diverged = False
    for _ in range(max(steps, 1)):
        with torch.no_grad():
            ex, d = layer.ex.detach().double(), layer.d.detach().double()
            xh = data.encoded(ex, t)
            wh = _solve_weight(xh, d, data, ridge)
            if not bool(torch.isfinite(wh).all()):  # identical on every rank (all-reduced)
                diverged = True
                break
            layer.weight_encoded.copy_(wh)
            err = _rel_error(layer, data)
            if err < best[0]:
                best = (err, [p.detach().clone() for p in params])
            if steps > 0:
                new_d = _solve_decoder(xh, wh, data, t, ridge, d_support)
                if not bool(torch.isfinite(new_d).all()):
                    diverged = True
                    break
                layer.d.copy_(new_d)
        bar.update(1, layer=name, error=best[0])
        if steps > 0:
            _refine_encoder(layer, data, iters=20, lr=0.01 * scale, support=ex_support)
    with torch.no_grad():
        err = _rel_error(layer, data)
        if not err < best[0]:  # also a NaN iterate: never kept
            for p, v in zip(params, best[1]):
                p.copy_(v)
            err = best[0]
    bar.close()
    if diverged or not math.isfinite(err):
        warnings.warn(f"calibrate: layer {name!r}: a least-squares solve gave NaN or Inf; kept "
                      f"its best finite parameters (relative error {err:.4g}). Check the "
                      f"calibration data's scale, or calibrate with steps=0", stacklevel=3)
    return before, err


def _check_ridge(ridge: object) -> None:
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge >= 0 \
            or not math.isfinite(ridge):
        raise ValueError(f"ridge must be a finite number >= 0 (relative Tikhonov weight; "
                         f"default {DEFAULT_RIDGE}), got {ridge!r}")


def calibrate(module: nn.Module, batches: Iterable[object], *, steps: int = 4,
              teacher: nn.Module | None = None, target: str = "layer",
              basis: str = "converted", seed: int = 0, shard: str = "batches",
              progress: bool = True, ridge: float = DEFAULT_RIDGE) -> CalibrationTable:
    """Fit every STL layer of ``module`` to the dense layer it replaced, on real inputs.

    Layers are calibrated one at a time in forward order, each on the inputs it receives
    from the already-calibrated layers before it. For each layer: the encoded weight is the
    closed-form least-squares solution given ``ex`` and ``d`` (Lemma A.1); then ``steps``
    rounds refine ``d`` (least squares), ``ex`` (Adam steps) and re-solve the weight. The
    best iterate is kept, so a layer's error on its calibration data never increases (an
    iterate with NaN or Inf is never kept: the layer keeps its best finite parameters, with a
    warning). A ``row_grouping="batch"`` layer whose basis is row-separable stays so (each
    term's ``ex`` / ``d`` change only within its tile row, :func:`support_masks`), so the
    sequences batched into a tile stay independent; a ``row_grouping="causal"`` layer whose
    basis is causal stays causal (each term reads only rows up to its pivot, the first row it
    writes, and writes only rows from it), so no token's output depends on a later token.

    Inside a torch.distributed job every rank calls ``calibrate`` with the same arguments;
    rank 0's parameters are broadcast, each rank runs its share of the batches (``shard``)
    and every sum over the data is all-reduced, so all ranks compute the same fit: the
    single-process fit on the union of the ranks' batches.

    Args:
        module: a converted model holding :class:`~stl_compiler.STLLinear` layers (changed in
            place; its ``training`` flag is left as it was).
        batches: calibration inputs, each a tensor, a tuple of args or a dict of kwargs for
            ``module``; iterated once per layer (a list is converted once), and the inputs of
            a layer are held in memory while it is fitted.
        steps: refinement rounds per layer (0: only the closed-form encoded weight).
        teacher: the dense model; the target of layer ``name`` is ``teacher.<name>``, an
            ``nn.Linear``. Without it each layer needs its ``reference_weight`` buffer
            (``from_linear(..., keep_reference=True)``).
        target: what layer ``name`` is fitted to. ``"layer"``: the dense layer applied to the
            layer's own (student) inputs. ``"teacher"`` (needs ``teacher``): the output of
            ``teacher.<name>`` in the teacher's own forward pass on the same batch, so each
            layer also compensates the error of the calibrated layers before it. The table's
            errors are then relative to that target.
        basis: ``"converted"``: start from the layer's own ``ex`` / ``d``. ``"row_separable"``:
            restart every layer from :func:`row_separable_basis` (rank a multiple of the
            tile), made for ``row_grouping="batch"``, where the rows of a tile are unrelated
            sequences and a general basis's cross-row terms are pure noise; the layer as
            converted stays the best candidate until an iterate beats it. Row-separable
            bases are causal, so ``row_grouping="causal"`` layers may restart from it too
            (their refinement may then add terms that read earlier rows or write later
            ones, within :func:`support_masks`).
        seed: seeds the random vectors of ``basis="row_separable"``.
        shard: with a process group, how ranks share the batches: ``"batches"`` (every rank
            passes the same batches and takes every world-size-th one whole), ``"rows"`` (each
            takes an equal slice of dim 0 of every batch; with ``row_grouping="batch"`` a slice
            that is not a multiple of the tile changes which sequences share a tile) or
            ``"local"`` (the batches are already this rank's own). Ignored in one process.
        progress: show a progress bar per layer on stderr (rank 0 only).
        ridge: Tikhonov regularization of the least-squares solves (encoded weight and
            decoder), relative to the mean diagonal of each Gram matrix. The default 1e-4
            keeps the encoded weight bounded where a layer's inputs are nearly degenerate,
            which a bf16 / fp16 deployment needs (large weights that cancel in fp32 do not
            in bf16); 0 is the plain least-squares fit (singular inputs then fail).

    Returns:
        A :class:`CalibrationTable` of relative output errors before/after, per layer (over
        every rank's data; the same table on every rank).

    Raises:
        ValueError: a batch (or a layer's captured input or target) holds NaN or Inf, or
            ``module`` is the output of ``stl_compile``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    check_not_compiled(module, "calibrate")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    _check_ridge(ridge)
    if basis not in BASES:
        raise ValueError(f"basis must be one of {BASES}, got {basis!r}")
    if target == "teacher" and teacher is None:
        raise ValueError("target='teacher' fits each layer to the teacher's activations: pass "
                         "teacher=<the dense model>")
    layers = [(n, m) for n, m in module.named_modules() if isinstance(m, STLLinear)]
    if not layers:
        raise ValueError("module has no STLLinear layer to calibrate; convert it first "
                         "(stl_compiler.swap_linears_)")
    if any(dist_.is_sharded(p) for _, m in layers for p in m.parameters()):
        raise ValueError("calibrate needs every STL layer unsharded on every rank (it "
                         "all-reduces the statistics, not the parameters): calibrate before "
                         "fully_shard, then shard the student for distill")
    if basis == "row_separable":
        bad = sorted({(m.tile, m.rank) for _, m in layers if m.rank % m.tile})
        if bad:
            raise ValueError(f"basis='row_separable' needs every layer's rank to be a "
                             f"multiple of its tile; got (tile, rank) {bad}")
    generator = torch.Generator().manual_seed(seed)
    refs = {name: _reference(name, layer, teacher) for name, layer in layers}
    batches = list(batches)
    where = "" if dist_.world()[1] == 1 or shard != "local" else " of this rank"
    dist_.raise_if_any(_first_nonfinite_batch(batches, where))
    batches = dist_.local_batches(batches, shard)
    dist_.check_every_rank_has(batches, shard, "calibration")
    dist_.broadcast_module(module)
    main = dist_.is_main()
    rows = []
    was_training = module.training
    teacher_training = None if teacher is None else teacher.training
    module.eval()
    if teacher is not None:
        teacher.eval()
    try:
        for name, layer in _forward_order(module, layers, batches):
            inputs = _capture(module, layer, batches)
            calls = int(dist_.all_reduce_sum(torch.tensor(float(len(inputs)),
                                                          device=layer.ex.device)))
            if not calls:  # e.g. a branch the calibration batches never take
                rows.append({"layer": name, "rank": layer.rank, "error_before": None,
                             "error_after": None})
                continue
            targets = None
            if target == "teacher":
                targets = _capture(teacher, teacher.get_submodule(name), batches, output=True)
            error = (_nonfinite(inputs, f"layer {name!r}: its input", "batch") or
                     _nonfinite(targets or [], f"layer {name!r}: its teacher target", "batch"))
            dist_.raise_if_any(error and f"{error}, although the batches are finite: the model "
                                         f"overflows on them (check their scale and dtype)")
            restart = None
            if basis == "row_separable":
                restart = row_separable_basis(layer.tile, layer.rank, generator)
            if targets is None:
                targets = _dense_targets(inputs, *refs[name])
            before, after = calibrate_layer(layer, inputs, targets, steps, name=name,
                                            restart=restart, progress=progress and main,
                                            ridge=ridge)
            rows.append({"layer": name, "rank": layer.rank, "error_before": before,
                         "error_after": after})
    finally:
        module.train(was_training)
        if teacher is not None:
            teacher.train(teacher_training)
    return CalibrationTable(rows)


def _capture(module: nn.Module, layer: nn.Module, batches: list, output: bool = False
             ) -> list[Tensor]:
    """The inputs (or outputs) of ``layer`` while ``module`` runs every batch."""
    inputs: list[Tensor] = []
    hook = layer.register_forward_hook(
        lambda _m, args, out: inputs.append((out if output else args[0]).detach()))
    try:
        with torch.no_grad():
            for batch in batches:
                run_batch(module, batch)
    finally:
        hook.remove()
    return inputs


def _forward_order(module: nn.Module, layers: list[tuple[str, STLLinear]], batches: list
                   ) -> list[tuple[str, STLLinear]]:
    """Layers in the order the first batch calls them (unused layers last, in module order)."""
    order: list[str] = []
    names = {id(m): n for n, m in layers}
    hooks = [m.register_forward_pre_hook(
        lambda mod, _a: order.append(names[id(mod)]) if names[id(mod)] not in order else None)
        for _, m in layers]
    try:
        with torch.no_grad():
            run_batch(module, batches[0])
    finally:
        for h in hooks:
            h.remove()
    order = dist_.broadcast_object(order)  # every rank fits the layers in rank 0's order
    rank = {n: i for i, n in enumerate(order)}
    return sorted(layers, key=lambda nm: rank.get(nm[0], len(order)))
