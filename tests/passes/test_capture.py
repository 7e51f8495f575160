"""capture: dynamic dims admit size 1 (only guards that every size >= 2 meets are dropped),
explicit Dim(min=1) specs capture, torch's own warnings stay out of the user's output."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.export import Dim

from stl_compiler.capture import capture, input_specs


class BatchFastPath(nn.Module):
    """Branches like transformers' masking code: ``if batch != 1`` on a broadcastable input."""

    def forward(self, x):
        pos = torch.arange(x.shape[1]).unsqueeze(0).to(x.dtype)
        if x.shape[0] != 1:
            pos = pos.expand(x.shape[0], -1)
        return x + pos


class LongSequencePath(nn.Module):
    """A real shape condition: the graph is only right for sequences longer than 4."""

    def forward(self, x):
        return x * 2 if x.shape[1] > 4 else x


def test_batch_one_runs_where_the_model_only_excludes_size_one():
    gm = capture(BatchFastPath(), (torch.randn(2, 8),), {}, "auto")
    for shape in [(1, 8), (1, 1), (5, 3)]:
        x = torch.randn(shape)
        torch.testing.assert_close(gm(x), BatchFastPath()(x))


def test_other_guards_are_kept():
    gm = capture(LongSequencePath(), (torch.randn(2, 8),), {}, "auto")
    torch.testing.assert_close(gm(torch.ones(1, 5)), torch.full((1, 5), 2.0))
    with pytest.raises(AssertionError, match=r"x.size\(\)\[1\] >= 5"):
        gm(torch.ones(2, 3))


def test_explicit_min_1_dims_capture_and_keep_their_range():
    spec = ({0: Dim("batch", min=1, max=8), 1: Dim("seq", min=1, max=16)},)
    gm = capture(BatchFastPath(), (torch.randn(2, 8),), {}, spec)
    x = torch.randn(1, 1)
    torch.testing.assert_close(gm(x), BatchFastPath()(x))
    (spec_x,) = input_specs(gm)
    assert spec_x.dims[0][1] == 8 and spec_x.dims[1][1] == 16
    assert "dim 0 must be in 1..8" in spec_x.mismatch(torch.randn(9, 4))


_TORCH_INTERNAL = {"__name__": "torch._export._stl_test_internal"}
exec("import warnings\ndef chatter():\n    warnings.warn('internal tracing detail')",
     _TORCH_INTERNAL)


class Chatty(nn.Module):
    def forward(self, x):
        _TORCH_INTERNAL["chatter"]()  # a warning raised inside torch's own code
        # stacklevel=2 attributes it to torch.nn's module call: still the model's
        warnings.warn("the model's own warning", stacklevel=2)
        return x + 1


def test_torch_internal_warnings_are_hidden_and_the_models_shown():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        capture(Chatty(), (torch.randn(2, 4),), {}, "auto")
    messages = [str(w.message) for w in caught]
    assert "the model's own warning" in messages
    assert "internal tracing detail" not in messages
