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
    stl.swap_linears_(student, stl.STLConfig(rank=16, min_dim=8, max_cost_ratio=None))
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
    stl.swap_linears_(student, stl.STLConfig(rank=16, min_dim=8, max_cost_ratio=None),
                      train_basis=False)
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
        stl.swap_linears_(student, stl.STLConfig(rank=16, min_dim=8, max_cost_ratio=None))
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
    with pytest.raises(ValueError, match="shard must be one of"):
        distill(student, teacher, batch, shard="ranks", progress=False)
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


def test_distill_names_both_shapes_when_output_widths_differ():
    teacher, student = _pair(6)
    wider = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 10))
    with pytest.raises(ValueError, match=r"student output shape \(4, 8\) differs from teacher "
                                         r"output shape \(4, 10\)"):
        distill(student, wider, [torch.randn(4, 16)], steps=1, progress=False)


def test_distill_refuses_a_compiled_student_and_a_ddp_wrapper():
    teacher, student = _pair(7)
    compiled = stl.stl_compile(student, (torch.randn(4, 16),), stl.STLConfig(rank=16),
                               backend="eager")
    with pytest.raises(ValueError, match="calibrate before stl_compile: swap_linears_"):
        distill(compiled, teacher, [torch.randn(4, 16)], steps=1, progress=False)
    with pytest.raises(TypeError, match="pass the plain student"):
        distill(nn.parallel.DistributedDataParallel.__new__(
            nn.parallel.DistributedDataParallel), teacher, [torch.randn(4, 16)], steps=1)


def test_distill_stops_on_a_non_finite_loss_before_stepping():
    teacher, student = _pair(8)
    state = {k: v.clone() for k, v in student.state_dict().items()}
    bad = torch.randn(4, 16)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="loss is not finite at step 0"):
        distill(student, teacher, [bad], steps=2, progress=False)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in state.items())


def test_distill_keeps_a_batch_grouped_layer_row_separable():
    """Adam on ex / d of a row-separable "batch" layer stays on each term's own tile row, so
    sequence 0's output stays independent of the 3 sequences sharing its tiles."""
    torch.manual_seed(7)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    student = copy.deepcopy(teacher)
    stl.swap_linears_(student, stl.STLConfig(rank=16, min_dim=8, row_grouping="batch",
                                             max_cost_ratio=None))
    start = [p.detach().clone() for p in student.parameters()]
    distill(student, teacher, [torch.randn(8, 5, 16) for _ in range(2)], steps=4, lr=1e-2,
            loss="mse", progress=False)
    layers = [m for m in student.modules() if isinstance(m, stl.STLLinear)]
    assert len(layers) == 2
    for layer in layers:
        assert stl.tiling.is_row_separable(layer) and layer.rows_isolated
    assert not all(torch.equal(a, b) for a, b in zip(start, student.parameters()))
    x = torch.randn(8, 5, 16)
    changed = x.clone()
    changed[1:4] = torch.randn(3, 5, 16) * 3
    with torch.no_grad():
        ref = student(x)[0]
        assert float((student(changed)[0] - ref).norm() / ref.norm()) < 1e-6


def test_distill_keeps_a_causal_layer_causal():
    """Adam on ex / d of a causal "causal" layer stays inside each term's pivot masks: no
    output position comes to depend on a later token (exactly, in float64)."""
    from stl_compiler.fit import fit_basis
    from stl_compiler.fit.alpha import token_moments
    from stl_compiler.fit.calibrate import support_masks

    torch.manual_seed(8)
    basis = fit_basis(4, 16, data=token_moments(4, 0.8), support="causal",
                      pivots=[0] * 7 + [1] * 3 + [2] * 3 + [3] * 3, restarts=1, steps=30)[0]
    teacher = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).double()
    student = copy.deepcopy(teacher)
    stl.swap_linears_(student, stl.STLConfig(rank=16, basis=basis, min_dim=8,
                                             row_grouping="causal", max_cost_ratio=None))
    student.double()
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(4, 9, 16, generator=gen, dtype=torch.float64) for _ in range(2)]

    def mse():
        with torch.no_grad():
            return sum(float((student(b) - teacher(b)).square().mean()) for b in data)

    before = mse()
    layers = [m for m in student.modules() if isinstance(m, stl.STLLinear)]
    assert len(layers) == 2
    start = [(m.ex.detach().clone(), m.d.detach().clone()) for m in layers]
    masks = [support_masks(m) for m in layers]
    distill(student, teacher, data, steps=20, lr=1e-2, loss="mse", progress=False)
    assert mse() < 0.8 * before
    for layer, (ex, d), (ex_mask, d_mask) in zip(layers, start, masks):
        assert stl.tiling.is_causal(layer, tol=0.0) and layer.keeps_causality
        # ex and d did train, inside their masks: the entries outside stayed exactly zero
        assert not torch.equal(layer.ex, ex) and not torch.equal(layer.d, d)
        assert torch.all(layer.ex[~ex_mask] == 0) and torch.all(layer.d[~d_mask] == 0)
        assert torch.all(ex[~ex_mask] == 0) and torch.all(d[~d_mask] == 0)
    x = torch.randn(2, 11, 16, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        ref = student(x)
        for j in range(1, 11):
            changed = x.clone()
            changed[:, j] += 3 * torch.randn(2, 16, generator=gen, dtype=torch.float64)
            assert torch.equal(student(changed)[:, :j], ref[:, :j])
            assert not torch.equal(student(changed)[:, j], ref[:, j])


def test_distill_under_bf16_autocast_lowers_the_loss_and_keeps_float32_parameters():
    """autocast=torch.bfloat16: one autocast region per step, so the optimizer's updates reach
    the next step's bf16 weights (a region spanning the loop would reuse stale cached copies).
    The student improves as measured in float32, its parameters stay float32, and the curve
    follows the float32 run closely."""
    teacher, student = _pair(1)
    twin = copy.deepcopy(student)
    batches = [torch.randn(32, 16) for _ in range(4)]
    before = _loss(student, teacher, batches)
    curve = distill(student, teacher, batches, steps=60, lr=3e-3, autocast=torch.bfloat16,
                    progress=False)
    reference = distill(twin, teacher, batches, steps=60, lr=3e-3, progress=False)
    assert all(p.dtype == torch.float32 for p in student.parameters())
    after = _loss(student, teacher, batches)
    assert after < 0.7 * before
    assert after < 2.0 * _loss(twin, teacher, batches) + 1e-3
    assert sum(curve[-4:]) < 0.7 * sum(curve[:4])
    assert abs(sum(curve[:4]) - sum(reference[:4])) < 0.1 * sum(reference[:4])
    assert curve[0] != reference[0]  # the forwards did run in bf16
