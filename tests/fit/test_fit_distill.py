import copy

import pytest
import torch
from torch import nn

import stl_compiler as stl
from stl_compiler.fit import distill


def _pair(seed):
    torch.manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    student = copy.deepcopy(teacher)
    stl.swap_linears_(student, stl.STLConfig(rank=16, min_dim=8))
    return teacher, student


def _loss(student, teacher, batches):
    with torch.no_grad():
        return sum(float(nn.functional.kl_div(student(b).log_softmax(-1),
                                              teacher(b).log_softmax(-1), log_target=True,
                                              reduction="batchmean")) for b in batches)


@pytest.mark.parametrize("loss", ["kl", "mse"])
def test_distill_lowers_the_distillation_loss(loss):
    teacher, student = _pair(0)
    batches = [torch.randn(32, 16) for _ in range(4)]
    before = _loss(student, teacher, batches)
    first = [p.detach().clone() for p in teacher.parameters()]
    curve = distill(student, teacher, batches, steps=60, lr=3e-3, loss=loss, progress=False)
    assert len(curve) == 60
    assert sum(curve[-4:]) < sum(curve[:4])
    assert _loss(student, teacher, batches) < before
    assert all(torch.equal(a, b) for a, b in zip(first, teacher.parameters()))


def test_distill_respects_a_frozen_basis_and_rejects_bad_input():
    teacher, _ = _pair(1)
    student = copy.deepcopy(teacher)
    stl.swap_linears_(student, stl.STLConfig(rank=16, min_dim=8), train_basis=False)
    ex = student[0].ex.detach().clone()
    distill(student, teacher, [torch.randn(8, 16)], steps=3, progress=False)
    assert torch.equal(ex, student[0].ex) and not student[0].ex.requires_grad
    with pytest.raises(ValueError, match="loss"):
        distill(student, teacher, [torch.randn(8, 16)], loss="l1")
    with pytest.raises(ValueError, match="no STLLinear"):
        distill(teacher, teacher, [torch.randn(8, 16)], steps=1)
