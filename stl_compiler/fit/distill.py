"""Distillation: fine-tune a converted model (its STL parameters, or all of them) to match the
dense one, in one process or on every rank of a torch.distributed job (docs/distributed.md)."""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import STLLinear
from . import distributed as dist_
from ._progress import Progress
from .calibrate import check_not_compiled, run_batch, support_masks

__all__ = ["distill", "LOSSES", "PARAMS"]

LOSSES = ("kl", "mse")
PARAMS = ("stl", "all")


def _output_tensor(out: object, who: str) -> Tensor:
    """The logits / features of a model output: a tensor, ``.logits``, or the first item."""
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"{who} returned {type(out).__name__}; distill needs a tensor, an object "
                    f"with .logits, or a tuple whose first item is a tensor")


def _loss(student_out: Tensor, teacher_out: Tensor, kind: str, temperature: float) -> Tensor:
    if student_out.shape != teacher_out.shape:
        raise ValueError(f"student output shape {tuple(student_out.shape)} differs from teacher "
                         f"output shape {tuple(teacher_out.shape)}; the student must be the "
                         f"teacher converted by swap_linears_ (same output width)")
    if kind == "mse":
        return F.mse_loss(student_out.float(), teacher_out.float())
    log_p = F.log_softmax(student_out.float() / temperature, dim=-1)
    log_q = F.log_softmax(teacher_out.float() / temperature, dim=-1)
    kl = F.kl_div(log_p.reshape(-1, log_p.shape[-1]), log_q.reshape(-1, log_q.shape[-1]),
                  log_target=True, reduction="batchmean")
    return kl * temperature**2


