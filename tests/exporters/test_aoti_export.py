"""AOTInductor packages: compile once, load in a fresh process (without stl_compiler)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
from stl_helpers import rel_err
from torch import nn

import stl_compiler as stl
from stl_compiler.exporters import export_aoti, load_aoti

TOL = 1e-4

_FRESH_PROCESS = """
import sys, torch
package, data = sys.argv[1:]
model = torch._inductor.aoti_load_package(package)
io = torch.load(data)
errors = [float((model(x) - y).norm() / y.norm()) for x, y in zip(io["inputs"], io["outputs"])]
assert "stl_compiler" not in sys.modules
print(max(errors))
"""


def test_package_loads_in_fresh_process_and_matches(tmp_path):
    dense = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 24)).eval()
    example = torch.randn(2, 6, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = stl.stl_compile(dense, (example,), stl.STLConfig(basis="strassen",
                                                                    min_dim=1),
                                   backend="eager")
    package = export_aoti(compiled, example, tmp_path / "pkg" / "mlp.pt2")
    assert os.listdir(tmp_path / "pkg") == ["mlp.pt2"]
    inputs = [torch.randn(3, 7, 32), torch.randn(5, 13, 32), torch.randn(1, 4, 32)]
    with torch.no_grad():
        outputs = [dense(x) for x in inputs]  # exact basis: the dense outputs
    loaded = load_aoti(package)
    assert max(rel_err(loaded(x), y) for x, y in zip(inputs, outputs)) < TOL
    torch.save({"inputs": inputs, "outputs": outputs}, tmp_path / "io.pt")
    result = subprocess.run([sys.executable, "-c", _FRESH_PROCESS, str(package),
                             str(tmp_path / "io.pt")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.strip().splitlines()[-1]) < TOL


def test_package_path_must_end_in_pt2(tmp_path):
    with pytest.raises(ValueError, match=r"\.pt2"):
        export_aoti(nn.Linear(4, 4), torch.randn(2, 4), tmp_path / "model.so")
    assert os.listdir(tmp_path) == []


def test_load_missing_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="AOTInductor package not found"):
        load_aoti(tmp_path / "missing.pt2")
