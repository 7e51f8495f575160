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


def _causal_report(verdicts: list[str | None], causal_model: str | None = "a decoder",
                   row_grouping: str = "causal") -> STLReport:
    sites = [SiteRow(f"layers.{i}.mlp.a_long_projection_name", "linear", "aten.linear",
                     (4, 8), (8, 8), True, tile=4, rank=24, isolated=True, causal=verdict)
             for i, verdict in enumerate(verdicts)]
    return STLReport(sites=sites, row_grouping=row_grouping, row_grouping_auto=True,
                     causal_model=causal_model)


def test_summary_states_grouping_and_causality():
    cases = {
        "kept": (_causal_report(["kept", "kept"]), "causal: kept (the model is causal: a decoder"),
        "kept up to round-off": (_causal_report(["kept", "round-off"], row_grouping="tokens"),
                                 "causal: kept up to round-off"),
        "not kept": (_causal_report(["not kept"] * 5, row_grouping="tokens"),
                     "causal: NOT kept: the model is causal (a decoder) and 5 STL site(s)"),
        "not a causal model": (_causal_report([None], causal_model=None, row_grouping="tokens"),
                               "causal: not a causal model"),
    }
    for verdict, (report, line) in cases.items():
        text = str(report)
        flat = " ".join(text.split())
        assert report.causality == verdict
        assert line in flat, text
        assert "chosen for this model: row_grouping=None" in flat
        assert all(len(row) <= WIDTH for row in text.splitlines()), text
        assert ("STL, acausal" in flat) == (verdict == "not kept")
    # 'causal' grouping tiles consecutive positions, like 'tokens'
    assert "t consecutive positions of one sequence" in " ".join(str(cases["kept"][0]).split())
    assert '"causal": "not kept"' in cases["not kept"][0].to_json()
    assert '"causal_model": "a decoder"' in cases["kept"][0].to_json()


def test_compiled_report_of_a_non_causal_model_says_so():
    compiled = stl_compile(Deep().eval(), (torch.randn(2, 8, 128),), STLConfig(basis="random"),
                           backend="eager")
    report = compiled.stl_report
    assert report.row_grouping == "tokens" and report.row_grouping_auto
    assert report.causal_model is None and report.causality == "not a causal model"
    assert all(s.causal is None for s in report.sites)
    assert "causal: not a causal model" in " ".join(str(report).split())
