"""examples/_common.py: the device copy behind ``--bf16-cuda`` and the extra metrics of the
(A)/(B) tables (the same models, evaluated at the same moments, in the variants' order)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import _common  # noqa: E402  (the examples' helpers, imported as the examples do)

from stl_compiler.digits import DigitsViT, load, loss_fn  # noqa: E402


class Embedder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.proj = nn.Embedding(10, 8), nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed(ids)) * scale


def test_device_copy_casts_floats_moves_ids_and_returns_fp32():
    model = Embedder()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copy = _common.DeviceCopy(model, device="cpu", dtype=torch.bfloat16)
    ids, scale = torch.randint(10, (2, 5)), torch.rand(2, 5, 1)
    out = copy(ids, scale)
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    assert all(p.dtype == torch.bfloat16 for p in copy.inner.parameters())
    for key, value in model.state_dict().items():  # the user's model is not changed
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    with torch.no_grad():
        want = model.bfloat16()(ids, scale.bfloat16()).float()
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_extra_metrics_follow_the_variants():
    """Each extra metric sees the four models of a rank in VARIANTS order, at the moments
    the main metric sees them (here: a counter that records both calls)."""
    pytest.importorskip("sklearn")
    data = load()
    torch.manual_seed(0)
    init = DigitsViT()
    dense = DigitsViT()
    seen: list[tuple[str, int]] = []

    def metric(model: nn.Module) -> float:
        seen.append(("main", id(model)))
        return float(len(seen))

    def extra(model: nn.Module) -> float:
        seen.append(("extra", id(model)))
        return -float(len(seen))

    results = _common.compare_ranks([24], init, dense, "tokens", lambda: data.batches(0),
                                    loss_fn, 2, data.calibration(64), [data.images[:8]],
                                    metric, ".2f", extra_metrics={"bf16": extra})
    row = results[24]
    assert list(row["bf16"]) == list(_common.VARIANTS)
    assert [kind for kind, _ in seen] == ["extra", "main"] * 4
    for i, variant in enumerate(_common.VARIANTS):
        assert row[variant] == 2 * i + 2 and row["bf16"][variant] == -(2 * i + 1)
        assert seen[2 * i][1] == seen[2 * i + 1][1], "both metrics saw the same model"


def test_bf16_cuda_needs_a_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        _common.bf16_cuda(lambda model: 0.0)


def test_parallel_ranks_refused_on_a_cuda_machine(monkeypatch):
    """Forked rank workers die in their first backward on a CUDA machine: a clear error first."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit, match="one process per rank"):
        _common.compare_ranks([24, 32], DigitsViT(), DigitsViT(), "tokens", lambda: iter(()),
                              loss_fn, 1, [], [], lambda model: 0.0, ".2f", jobs=2)
