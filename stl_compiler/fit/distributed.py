"""torch.distributed support of :func:`calibrate` and :func:`distill` (docs/distributed.md).

Both detect an initialized default process group with more than one rank; without one, every
helper here is the identity, so the single-process path runs exactly as before.

How batches are shared (``shard``):

- ``"rows"``: every rank passes the same global batches; rank ``r`` keeps rows
  ``[r·n/W, (r+1)·n/W)`` of dim 0 of every tensor in each batch (``n`` divisible by the world
  size ``W``). A step then sees the same global batch as a single-process run.
- ``"batches"``: every rank passes the same global batches; rank ``r`` keeps batches
  ``r, r+W, r+2W, ...`` whole (a batch is never cut, so tile rows keep their neighbours).
- ``"local"``: the batches are already this rank's own (e.g. from a ``DistributedSampler``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["SHARDS", "world", "is_main", "local_batches", "check_every_rank_has",
           "raise_if_any", "all_reduce_sum", "all_reduce_mean",
           "average_gradients", "broadcast_module", "broadcast_object", "is_sharded"]

SHARDS = ("rows", "batches", "local")


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on rank 0 (and in a single-process run): the rank that logs and writes files."""
    return world()[0] == 0


def _split_rows(batch: object, index: int, rank: int, size: int) -> object:
    """Rows ``[rank·n/size, (rank+1)·n/size)`` along dim 0 of every tensor of ``batch``."""
    tensors = [v for v in (batch.values() if isinstance(batch, dict) else
                           batch if isinstance(batch, (tuple, list)) else [batch])
               if isinstance(v, Tensor) and v.dim() > 0]
    rows = {v.shape[0] for v in tensors}
    if len(rows) != 1:
        raise ValueError(f"shard='rows' splits batch {index} along dim 0, but its tensors have "
                         f"{sorted(rows) or 'no'} leading sizes; give every tensor the batch "
                         f"size as dim 0, or use shard='batches' (whole batches per rank)")
    n = rows.pop()
    if n % size:
        raise ValueError(f"shard='rows': batch {index} has {n} rows along dim 0, not divisible "
                         f"by the world size {size}; use a batch size that is a multiple of "
                         f"{size}, or shard='batches' (whole batches per rank)")
    part = n // size

    def cut(v: object) -> object:
        if isinstance(v, Tensor) and v.dim() > 0:
            return v[rank * part:(rank + 1) * part]
        return v

    if isinstance(batch, dict):
        return {k: cut(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(cut(v) for v in batch)
    return cut(batch)


def local_batches(batches: Iterable[object], shard: str) -> list[object]:
    """This rank's share of ``batches`` (all of them without a process group)."""
    if shard not in SHARDS:
        raise ValueError(f"shard must be one of {SHARDS}, got {shard!r}")
    batches = list(batches)
    rank, size = world()
    if size == 1 or shard == "local":
        return batches
    if shard == "batches":
        return batches[rank::size]
    return [_split_rows(b, i, rank, size) for i, b in enumerate(batches)]


def _count_device() -> torch.device:
    """Where a small tensor for a collective must live (NCCL only reduces CUDA tensors)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_every_rank_has(batches: list, shard: str, what: str) -> None:
    """Raise the same error on every rank when any rank's share of the batches is empty."""
    count = len(batches)
    if world()[1] > 1:
        least = torch.tensor([count], device=_count_device())
        dist.all_reduce(least, op=dist.ReduceOp.MIN)
        count = int(least.item())
    if count:
        return
    if world()[1] == 1:
        raise ValueError(f"batches is empty: {what} needs at least one input batch")
    raise ValueError(f"some rank got no batch with shard={shard!r} ({world()[1]} ranks): pass "
                     f"at least one batch per rank (shard='batches' needs {world()[1]} or more "
                     f"batches, shard='local' a non-empty list on every rank)")


def raise_if_any(error: str | None) -> None:
    """Raise ``ValueError`` on every rank when any rank has an ``error`` (so no rank is left
    waiting in a collective the others never reach)."""
    rank, size = world()
    if size > 1:
        errors: list[str | None] = [None] * size
        dist.all_gather_object(errors, error)
        error = next((f"rank {i}: {e}" for i, e in enumerate(errors) if e), None)
    if error:
        raise ValueError(error)


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over ranks, in place; returned for chaining."""
    if world()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """Average ``tensor`` over ranks, in place."""
    size = world()[1]
    if size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(size)
    return tensor


def is_sharded(tensor: Tensor) -> bool:
    """A DTensor (FSDP2 / tensor parallel): its collectives belong to its own mesh."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def broadcast_module(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers (plain tensors; DTensors are sharded on purpose)
    to every rank, as DistributedDataParallel does when it wraps a model."""
    if world()[1] == 1:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if not is_sharded(tensor):
                dist.broadcast(tensor.data, src=0)


def broadcast_object(value: object) -> object:
    """Rank 0's ``value`` on every rank (a picklable object)."""
    if world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def average_gradients(params: list[Tensor]) -> None:
    """Average the gradients of plain (not DTensor) ``params`` over ranks with one all-reduce
    (a missing gradient counts as zero). FSDP2 reduces its DTensor gradients itself."""
    params = [p for p in params if not is_sharded(p)]
    if world()[1] == 1 or not params:
        return
    groups: dict[tuple, list[Tensor]] = {}
    for p in params:  # one all-reduce per dtype/device
        groups.setdefault((p.dtype, p.device), []).append(p)
    for group in groups.values():
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in group]
        flat = all_reduce_mean(torch.cat([g.reshape(-1) for g in grads]))
        for p, chunk in zip(group, flat.split([g.numel() for g in grads])):
            p.grad = chunk.view_as(p).clone()
