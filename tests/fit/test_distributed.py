"""calibrate / distill / checkpoints on torch.distributed: 2 CPU processes, gloo, loopback.

One 2-process job (module fixture) runs every distributed case and saves what each rank got;
the tests compare it with single-process runs of the same functions on the same global data.
"""

import copy
import socket
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn

import stl_compiler as stl
from stl_compiler.fit import (
    calibrate,
    distill,
    export_safetensors,
    load_checkpoint,
    save_checkpoint,
)

WORLD = 2
DISTILL = dict(steps=6, lr=3e-3, params="all", warmup=2, features=["0"], progress=False)


def _to_stl(model, rank, keep_reference=False):
    """Every nn.Linear child as an STLLinear (from_linear: no cost guard on these toys)."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            setattr(model, name, stl.STLLinear.from_linear(child, stl.bases.fitted(4, rank),
                                                           keep_reference=keep_reference))
    return model


def _pair():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    return teacher, _to_stl(copy.deepcopy(teacher), 16)


def _distill_batches():  # 8 rows: 4 per rank, whole row tiles (tile 4)
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(8, 16, generator=gen) for _ in range(3)]


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(24, 40), nn.Linear(40, 18)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _calib_model():
    torch.manual_seed(2)
    dense = Mlp()
    return dense, _to_stl(copy.deepcopy(dense), 24, keep_reference=True)


def _calib_batches():  # 3 batches: rank 0 takes 0 and 2, rank 1 takes 1 (shard="batches")
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(4, 7, 24, generator=gen) for _ in range(3)]


class Branches(nn.Module):
    """Batches of 4 rows go through ``a``, others through ``b``."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(24, 20), nn.Linear(24, 20)

    def forward(self, x):
        return self.a(x) if x.shape[0] == 4 else self.b(x)


def _branches():
    torch.manual_seed(4)
    model = _to_stl(Branches(), 24, keep_reference=True)
    gen = torch.Generator().manual_seed(5)
    return model, [torch.randn(4, 7, 24, generator=gen), torch.randn(6, 7, 24, generator=gen)]


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _error(fn):
    try:
        fn()
    except ValueError as err:
        return str(err)
    return None


