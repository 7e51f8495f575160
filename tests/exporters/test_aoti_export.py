"""AOTInductor packages: compile once (CLI), load in a fresh process without stl_compiler;
the loaded model checks its inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from stl_helpers import rel_err
from torch import nn

from stl_compiler.cli import main
from stl_compiler.exporters import export_aoti, load_aoti
from stl_compiler.exporters.aoti import AOTIModel

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


@pytest.fixture(scope="module")
def cli_package(tmp_path_factory):
    """``stl-compiler export --format aoti`` (stl_compile, then export_aoti) of an MLP with
    the exact basis: ``(package path, dense model)``. Compiled once: AOTInductor is slow."""
    tmp_path = tmp_path_factory.mktemp("aoti")
    (tmp_path / "aoti_models.py").write_text(_FACTORY)
    (tmp_path / "exact.json").write_text(json.dumps({"basis": "strassen", "min_dim": 1,
                                                     "max_cost_ratio": None}))
    package = tmp_path / "pkg" / "mlp.pt2"
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main(["export", "--model", "aoti_models:make_mlp", "--input-shape", "2x6x32",
                     "--config", "exact.json", "--format", "aoti", "--out", str(package)]) == 0
        sys.path.insert(0, str(tmp_path))
        import aoti_models

        dense = aoti_models.make_mlp().eval()
    finally:
        os.chdir(cwd)
        sys.path.remove(str(tmp_path))
        sys.modules.pop("aoti_models", None)
    assert os.listdir(tmp_path / "pkg") == ["mlp.pt2"]
    return package, dense


def test_cli_package_loads_in_fresh_process_and_matches(cli_package, tmp_path):
    """The package runs in a process that never imports stl_compiler, at other batch /
    sequence sizes."""
    package, dense = cli_package
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


@pytest.mark.parametrize("args,kwargs,error,match", [
    ((torch.randn(3, 7, 16),), {}, ValueError,
     r"input 'input' dim 2 must be 32 \(\?, \?, 32\), got shape \(3, 7, 16\)"),
    ((torch.randn(3, 32),), {}, ValueError, r"input 'input' must have rank 3"),
    ((torch.randn(3, 7, 32).double(),), {}, TypeError,
     r"input 'input' must have dtype float32, got float64; cast it first"),
    ((torch.randn(3, 7, 32), torch.randn(3, 7, 32)), {}, ValueError,
     r"takes 1 positional inputs .*got 2 positional"),
    ((), {"x": torch.randn(3, 7, 32)}, ValueError, r"takes keyword inputs \[\], got \['x'\]"),
    (([torch.randn(3, 7, 32)],), {}, ValueError, "structured as at export"),
])
def test_loaded_package_checks_its_inputs(cli_package, args, kwargs, error, match):
    """Unchecked, a wrong feature size returns garbage and float64 returns float32."""
    model = load_aoti(cli_package[0])
    assert repr(model) == "AOTIModel(input: float32[?, ?, 32] (cpu))"
    with pytest.raises(error, match=match):
        model(*args, **kwargs)


def test_package_without_signature_is_unchecked():
    """A package not written by export_aoti has no stored signature: calls pass through."""

    class Package:
        def get_metadata(self):
            return {"AOTI_DEVICE_KEY": "cpu"}

        def __call__(self, *args, **kwargs):
            return "ran"

    model = AOTIModel(Package())
    assert model.inputs is None and model(torch.randn(2, 3).double()) == "ran"


def test_package_path_must_end_in_pt2(tmp_path):
    with pytest.raises(ValueError, match=r"\.pt2"):
        export_aoti(nn.Linear(4, 4), torch.randn(2, 4), tmp_path / "model.so")
    assert os.listdir(tmp_path) == []


def test_load_missing_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="AOTInductor package not found"):
        load_aoti(tmp_path / "missing.pt2")