def _support_masks(student: nn.Module, trained: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """``(parameter, mask)`` for the trained ``ex`` / ``d`` of every batch-grouped,
    row-separable layer and every causal-grouped, causal layer: gradients outside the mask
    are zeroed so that the layer stays row-separable, or causal
    (:func:`~stl_compiler.fit.calibrate.support_masks`). A sharded (DTensor) parameter gets
    its mask sharded the same way."""
    ids = {id(p) for p in trained}
    masks = []
    for layer in student.modules():
        if not isinstance(layer, STLLinear):
            continue
        support = support_masks(layer)
        if support is None:
            continue
        for p, mask in zip((layer.ex, layer.d), support):
            if id(p) in ids:
                if dist_.is_sharded(p):
                    from torch.distributed.tensor import distribute_tensor

                    mask = distribute_tensor(mask, p.device_mesh, p.placements)
                masks.append((p, mask))
    return masks


def distill(student: nn.Module, teacher: nn.Module, batches: Iterable[object], *,
            steps: int = 100, lr: float = 1e-3, loss: str = "kl", temperature: float = 1.0,
            params: str = "stl", warmup: int = 0, features: Sequence[str] = (),
            feature_weight: float = 1.0, shard: str = "rows",
            autocast: torch.dtype | None = None, progress: bool = True) -> list[float]:
    """Fine-tune ``student`` to reproduce ``teacher``'s outputs.

    Trained: every :class:`~stl_compiler.STLLinear`'s ``weight_encoded`` (a free "fake
    encoding") and ``bias``, and its ``ex`` / ``d`` unless frozen (``train_basis=False``;
    a ``row_grouping="batch"`` layer with a row-separable basis keeps it row-separable: each
    term's ``ex`` / ``d`` change only within its own tile row, so batched sequences stay
    independent; a ``row_grouping="causal"`` layer with a causal basis stays causal: each
    term keeps reading only rows up to its pivot, the first row it writes, and writing only
    rows from it, so no token's output comes to depend on a later token);
    with ``params="all"`` also every other parameter of ``student`` that has
    ``requires_grad=True``. Adam; the learning rate rises linearly over ``warmup`` steps, then
    decays with a cosine to ``lr / 20``.

    Inside a torch.distributed job (an initialized process group with several ranks) every
    rank calls ``distill`` with the same arguments: rank 0's student parameters are broadcast,
    each rank runs its share of every batch (``shard``), gradients are averaged over ranks
    (one all-reduce per step; a student sharded with FSDP2 ``fully_shard`` reduces its own),
    and every rank returns the same loss curve: with ``shard="rows"`` the curve and the
    parameters match a single-process run on the same batches (docs/distributed.md).

    Args:
        student: the converted model (changed in place).
        teacher: the dense model; run under ``no_grad``.
        batches: inputs (tensor, tuple of args or dict of kwargs), cycled for ``steps`` steps.
        steps: optimizer steps.
        lr: peak learning rate.
        loss: ``"kl"`` (KL(teacher ‖ student) of the softmax over the last dim, for logits)
            or ``"mse"`` (for features).
        temperature: softmax temperature of ``"kl"`` (the loss is scaled by T²).
        params: ``"stl"``: only the STL layers' parameters (everything else stays fixed).
            ``"all"``: also the rest of the model (norms, embeddings, dense layers), which
            can compensate the STL layers' error (on the character LM of docs/quality.md
            at rank 24 it needed, and tolerated, a ~50x larger ``lr`` than ``"stl"``).
        warmup: linear learning-rate warmup steps (0 <= warmup < steps).
        features: names of submodules (present in both models, e.g. the transformer blocks)
            whose outputs are matched too: ``feature_weight`` × the MSE between student and
            teacher output, divided by the teacher output's mean square, is added per module
            (and per call). On the character LM of docs/quality.md it lowered the distilled
            perplexity by 0.2-0.4 at ranks 24-40.
        feature_weight: weight of each feature term (> 0).
        shard: with a process group, how ranks share the batches: ``"rows"`` (every rank
            passes the same batches, each takes an equal slice of dim 0: a step sees the whole
            global batch), ``"batches"`` (each rank takes every world-size-th batch whole) or
            ``"local"`` (the batches are already this rank's own). Ignored in one process.
        autocast: run both forwards under ``torch.autocast(dtype=autocast)`` (e.g.
            ``torch.bfloat16``, the precision of deployment), one autocast region per step and
            backward outside it. Do not wrap ``distill`` in ``torch.autocast`` yourself: the
            region's cached low-precision copies of the weights would outlive the optimizer's
            updates, and training would follow stale weights.
        progress: show a progress bar on stderr (rank 0 only).

    Returns:
        The loss curve: the loss of every step (averaged over ranks).
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if params not in PARAMS:
        raise ValueError(f"params must be one of {PARAMS}, got {params!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or not 0 <= warmup < steps:
        raise ValueError(f"warmup must be an int with 0 <= warmup < steps ({steps}), got "
                         f"{warmup!r}")
    if isinstance(features, str):
        raise TypeError(f"features must be a sequence of submodule names, got the string "
                        f"{features!r} (use [{features!r}])")
    features = list(features)
    if features and not feature_weight > 0:
        raise ValueError(f"feature_weight must be > 0, got {feature_weight}")
    if not lr > 0 or not temperature > 0:
        raise ValueError(f"lr and temperature must be > 0, got lr={lr}, "
                         f"temperature={temperature}")
    for name, model in (("student", student), ("teacher", teacher)):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{name} must be an nn.Module, got {type(model).__name__}")
    check_not_compiled(student, "distill")
    if isinstance(student, nn.parallel.DistributedDataParallel):
        raise TypeError("distill averages gradients over ranks itself: pass the plain student "
                        "(student.module), not a DistributedDataParallel wrapper")
    trained = [p for m in student.modules() if isinstance(m, STLLinear)
               for n, p in m.named_parameters(recurse=False)
               if n in ("weight_encoded", "bias") or p.requires_grad]
    if not trained:
        raise ValueError("student has no STLLinear layer to distill; convert it first "
                         "(stl_compiler.swap_linears_)")
    if params == "all":
        ids = {id(p) for p in trained}
        trained += [p for p in student.parameters() if p.requires_grad and id(p) not in ids]
    batches = dist_.local_batches(batches, shard)
    dist_.check_every_rank_has(batches, shard, "distillation")
    modules = {}
    for name in features:
        for who, model in (("student", student), ("teacher", teacher)):
            try:
                modules[who, name] = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"features: {who} has no submodule {name!r}") from None
    trainable = {id(p) for p in trained}
    frozen = [p for p in student.parameters() if id(p) not in trainable and p.requires_grad]
    flags = [p.requires_grad for p in trained]
    for p in frozen:
        p.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    dist_.broadcast_module(student)
    row_masks = _support_masks(student, trained)
    precision = (contextlib.nullcontext if autocast is None else functools.partial(
        torch.autocast, trained[0].device.type, dtype=autocast))
    opt = torch.optim.Adam(trained, lr=lr)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / (steps - warmup)
        return 0.05 + 0.475 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    bar = Progress(steps, "distill", progress and dist_.is_main())
    curve: list[float] = []
    seen: dict[str, list[Tensor]] = {"student": [], "teacher": []}
    hooks = [module.register_forward_hook(
        lambda _m, _a, out, who=who, name=name: seen[who].append(
            _output_tensor(out, f"{who} submodule {name!r}")))
        for (who, name), module in modules.items()]
    try:
        for step, batch in enumerate(itertools.islice(itertools.cycle(batches), steps)):
            seen["student"].clear()
            seen["teacher"].clear()
            with precision():
                with torch.no_grad():
                    target = _output_tensor(run_batch(teacher, batch), "teacher")
                value = _loss(_output_tensor(run_batch(student, batch), "student"), target,
                              loss, temperature)
            if features:
                if len(seen["student"]) != len(seen["teacher"]):
                    raise ValueError(f"features: the student called them "
                                     f"{len(seen['student'])} times, the teacher "
                                     f"{len(seen['teacher'])} times")
            if seen["teacher"]:  # every rank runs the same modules: the same count
                # the teacher's mean square over the global batch (all ranks), so that
                # sharded steps add up to the single-process loss
                scale = dist_.all_reduce_mean(torch.stack(
                    [b.float().square().mean() for b in seen["teacher"]]))
                value = value + feature_weight * sum(
                    F.mse_loss(a.float(), b.float()) / s.clamp_min(1e-12)
                    for a, b, s in zip(seen["student"], seen["teacher"], scale))
            opt.zero_grad(set_to_none=True)
            value.backward()
            dist_.average_gradients(trained)
            curve.append(float(dist_.all_reduce_mean(value.detach().clone())))
            if not math.isfinite(curve[-1]):
                raise ValueError(f"distill: the loss is not finite at step {step} (batch "
                                 f"{step % len(batches)} of this rank); the parameters keep "
                                 f"their values from before this step. Check that batch for "
                                 f"NaN/Inf, or lower lr (now {lr})")
            for p, mask in row_masks:  # a zero gradient from the start: Adam never moves it
                if p.grad is not None:
                    p.grad.masked_fill_(~mask, 0.0)
            opt.step()
            sched.step()
            bar.update(1, loss=curve[-1])
    finally:
        bar.close()
        for hook in hooks:
            hook.remove()
        for p in frozen:
            p.requires_grad_(True)
        for p, flag in zip(trained, flags):
            p.requires_grad_(flag)
    return curve