def _job(rank, port, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        result = {}
        # DDP: rank 1 starts from a different student; distill broadcasts rank 0's
        teacher, student = _pair()
        if rank == 1:
            with torch.no_grad():
                for p in student.parameters():
                    p.add_(1.0)
        result["ddp_curve"] = distill(student, teacher, _distill_batches(), **DISTILL)
        result["ddp_state"] = _state(student)
        save_checkpoint(student, out / "dcp")
        export_safetensors(student, out / "ddp.safetensors")
        _, fresh = _pair()
        load_checkpoint(fresh, out / "dcp")
        result["dcp_loaded"] = _state(fresh)

        # FSDP2: every STL layer and the root sharded over the 2 ranks
        from torch.distributed.fsdp import fully_shard

        teacher, student = _pair()
        for layer in student:
            if isinstance(layer, stl.STLLinear):
                fully_shard(layer)
        fully_shard(student)
        result["fsdp_sharded"] = all(type(p).__name__ == "DTensor"
                                     for p in student.parameters())
        result["fsdp_curve"] = distill(student, teacher, _distill_batches(), **DISTILL)
        export_safetensors(student, out / "fsdp.safetensors")
        save_checkpoint(student, out / "fsdp_dcp")
        result["fsdp_calib_error"] = _error(lambda: calibrate(student, _distill_batches(),
                                                              progress=False))

        # calibrate: Gram statistics all-reduced over the ranks' batches
        _, model = _calib_model()
        table = calibrate(model, _calib_batches(), steps=1, progress=False)
        result["calib_rows"], result["calib_state"] = table.rows, _state(model)

        # shard="local": rank 0's batches only reach layer a, rank 1's only layer b
        model, batches = _branches()
        calibrate(model, [batches[rank]], steps=1, shard="local", progress=False)
        result["branches_state"] = _state(model)

        # bad input raises the same error on every rank (no rank left in a collective)
        _, model = _calib_model()
        mine = [torch.randn(4, 7, 24)]
        if rank == 1:
            mine[0][2, 3, 4] = float("nan")
        result["nan_error"] = _error(lambda: calibrate(model, mine, shard="local",
                                                       progress=False))
        # progress bars on rank 0 only
        module = sys.modules["stl_compiler.fit.distill"]
        bars = []
        real = module.Progress
        module.Progress = lambda total, desc, enabled: bars.append(enabled) or real(total, desc,
                                                                                    False)
        teacher, student = _pair()
        distill(student, teacher, _distill_batches(), steps=1, progress=True)
        module.Progress = real
        result["progress"] = bars
        result["rows_error"] = _error(lambda: distill(student, teacher, [torch.randn(5, 16)],
                                                      steps=1, progress=False))
        torch.save(result, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()



@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    with socket.socket() as sock:  # a free loopback port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # fork: the children inherit torch and stl_compiler already imported (spawn re-imports
    # them: 10-40 s on a loaded 2-core machine, against ~5 s for the whole job)
    context = mp.start_processes(_job, args=(port, out), nprocs=WORLD, join=False,
                                 start_method="fork")
    deadline = time.monotonic() + 180
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the 2-process job did not finish in 180 s")
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _single_distill():
    teacher, student = _pair()
    curve = distill(student, teacher, _distill_batches(), **DISTILL)
    return curve, _state(student)


def _assert_curve(curve, reference):
    torch.testing.assert_close(torch.tensor(curve), torch.tensor(reference), rtol=1e-5, atol=0)


def _assert_state(state, reference, rtol):
    assert state.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(state[key], reference[key], rtol=rtol, atol=rtol, msg=key)


def test_ddp_distill_matches_single_process_on_the_global_batches(ranks):
    _, results = ranks
    curve, state = _single_distill()
    for r in results:
        _assert_curve(r["ddp_curve"], curve)
        _assert_state(r["ddp_state"], state, rtol=1e-5)
    for key, value in results[0]["ddp_state"].items():  # identical across ranks
        assert torch.equal(value, results[1]["ddp_state"][key]), key
    assert results[0]["ddp_curve"] == results[1]["ddp_curve"]


def test_fsdp2_distill_matches_single_process(ranks):
    out, results = ranks
    assert all(r["fsdp_sharded"] for r in results)
    curve, state = _single_distill()
    for r in results:
        _assert_curve(r["fsdp_curve"], curve)
    _assert_state(load_file(out / "fsdp.safetensors"), state, rtol=1e-5)
    # the sharded DCP checkpoint loads in one process into an unsharded model
    _, model = _pair()
    load_checkpoint(model, out / "fsdp_dcp")
    _assert_state(_state(model), load_file(out / "fsdp.safetensors"), rtol=0)


def test_calibrate_distributed_equals_single_process_on_the_union(ranks):
    _, results = ranks
    _, model = _calib_model()
    table = calibrate(model, _calib_batches(), steps=1, progress=False)
    for r in results:
        _assert_state(r["calib_state"], _state(model), rtol=1e-6)
        for got, want in zip(r["calib_rows"], table.rows):
            assert got["layer"] == want["layer"]
            assert got["error_after"] == pytest.approx(want["error_after"], rel=1e-6)
            assert got["error_before"] == pytest.approx(want["error_before"], rel=1e-6)
    assert results[0]["calib_rows"] == results[1]["calib_rows"]


def test_calibrate_local_shards_with_a_layer_unused_on_one_rank(ranks):
    _, results = ranks
    model, batches = _branches()
    calibrate(model, batches, steps=1, progress=False)
    for r in results:
        _assert_state(r["branches_state"], _state(model), rtol=1e-6)


def test_checkpoint_round_trip_is_exact(ranks):
    out, results = ranks
    for r in results:
        _assert_state(r["dcp_loaded"], r["ddp_state"], rtol=0)
    exported = load_file(out / "ddp.safetensors")
    _assert_state(exported, results[0]["ddp_state"], rtol=0)
    _, model = _pair()  # and in one process, from both formats
    model.load_state_dict(exported)
    _assert_state(_state(model), exported, rtol=0)
    _, model = _pair()
    load_checkpoint(model, out / "dcp")
    _assert_state(_state(model), exported, rtol=0)


def test_bad_input_raises_on_every_rank(ranks):
    _, results = ranks
    for r in results:
        assert "rank 1: calibration batch 0 of this rank contains NaN" in r["nan_error"]
        assert "5 rows along dim 0, not divisible by the world size 2" in r["rows_error"]
        assert "calibrate before fully_shard" in r["fsdp_calib_error"]
    assert results[0]["progress"] == [True] and results[1]["progress"] == [False]


def test_checkpoint_round_trip_in_one_process(tmp_path):
    _, model = _pair()
    save_checkpoint(model, tmp_path / "ckpt")
    export_safetensors(model, tmp_path / "model.safetensors")
    _, other = _pair()
    with torch.no_grad():
        for p in other.parameters():
            p.normal_()
    load_checkpoint(other, tmp_path / "ckpt")
    _assert_state(_state(other), _state(model), rtol=0)
    _assert_state(load_file(tmp_path / "model.safetensors"), _state(model), rtol=0)
    with pytest.raises(FileNotFoundError, match="no DCP checkpoint"):
        load_checkpoint(other, tmp_path / "missing")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_checkpoint(other, tmp_path / "ckpt")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_safetensors(other, tmp_path / "model.safetensors")
    save_checkpoint(other, tmp_path / "ckpt", overwrite=True)
    export_safetensors(other, tmp_path / "model.safetensors", overwrite=True)
    load_checkpoint(model, tmp_path / "ckpt")
    _assert_state(_state(model), _state(other), rtol=0)
    _assert_state(load_file(tmp_path / "model.safetensors"), _state(other), rtol=0)
