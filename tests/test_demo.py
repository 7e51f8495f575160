"""``make demo`` (stl_compiler.demo): it runs, prints its four sections in order, recovers the
accuracy the conversion loses, exports an ONNX model in parity with torch, and its speed table
reads the proof experiment's JSON when there is one and says so when there is not."""

from __future__ import annotations

import contextlib
import io
import json
import warnings

import pytest

pytest.importorskip("sklearn", reason="the demo's digits come with scikit-learn")

from stl_compiler import demo  # noqa: E402

#: Recovered accuracy within this many points of dense. Measured with the demo's recipe
#: (300 dense steps, calibrate steps=0 on 256 images, 30 distillation steps): seeds 0 / 1 / 2
#: dense 95.78 / 94.67 / 95.56 %, as converted 33.56 / 24.89 / 27.11 %, recovered 93.78 /
#: 93.56 / 95.33 % (gaps 2.0 / 1.1 / 0.2 points).
DENSE_MARGIN = 3.0
#: ONNX Runtime vs the torch STL module, float32 (measured 1e-5).
ONNX_TOL = 1e-4

SECTIONS = ("== 1. Convert", "== 2. Recover", "== 3. Compile, export to ONNX",
            "== 4. Speed")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One run of the whole demo for the module (about a minute), its stdout and numbers;
    section 4 is pointed at a missing JSON so the run does not depend on docs/results."""
    missing = tmp_path_factory.mktemp("demo") / "proof_encoder.json"
    out = io.StringIO()
    with contextlib.redirect_stdout(out), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        result = demo.run(seed=0, speed_json=[missing])
    return out.getvalue(), result, [str(w.message)[:200] for w in caught]


@pytest.mark.slow
def test_demo_prints_every_section_in_order(demo_run):
    text, _, caught = demo_run
    positions = [text.find(title) for title in SECTIONS]
    assert all(p >= 0 for p in positions), positions
    assert positions == sorted(positions)
    for expected in ("max_cost_ratio=None", "test accuracy as converted", "+ calibrate",
                     "recovered", "parity:", "Where STL is faster", "Where it is not"):
        assert expected in text
    assert caught == []                                    # no warning spam


@pytest.mark.slow
def test_demo_recovers_accuracy(demo_run):
    _, result, _ = demo_run
    assert result["dense"] > 90.0
    assert result["converted"] < result["dense"] - 20.0      # rank 24 as converted: it drops
    assert result["recovered"] >= result["converted"]
    assert result["recovered"] >= result["dense"] - DENSE_MARGIN


@pytest.mark.slow
def test_demo_onnx_parity(demo_run):
    pytest.importorskip("onnxruntime")
    _, result, _ = demo_run
    assert result["onnx_error"] is not None and result["onnx_error"] < ONNX_TOL


@pytest.mark.slow
def test_demo_falls_back_to_benchmarks_md_without_json(demo_run):
    text, result, _ = demo_run
    assert result["speed_table"].found is None
    assert "no proof_encoder.json found" in text
    assert "docs/benchmarks.md" in text and "NVIDIA H200" in text and "d710d6f" in text


def _proof_json(path, **changes):
    data = {"device": "NVIDIA H200", "date": "2026-12-04T10:00:00+00:00", "commit": "abc1234",
            "command": "python examples/proof_encoder.py", "corpus": {"name": "stdlib"},
            "config": {},
            "rows": [{"model": "dense", "stage": "trained", "masked_acc": 61.5, "loss": 1.25,
                      "wall_ms": 10.0, "gpu_ms": 9.5, "host_ms": 0.5,
                      "speedup_vs_dense": 1.0},
                     {"model": "stl r=24", "stage": "converted", "masked_acc": 20.0,
                      "loss": 3.5, "wall_ms": None, "gpu_ms": None, "host_ms": None,
                      "speedup_vs_dense": None},
                     {"model": "stl r=24", "stage": "distilled", "masked_acc": 61.0,
                      "loss": 1.27, "wall_ms": 6.25, "gpu_ms": 6.0, "host_ms": 0.25,
                      "speedup_vs_dense": 1.6},
                     {"model": "2:4", "stage": "distilled", "masked_acc": 55.0, "loss": 1.6,
                      "wall_ms": 9.0, "gpu_ms": 8.8, "host_ms": 0.2,
                      "speedup_vs_dense": 1.11}]}
    data.update(changes)
    path.write_text(json.dumps(data))
    return path


def test_speed_table_reads_the_json(tmp_path):
    path = _proof_json(tmp_path / "proof_encoder.json")
    table = demo.load_speed_table([tmp_path / "absent.json", path])
    assert table.found == path
    assert (table.device, table.commit) == ("NVIDIA H200", "abc1234")
    assert table.date.startswith("2026-12-04")
    assert [r[0] for r in table.rows] == ["dense", "stl r=24", "stl r=24", "2:4"]
    assert table.rows[2][-1] == "1.60" and table.rows[1][4] == "-"   # x dense; no timing
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        demo.speed_section([path])
    text = out.getvalue()
    assert str(path) in text and "abc1234" in text and "1.60" in text
    assert "no proof_encoder.json" not in text


def test_speed_table_without_json_says_so(tmp_path):
    table = demo.load_speed_table([tmp_path / "proof_encoder.json"])
    assert table.found is None
    assert "no proof_encoder.json found" in table.note and str(tmp_path) in table.note
    assert "docs/benchmarks.md" in table.note
    assert (table.device, table.date) == ("NVIDIA H200", "2026-12-03")
    assert len(table.rows) == 4 and all(len(r) == len(table.columns) for r in table.rows)


@pytest.mark.parametrize("content", ["{not json", json.dumps({"rows": []}),
                                     json.dumps({"rows": [{"stage": "x"}]})])
def test_speed_table_with_a_bad_json_falls_back(tmp_path, content):
    path = tmp_path / "proof_encoder.json"
    path.write_text(content)
    table = demo.load_speed_table([path])
    assert table.found is None
    assert "unreadable" in table.note and str(path) in table.note


def test_default_search_paths_include_package_data_and_repo():
    names = [p.as_posix() for p in demo.SPEED_JSON_PATHS]
    assert names[0].endswith("stl_compiler/data/proof_encoder.json")
    assert names[1].endswith("docs/results/proof_encoder.json")
