"""The benchmarks' CPU smoke modes run (the code path; their timings mean nothing on a CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, out: Path, *args: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--smoke",
                           "--out", str(out), *args],
                          env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


@pytest.mark.timeout(300)
def test_profile_kernels_smoke(tmp_path):
    _run("profile_kernels.py", tmp_path)
    result = json.loads((tmp_path / "profile_kernels.json").read_text())
    for column in ("dense", "stl"):
        assert result[column]["cpu_call_ms"] > 0
        assert "Self CPU" in (tmp_path / f"host_{column}.txt").read_text()


@pytest.mark.timeout(300)
def test_bench_model_smoke_builds_from_common(tmp_path):
    _run("bench_model.py", tmp_path, "--models", "dit", "--no-sparse")
    rows = json.loads((tmp_path / "model.json").read_text())["models"]["dit"]["rows"]
    assert any(r["method"].startswith("STL") and "error" not in r for r in rows), rows


@pytest.mark.timeout(300)
def test_bf16_drift_smoke(tmp_path):
    _run("bf16_drift.py", tmp_path)
    rows = json.loads((tmp_path / "bf16_drift.json").read_text())["rows"]
    columns = {(r["model"], r["column"]) for r in rows}
    assert ("llama", "stl causal (default)") in columns and ("bert", "stl fitted-bf16") in columns
    assert all(r["half_vs_fp32"] > 0 and r["drift_x_dense"] > 0 for r in rows)


@pytest.mark.timeout(300)
def test_generation_speed_smoke(tmp_path):
    """The speed step with grouped-query attention (--kv-heads) and one mode (--modes); the
    smoke mode picks the sizes."""
    _run("gpu_generation_check.py", tmp_path, "--skip", "exact", "rank24", "--kv-heads", "2",
         "--modes", "eager")
    report = json.loads((tmp_path / "gpu_generation.json").read_text())
    assert report["model"]["kv_heads"] == 2
    rows = {k: v for k, v in report["speed"].items() if k.startswith("batch")}
    assert rows and all(k.endswith("_eager") for k in rows), rows
    for row in rows.values():
        assert set(row) == {"dense", "stl_r24", "stl_over_dense"}, row
        assert row["stl_r24"]["tokens_per_s"] > 0 and row["stl_over_dense"] > 0


@pytest.mark.timeout(300)
def test_causal_lm_prefill_variants_smoke(tmp_path):
    """A variant column leaves the sites it names dense (the report says so)."""
    _run("bench_causal_lm.py", tmp_path, "--parts", "prefill", "--groupings", "causal",
         "--variants", "dense-kv")
    rows = json.loads((tmp_path / "causal_lm.json").read_text())["prefill"]
    assert [r["method"] for r in rows] == ["dense [default]", "STL r=24 causal [default]",
                                          "STL r=24 causal, dense-kv [default]"], rows
    assert all("error" not in r for r in rows), rows
    assert rows[2]["dense_sites"] == ["*k_proj", "*v_proj"]
