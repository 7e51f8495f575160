"""Distillation: fine-tune the STL parameters of a converted model to match the dense one."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import STLLinear
from ._progress import Progress
from .calibrate import run_batch

__all__ = ["distill", "LOSSES"]

LOSSES = ("kl", "mse")


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
    if kind == "mse":
        return F.mse_loss(student_out.float(), teacher_out.float())
    log_p = F.log_softmax(student_out.float() / temperature, dim=-1)
    log_q = F.log_softmax(teacher_out.float() / temperature, dim=-1)
    kl = F.kl_div(log_p.reshape(-1, log_p.shape[-1]), log_q.reshape(-1, log_q.shape[-1]),
                  log_target=True, reduction="batchmean")
    return kl * temperature**2


def distill(student: nn.Module, teacher: nn.Module, batches: Iterable[object], *,
            steps: int = 100, lr: float = 1e-3, loss: str = "kl", temperature: float = 1.0,
            progress: bool = True) -> list[float]:
    """Fine-tune the STL parameters of ``student`` to reproduce ``teacher``'s outputs.

    Trained: every :class:`~stl_compiler.STLLinear`'s ``weight_encoded`` (a free "fake
    encoding") and ``bias``, and its ``ex`` / ``d`` unless frozen (``train_basis=False``).
    Everything else in ``student`` stays fixed. Adam with a cosine-decayed learning rate.

    Args:
        student: the converted model (changed in place).
        teacher: the dense model; run under ``no_grad``.
        batches: inputs (tensor, tuple of args or dict of kwargs), cycled for ``steps`` steps.
        steps: optimizer steps.
        lr: peak learning rate.
        loss: ``"kl"`` (KL(teacher ‖ student) of the softmax over the last dim, for logits)
            or ``"mse"`` (for features).
        temperature: softmax temperature of ``"kl"`` (the loss is scaled by T²).
        progress: show a progress bar on stderr.

    Returns:
        The loss curve: the loss of every step.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not lr > 0 or not temperature > 0:
        raise ValueError(f"lr and temperature must be > 0, got lr={lr}, "
                         f"temperature={temperature}")
    for name, model in (("student", student), ("teacher", teacher)):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{name} must be an nn.Module, got {type(model).__name__}")
    params = [p for m in student.modules() if isinstance(m, STLLinear)
              for n, p in m.named_parameters(recurse=False)
              if n in ("weight_encoded", "bias") or p.requires_grad]
    if not params:
        raise ValueError("student has no STLLinear layer to distill; convert it first "
                         "(stl_compiler.swap_linears_)")
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty: distillation needs at least one input batch")
    trainable = {id(p) for p in params}
    frozen = [p for p in student.parameters() if id(p) not in trainable and p.requires_grad]
    flags = [p.requires_grad for p in params]
    for p in frozen:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr / 20)
    bar = Progress(steps, "distill", progress)
    curve: list[float] = []
    try:
        for batch in itertools.islice(itertools.cycle(batches), steps):
            with torch.no_grad():
                target = _output_tensor(run_batch(teacher, batch), "teacher")
            value = _loss(_output_tensor(run_batch(student, batch), "student"), target, loss,
                          temperature)
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            sched.step()
            curve.append(float(value.detach()))
            bar.update(1, loss=curve[-1])
    finally:
        bar.close()
        for p in frozen:
            p.requires_grad_(True)
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    return curve
