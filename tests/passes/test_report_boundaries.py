"""report_boundaries (the final pass): a ``not fused`` row for every decode → encode
boundary no fusion wrote a row for; the graph is unchanged."""

from __future__ import annotations

import torch
from pass_helpers import CONVERT_ALL, captured, run, targets
from torch import nn

from stl_compiler import STLConfig
from stl_compiler.passes import FUSIONS, LOWERING, PASSES, REPORTING, REWRITES
from stl_compiler.passes._encoded import DECODES, mark_reported
from stl_compiler.passes.fuse_decode_encode import fuse_decode_encode
from stl_compiler.passes.report_boundaries import report_boundaries


class MLP(nn.Module):
    """fc1 → GELU → fc2 → mean over tokens → head: fc1 → fc2 is a fusable boundary, fc2 →
    head is not (the mean mixes rows)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(32, 64), nn.Linear(64, 32), nn.Linear(32, 32)

    def forward(self, x):
        return self.head(self.fc2(torch.nn.functional.gelu(self.fc1(x))).mean(1, keepdim=True))


def _lowered(**config):
    torch.manual_seed(0)
    gm, ctx = captured(MLP(), torch.randn(2, 8, 32),
                       config=STLConfig(targets=("linear",), **CONVERT_ALL, **config))
    return run(gm, ctx, *REWRITES, *LOWERING), ctx


def test_is_the_last_pass():
    assert PASSES[-1] is report_boundaries and REPORTING == [report_boundaries]
    assert report_boundaries not in FUSIONS


def test_reports_every_unfused_boundary_and_keeps_the_graph():
    gm, ctx = _lowered()
    before = targets(gm)
    run(gm, ctx, report_boundaries)
    assert targets(gm) == before
    rows = [(b.producer, b.consumers, b.kind) for b in ctx.report.boundaries]
    assert rows == [("fc1", ["fc2"], "not fused"), ("fc2", ["head"], "not fused")]
    assert "gelu" in ctx.report.boundaries[0].reason
    assert "mean" in ctx.report.boundaries[1].reason


def test_skips_fused_and_marked_boundaries():
    gm, ctx = _lowered()
    run(gm, ctx, fuse_decode_encode)
    assert [(b.producer, b.kind) for b in ctx.report.boundaries] == [("fc1", "elementwise")]
    decodes = [n for n in gm.graph.nodes if n.target in DECODES]  # fc2's and head's
    assert len(decodes) == 2
    mark_reported(decodes[0])  # as a fusion does when it reports its own reason
    run(gm, ctx, report_boundaries)
    assert [(b.producer, b.kind) for b in ctx.report.boundaries] == [("fc1", "elementwise")]


def test_nothing_without_fuse():
    gm, ctx = _lowered(fuse=False)
    run(gm, ctx, *FUSIONS, report_boundaries)
    assert ctx.report.boundaries == []
