"""Calibrate and distill a converted transformer on torch.distributed (DDP or FSDP2).

    torchrun --nproc_per_node 2 examples/distill_ddp.py            # CPU: gloo, GPUs: nccl
    torchrun --nproc_per_node 2 examples/distill_ddp.py --fsdp     # student sharded (FSDP2)
    python examples/distill_ddp.py                                 # one process, same result

Every rank builds the same dense teacher (a random 2-block transformer: the point here is the
distributed mechanics, not accuracy; see docs/quality.md for that) and the same global
batches. ``calibrate`` gives each rank whole batches and all-reduces its least-squares
statistics; ``distill`` gives each rank an equal slice of every batch and averages gradients,
so the loss curve is the single-process one. The distilled student is saved as a DCP checkpoint
(every rank writes its shard) and as one safetensors file (rank 0). See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch
import torch.distributed as dist
from _common import Block
from torch import nn

import stl_compiler as stl
from stl_compiler.fit import calibrate, distill, export_safetensors, save_checkpoint


class Encoder(nn.Module):
    """Two pre-norm transformer blocks and a linear head."""

    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(Block(dim, 4, 2), Block(dim, 4, 2))
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


def setup() -> torch.device:
    """Join the torchrun job if there is one; the device of this rank."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else \
        torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if "RANK" in os.environ:  # started by torchrun
        dist.init_process_group("nccl" if cuda else "gloo")
    return device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--rank", type=int, default=24, help="STL tensor rank")
    parser.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--batches", type=int, default=4, help="distinct global batches")
    parser.add_argument("--steps", type=int, default=40, help="distillation steps")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--fsdp", action="store_true", help="shard the student with FSDP2")
    parser.add_argument("--out", default="distill_ddp_out", help="checkpoint directory")
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = setup()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

    torch.manual_seed(0)  # the same teacher, student and data on every rank
    teacher = Encoder(args.dim, 32).to(device).eval()
    student = copy.deepcopy(teacher)
    report = stl.swap_linears_(student, stl.STLConfig(rank=args.rank), keep_reference=True)
    batches = [torch.randn(args.batch, args.seq, args.dim, device=device)
               for _ in range(args.batches)]
    if rank == 0:
        converted = sum(v == "converted" for v in report.values())
        print(f"{world} process(es) on {device}; {converted} of {len(report)} linears in STL "
              f"(rank {args.rank})")

    start = time.perf_counter()
    table = calibrate(student, batches, teacher=teacher, steps=1, progress=False)
    if rank == 0:
        print(f"calibrated in {time.perf_counter() - start:.1f} s")
        print(table)

    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in student.blocks:
            fully_shard(block)
        fully_shard(student)
    start = time.perf_counter()
    curve = distill(student, teacher, batches, steps=args.steps, lr=args.lr, progress=False)
    if rank == 0:
        print(f"distilled {args.steps} steps in {time.perf_counter() - start:.1f} s: KL "
              f"{curve[0]:.6f} -> {curve[-1]:.6f}")
        print("loss every 5 steps:", " ".join(f"{v:.6f}" for v in curve[::5]))

    os.makedirs(args.out, exist_ok=True)
    save_checkpoint(student, os.path.join(args.out, "dcp"), overwrite=True)
    export_safetensors(student, os.path.join(args.out, "student.safetensors"), overwrite=True)
    if rank == 0:
        print(f"wrote {args.out}/dcp (DCP, one shard per rank) and "
              f"{args.out}/student.safetensors")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
