"""Checkpoints of a converted (calibrated, distilled) model, distributed or not.

:func:`save_checkpoint` / :func:`load_checkpoint` use ``torch.distributed.checkpoint`` (DCP):
every rank writes and reads its own shards in parallel (an FSDP2 model is never gathered),
and DCP reshards on load (tested: saved by 2 FSDP2 ranks, loaded in one process).
:func:`export_safetensors` gathers the full state dict and writes one ``.safetensors`` file on
rank 0, for serving. STL parameters (``weight_encoded``, ``ex``, ``d``) are ordinary entries of
the state dict; load either format into a model converted with the same config
(``swap_linears_``) before ``stl_compile``.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from .distributed import broadcast_object, is_main, world

__all__ = ["save_checkpoint", "load_checkpoint", "export_safetensors"]


def _model_state(model: nn.Module, full: bool = False) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True) if full else None
    return get_model_state_dict(model, options=options)


@contextlib.contextmanager
def _quiet_dcp() -> Iterator[None]:
    """DCP warns on every save/load without a process group (one process is a supported use
    here) and on every overwrite (already decided by ``overwrite=``)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        warnings.filterwarnings("ignore", message="Detected an existing checkpoint")
        yield


def save_checkpoint(model: nn.Module, path: str | os.PathLike, overwrite: bool = False
                    ) -> None:
    """Save ``model``'s state dict as a DCP checkpoint directory ``path`` (collective: call it
    on every rank). An existing ``path`` raises ``FileExistsError`` unless ``overwrite``."""
    import torch.distributed.checkpoint as dcp

    path = os.fspath(path)
    if broadcast_object(os.path.exists(path)) and not overwrite:  # rank 0 decides for all
        raise FileExistsError(f"{path!r} already exists; pass overwrite=True to replace it")
    with _quiet_dcp():
        dcp.save({"model": _model_state(model)},
                 storage_writer=dcp.FileSystemWriter(path, overwrite=True))


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a :func:`save_checkpoint` directory into ``model`` in place (collective).

    ``model`` must have the same structure (same STL conversion: tile, rank); a missing or
    extra key raises."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    if not os.path.isdir(path):
        raise FileNotFoundError(f"no DCP checkpoint directory at {os.fspath(path)!r}")
    state = {"model": _model_state(model)}
    with _quiet_dcp():
        dcp.load(state, checkpoint_id=os.fspath(path))
    set_model_state_dict(model, state["model"])


def export_safetensors(model: nn.Module, path: str | os.PathLike, overwrite: bool = False
                       ) -> None:
    """Write ``model``'s full state dict (FSDP2 shards gathered) to one safetensors file on
    rank 0 (collective: call it on every rank). Load it with
    ``model.load_state_dict(safetensors.torch.load_file(path))``. An existing ``path`` raises
    ``FileExistsError`` unless ``overwrite``."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    if broadcast_object(os.path.exists(path)) and not overwrite:
        raise FileExistsError(f"{path!r} already exists; pass overwrite=True to replace it")
    state = _model_state(model, full=True)
    if is_main():
        # copies: safetensors refuses tensors that share storage (tied weights)
        save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()},
                  path, metadata={"format": "pt"})
    if world()[1] > 1:
        dist.barrier()  # the file exists on return, on every rank
