"""tools/causal_char_lm_ranks.py --smoke: the char LM pipeline of issue 14 item 5 (train,
convert with causal and batch grouping, three recipes, calibrate, distil, perturbation check)
runs on CPU at tiny sizes and writes a complete JSON and log."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("causal_char_lm") / "ranks.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "causal_char_lm_ranks.py"),
                           "--smoke", "--out", str(out), "--log"], cwd=ROOT, text=True,
                          capture_output=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert out.with_suffix(".log").read_text().strip().startswith("commit ")
    return json.loads(out.read_text())


@pytest.mark.slow
def test_every_recipe_and_stage_is_there(smoke: dict) -> None:
    for key in ("command", "date", "commit", "settings", "dense", "rows", "targets"):
        assert smoke[key], key
    recipes = {"causal": "causal", "batch": "batch", "causal-rowsep": "causal"}
    assert {(r["recipe"], r["rank"]) for r in smoke["rows"]} == {(k, 24) for k in recipes}
    for row in smoke["rows"]:
        assert row["grouping"] == recipes[row["recipe"]]
    for row in smoke["rows"]:
        for stage in ("converted", "calibrated", "distilled"):
            assert math.isfinite(row[stage]["ppl"]) and len(row[stage]["by_row"]) == 4, row
    assert {t["rank"] for t in smoke["targets"]} == {24}


@pytest.mark.slow
def test_calibration_recovers_and_the_models_stay_causal(smoke: dict) -> None:
    dense = smoke["dense"]["ppl"]
    for row in smoke["rows"]:
        assert row["converted"]["ppl"] > dense  # conversion costs accuracy: not vacuous
        assert row["calibrated"]["ppl"] < row["converted"]["ppl"], row
        assert row["distilled"]["ppl"] < row["converted"]["ppl"], row
        assert row["keeps_causality"] is True
        check = row["perturbation_check"]
        assert check["causal"] is True, check
        assert check["float64"]["earlier"] == 0 and check["float64"]["batch_mates"] == 0
        assert check["float64"]["later"] > 0
