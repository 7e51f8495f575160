"""STLReport printing: fits a 100-column terminal, explains '-', counts the whole model."""

from __future__ import annotations

import torch
from torch import nn

from stl_compiler import STLConfig, stl_compile
from stl_compiler.report import WIDTH, BoundaryRow, SiteRow, STLReport


class Deep(nn.Module):
    """Module names far longer than a terminal column."""

    def __init__(self) -> None:
        super().__init__()
        inner = nn.ModuleDict({"a_rather_long_projection_name_inside_the_block":
                               nn.Linear(128, 128)})
        self.encoder_with_an_extremely_descriptive_and_long_module_name = nn.ModuleDict(
            {"layer_number_zero_of_the_encoder_stack": inner})
        self.tiny_classifier_head_that_stays_dense_because_it_is_small = nn.Linear(128, 3)

    def forward(self, x):
        block = self.encoder_with_an_extremely_descriptive_and_long_module_name[
            "layer_number_zero_of_the_encoder_stack"]
        h = block["a_rather_long_projection_name_inside_the_block"](x)
        return self.tiny_classifier_head_that_stays_dense_because_it_is_small(torch.relu(h))


def test_every_line_fits_100_columns_with_long_names():
    compiled = stl_compile(Deep().eval(), (torch.randn(2, 8, 128),), STLConfig(basis="random"),
                           backend="eager")
    report = compiled.stl_report
    report.boundaries.append(BoundaryRow("x" * 90, ["y" * 80, "z" * 70, "w", "v"], "not fused",
                                         "a reason that is itself long enough to need wrapping "
                                         "onto a second line of the boundary table " * 2))
    text = str(report)
    assert max(len(line) for line in text.splitlines()) <= WIDTH, text
    # long names are abbreviated in the middle, keeping both ends readable
    assert "encoder_with_a...nside_the_block" in text
    # a dense site's reason is printed in full (wrapped), never cut
    flat = " ".join(text.split())
    assert "too small: min(in, out)=3 < min_dim=16" in flat


def test_legend_explains_the_dash_and_columns():
    report = STLReport(sites=[SiteRow("a", "linear", "aten.linear", (8, 16), (16, 16), False,
                                      reason="filtered by filter_fn", dense_flops=4096)])
    text = " ".join(str(report).split())
    assert "legend: '-' = not applicable" in text and "rel.err = |STL - dense| / |dense|" in text
    assert "NOTHING WAS CONVERTED" in text and "max_cost_ratio" in text
    assert all(len(line) <= WIDTH for line in str(report).splitlines())


def test_headline_counts_converted_dense_and_preconverted_sites():
    sites = [
        SiteRow("new", "linear", "aten.linear", (4, 8), (8, 8), True, tile=4, rank=24,
                dense_flops=1000, stl_flops=600, dense_bytes=100, stl_bytes=300, isolated=True),
        SiteRow("old", "linear", "STLLinear (already converted)", (4, 8), (8, 8), True, tile=4,
                rank=16, dense_flops=2000, stl_flops=900, dense_bytes=200, stl_bytes=400,
                isolated=True, preconverted=True),
        SiteRow("kept", "matmul", "aten.matmul", (4, 8), (8, 8), False, reason="cost: ...",
                dense_flops=500, stl_flops=2000, dense_bytes=50, stl_bytes=500),
    ]
    report = STLReport(sites=sites, row_grouping="tokens")
    assert report.flops() == (3500, 600 + 900 + 500)
    assert report.bytes_moved() == (350, 300 + 400 + 50)
    text = " ".join(str(report).split())
    assert ("2 of 3 matmul sites converted (1 now, 1 already STL in the model); whole model's "
            "matmul FLOPs 3.50k -> 2.00k (0.571x), bytes moved 350B -> 750B (2.14x, unfused)") \
        in text
    assert "STL (already)" in text and "4.00x" in text  # the dense site's would-be cost
