"""AOTInductor packages: compile once (CLI), load in a fresh process without stl_compiler."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from stl_helpers import rel_err
from torch import nn

from stl_compiler.cli import main
from stl_compiler.exporters import export_aoti, load_aoti

TOL = 1e-4

_FACTORY = """
import torch
from torch import nn

def make_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 24))
"""

_FRESH_PROCESS = """
import sys, torch
package, data = sys.argv[1:]
model = torch._inductor.aoti_load_package(package)
io = torch.load(data)
errors = [float((model(x) - y).norm() / y.norm()) for x, y in zip(io["inputs"], io["outputs"])]
assert "stl_compiler" not in sys.modules
print(max(errors))
"""


def test_cli_package_loads_in_fresh_process_and_matches(tmp_path, monkeypatch):
    """``stl-compiler export --format aoti`` (stl_compile, then export_aoti); the package
    runs in a process that never imports stl_compiler, at other batch / sequence sizes."""
    (tmp_path / "aoti_models.py").write_text(_FACTORY)
    monkeypatch.chdir(tmp_path)
    package = tmp_path / "pkg" / "mlp.pt2"
    try:
        assert main(["export", "--model", "aoti_models:make_mlp", "--input-shape", "2x6x32",
                     "--basis", "strassen", "--min-dim", "1", "--format", "aoti",
                     "--out", str(package)]) == 0
        import aoti_models

        dense = aoti_models.make_mlp().eval()
    finally:
        sys.modules.pop("aoti_models", None)
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
