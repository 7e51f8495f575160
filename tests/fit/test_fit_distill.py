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


def test_distill_params_all_also_trains_the_dense_rest_and_keeps_frozen_ones():
    teacher, _ = _pair(2)
    batches = [torch.randn(32, 16) for _ in range(4)]
    results = {}
    for params in ("stl", "all"):
        student = copy.deepcopy(teacher)
        student.insert(1, nn.LayerNorm(32))
        teacher_ln = copy.deepcopy(student)
        stl.swap_linears_(student, stl.STLConfig(rank=16, min_dim=8))
        student[1].bias.requires_grad_(False)  # frozen by the user: stays frozen
        weight, bias = student[1].weight.detach().clone(), student[1].bias.detach().clone()
        curve = distill(student, teacher_ln, batches, steps=30, lr=3e-3, params=params,
                        warmup=5, progress=False)
        assert torch.equal(bias, student[1].bias) and not student[1].bias.requires_grad
        assert student[1].weight.requires_grad
        results[params] = (torch.equal(weight, student[1].weight), curve)
    assert results["stl"][0] and not results["all"][0]
    assert sum(results["all"][1][-4:]) < sum(results["all"][1][:4])


def test_distill_rejects_bad_params_and_warmup():
    teacher, student = _pair(3)
    batch = [torch.randn(8, 16)]
    with pytest.raises(ValueError, match="params must be one of"):
        distill(student, teacher, batch, params="dense", progress=False)
    for warmup in (-1, 10, 1.5):
        with pytest.raises(ValueError, match="warmup"):
            distill(student, teacher, batch, steps=10, warmup=warmup, progress=False)


def test_distill_features_match_the_named_submodule_outputs():
    batches = [torch.randn(32, 16, generator=torch.Generator().manual_seed(i))
               for i in range(4)]

    def hidden_error(features):
        teacher, student = _pair(4)
        distill(student, teacher, batches, steps=40, lr=3e-3, features=features,
                feature_weight=10.0, progress=False)
        with torch.no_grad():
            return sum(float((student[0](b) - teacher[0](b)).square().mean()) for b in batches)

    assert hidden_error(["0"]) < 0.8 * hidden_error([])
    teacher, student = _pair(5)
    batch = [torch.randn(8, 16)]
    with pytest.raises(ValueError, match="has no submodule 'blocks'"):
        distill(student, teacher, batch, steps=2, features=["blocks"], progress=False)
    with pytest.raises(TypeError, match="sequence of submodule names"):
        distill(student, teacher, batch, steps=2, features="0", progress=False)
    with pytest.raises(ValueError, match="feature_weight"):
        distill(student, teacher, batch, steps=2, features=["0"], feature_weight=0,
                progress=False)
