"""``stl-compiler export``: formats, --force, progress lines, options, and one-line errors
(exit 2) for every user mistake; the fit-basis → calibrate → export flow from the shell."""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import textwrap

import onnx
import pytest
import torch
from stl_helpers import rel_err

import stl_compiler as stl
from stl_compiler.cli import main
from stl_compiler.cli.export import _config, _load_model, _profile
from stl_compiler.runtime import ort_session

FACTORIES = textwrap.dedent('''
    import torch
    from torch import nn

    def make_mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 24))

    def not_a_module():
        return 42

    def raises():
        raise RuntimeError("no weights here")

    CONSTANT = 1
''')

#: The exact basis on every linear, whatever it costs: these tests check the export path,
#: not the cost guard's decision (a tiny MLP costs more in STL than dense).
EXACT = {"basis": "strassen", "min_dim": 1, "max_cost_ratio": None}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A directory holding ``mymodels.py`` (the user's code) and ``exact.json`` (an STLConfig),
    as the current directory."""
    (tmp_path / "mymodels.py").write_text(FACTORIES)
    (tmp_path / "exact.json").write_text(json.dumps(EXACT))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # for the tests' own `import mymodels`
    yield tmp_path
    sys.modules.pop("mymodels", None)


def _export(out, *extra: str) -> list[str]:
    return ["export", "--model", "mymodels:make_mlp", "--input-shape", "2x6x32",
            "--config", "exact.json", "--out", str(out), *extra]


def _dense():
    import mymodels

    return mymodels.make_mlp().eval()


def _error_line(err: str) -> str:
    """The error of a failed run: exactly one line, the last, no traceback."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0], err
    return errors[0]


def test_onnx_export_and_force(workdir, capsys):
    out = workdir / "out" / "mlp.onnx"
    assert main(_export(out, "--format", "onnx", "--max-shape", "8x64x32")) == 0
    err = capsys.readouterr().err
    assert "converting to STL (stl_compile) ..." in err and "done in" in err
    assert "2 of 2 matmul sites converted" in err
    assert "warning: --max-shape is ignored for --format onnx" in err
    # torch's internal chatter stays out of the output: progress lines and warnings only
    assert all(line.startswith("[stl-compiler]") for line in err.splitlines()), err
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        assert rel_err(ort_session(out).run(x)[0], _dense()(x)) < 1e-4
    before = out.stat().st_mtime_ns

    assert main(_export(out, "--format", "onnx")) == 2  # exists, no --force
    err = capsys.readouterr().err
    assert "already exists; pass --force" in err and "loading" not in err
    assert out.stat().st_mtime_ns == before

    assert main(_export(out, "--format", "onnx", "--force", "--fp16", "--opset", "20")) == 0
    model = onnx.load(str(out))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert [o.version for o in model.opset_import if o.domain == ""] == [20]
    assert sorted(os.listdir(out.parent)) == ["mlp.onnx"]


def test_triton_repository(workdir, capsys):
    assert main(_export(workdir / "repo", "--format", "triton", "--name", "mlp")) == 0
    assert sorted(os.listdir(workdir / "repo" / "mlp")) == ["1", "config.pbtxt"]
    config = (workdir / "repo" / "mlp" / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in config and "dims: [ -1, 32 ]" in config
    assert "wrote" in capsys.readouterr().out
    assert main(_export(workdir / "repo", "--format", "triton", "--name", "mlp")) == 2
    assert "pass --force" in capsys.readouterr().err


def test_tensorrt_without_tensorrt(workdir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert main(_export(workdir / "m.plan", "--format", "tensorrt")) == 2
    err = capsys.readouterr().err
    assert "stl-compiler[tensorrt]" in err and "loading" not in err  # before the slow steps
    assert sorted(os.listdir(workdir)) == ["exact.json", "mymodels.py"]


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"stl-compiler {stl.__version__}"


def test_usage_error_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--model", "m:f", "--input-shape", "2x4", "--format", "zip"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice: 'zip'" in err and "--help" in err


@pytest.mark.parametrize("args,match", [
    (["--model", "mymodels"], "package.module:factory or path/to/file.py:factory"),
    (["--model", "nomodule:make"], "cannot import 'nomodule'"),
    (["--model", "mymodels:CONSTANT"], "no callable 'CONSTANT'"),
    (["--model", "mymodels:not_a_module"], "returned int, not an nn.Module"),
    (["--model", "mymodels:raises"],
     r"mymodels:raises: the factory raised RuntimeError at .*mymodels.py:\d+: no weights here"),
    (["--model", "./missing.py:make"], "--model file not found: missing.py"),
    (["--model", "./relative.py:make"],
     r"running .*relative.py failed: ImportError at .*relative.py:1: attempted relative import"),
    (["--input-shape", "2xfoo"], "bad --input-shape '2xfoo'"),
    (["--input-shape", "2x0x32"], "sizes must be >= 1"),
    (["--input-shape", "2x6x31"],
     r"the model fails on the example input \(input: float32\[2, 6, 31\]\): RuntimeError: "
     r"mat1 and mat2 shapes cannot be multiplied.*give one --input-shape"),
    (["--input-shape", "2x6x32", "--input-shape", "2x6x32"],
     r"\(input 0: float32\[2, 6, 32\], input 1: float32\[2, 6, 32\]\) do not fit "
     r"Sequential.forward\(input\): too many positional arguments"),
    (["--input-dtype", "int64", "--input-dtype", "int64"], "one per --input-shape"),
    (["--opset", "7"], "--opset 7 is not supported: .* writes opsets 18 to"),
    (["--tile", "3", "--basis", "fitted"],
     r"no fitted basis ships for --tile 3 \(shipped: tile 4: ranks 16, .*--basis naive or "
     r"random \(any tile >= 2\).*--basis FILE"),
    (["--basis", "fitted-bf16", "--rank", "17"],
     r"no fitted-bf16 basis ships for --tile 4 --rank 17 \(shipped: tile 4: ranks 16, 20, 24"),
    (["--basis", "auto", "--rank", "17"],
     r"no fitted and fitted-bf16 basis \(basis auto, the default, picks one per site\) ships "
     r"for --tile 4 --rank 17 \(shipped: tile 4: ranks 16, 20, 24"),
    (["--tile", "3", "--basis", "strassen"], "needs a power-of-two --tile"),
    (["--basis", "missing.safetensors"], "--basis: no basis file at 'missing.safetensors'"),
    (["--basis", "mymodels.py"], "--basis: .* is not a safetensors file"),
    (["--basis", "basis16.safetensors", "--rank", "24"],
     "--rank 24 but the basis 'random4x16' has rank 16: drop --rank"),
    (["--config", "missing.json"], "--config file not found"),
    (["--config", "mymodels.py"], "--config mymodels.py is not JSON"),
    (["--config", "unknown.json"], r"unknown STLConfig keys \['colour'\]"),
    (["--checkpoint", "mymodels.py"], "--checkpoint mymodels.py is not a torch state_dict"),
    (["--checkpoint", "rank16.pt"],
     r"does not fit the model converted with this config: size mismatch for 0\.weight_encoded"),
    (["--max-shape", "8x64x32", "--max-shape", "8x64x32"], "one --max-shape per --input-shape"),
    (["--max-shape", "1x6x32"], "no smaller size"),
])
def test_bad_arguments(workdir, capsys, monkeypatch, args, match):
    """Each user error: one line on stderr, exit code 2, nothing written."""
    (workdir / "relative.py").write_text("from . import sibling\n")
    (workdir / "unknown.json").write_text(json.dumps({"colour": "red"}))
    stl.bases.random(4, 16).save(workdir / "basis16.safetensors")
    model = _converted_mlp(stl.STLConfig(**EXACT | {"basis": "random", "rank": 16}))
    torch.save(model.state_dict(), workdir / "rank16.pt")  # exact.json converts at rank 49
    files = sorted(os.listdir(workdir))
    fmt = "tensorrt" if "--max-shape" in args else "onnx"
    argv = _export(workdir / "m.onnx", "--format", fmt)
    for flag, value in zip(args[::2], args[1::2]):
        if flag in argv and flag not in ("--input-dtype", "--input-shape", "--max-shape"):
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    if "--input-shape" in args:
        i = argv.index("--input-shape")
        del argv[i:i + 2]
    # no TensorRT here: --max-shape is checked before the engine is built
    monkeypatch.setattr("stl_compiler.exporters.tensorrt._import_tensorrt", lambda: None)
    assert main(argv) == 2
    assert re.search(match, _error_line(capsys.readouterr().err))
    assert sorted(os.listdir(workdir)) == files


def _converted_mlp(config: stl.STLConfig) -> torch.nn.Module:
    model = _dense()
    stl.swap_linears_(model, config)
    return model


def _namespace(**options) -> argparse.Namespace:
    values = {"config": None, "tile": None, "rank": None, "basis": None, "min_dim": None,
              "fp16": False}
    return argparse.Namespace(**values | options)


def test_config_options(workdir):
    """--config, --basis FILE and the flags combine: flags override the file, a basis file
    sets tile and rank, a basis path inside the config is relative to the config file."""
    (workdir / "sub").mkdir()
    stl.bases.random(4, 16, seed=3).save(workdir / "sub" / "b.safetensors")
    saved = stl.STLConfig(basis="random", rank=20, min_dim=8, max_cost_ratio=None).to_dict()
    (workdir / "sub" / "c.json").write_text(json.dumps(saved))
    config = _config(_namespace(config=workdir / "sub" / "c.json"))
    assert (config.basis, config.rank, config.min_dim, config.max_cost_ratio) == \
        ("random", 20, 8, None)
    config = _config(_namespace(config=workdir / "sub" / "c.json", rank=28, min_dim=4))
    assert (config.rank, config.min_dim) == (28, 4)
    config = _config(_namespace(basis="sub/b.safetensors"))
    assert isinstance(config.basis, stl.STLBasis) and (config.tile, config.rank) == (4, 16)
    assert torch.equal(config.basis.ex, stl.bases.random(4, 16, seed=3).ex)
    (workdir / "sub" / "d.json").write_text(json.dumps(saved | {"basis": "b.safetensors"}))
    config = _config(_namespace(config=workdir / "sub" / "d.json"))
    assert torch.equal(config.basis.ex, stl.bases.random(4, 16, seed=3).ex)


def test_fp16_turns_the_default_basis_into_fitted_bf16(workdir, capsys):
    """--fp16 converts the float32 model for a float16 deployment: basis "auto" (the default,
    also when --config or an override names it) becomes "fitted-bf16"; a named basis stays."""
    assert _config(_namespace()).basis == "auto"
    assert _config(_namespace(fp16=True)).basis == "fitted-bf16"
    assert "--fp16: basis auto -> fitted-bf16" in capsys.readouterr().err
    assert _config(_namespace(fp16=True, basis="fitted")).basis == "fitted"
    saved = stl.STLConfig(rank=16, overrides={"fc": {"basis": "auto"}, "x": "skip"}).to_dict()
    (workdir / "auto.json").write_text(json.dumps(saved))
    config = _config(_namespace(config=workdir / "auto.json", fp16=True))
    assert config.basis == "fitted-bf16" and config.rank == 16
    assert config.overrides == {"fc": {"basis": "fitted-bf16"}, "x": "skip"}


def test_model_from_file_path(workdir, tmp_path_factory):
    """--model path/to/file.py:factory loads the file (its siblings import as in a script),
    from any current directory."""
    models = tmp_path_factory.mktemp("elsewhere")
    (models / "helpers.py").write_text("WIDTH = 32\n")
    (models / "net.py").write_text(FACTORIES.replace("nn.Linear(32, 64)",
                                                     "nn.Linear(helpers.WIDTH, 64)")
                                   .replace("import torch\n", "import torch\nimport helpers\n", 1))
    try:
        model = _load_model(f"{models / 'net.py'}:make_mlp")
    finally:
        sys.modules.pop("helpers", None)
    assert str(models) not in sys.path
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        assert torch.equal(model(x), _dense()(x))


def test_fit_calibrate_export_from_the_shell(workdir, capsys):
    """fit-basis → (Python) swap_linears_ + calibrate → export --config --basis --checkpoint:
    the ONNX model computes the calibrated model, not a fresh conversion."""
    assert main(["fit-basis", "--tile", "4", "--rank", "16", "--steps", "1", "--restarts", "1",
                 "--out", "fitted16.safetensors"]) == 0
    config_file = {"min_dim": 1, "max_cost_ratio": None}
    (workdir / "stl.json").write_text(json.dumps(config_file))
    config = stl.STLConfig(basis=stl.bases.load("fitted16.safetensors"), **config_file)
    dense = _dense()
    model = copy.deepcopy(dense)
    stl.swap_linears_(model, config, keep_reference=True)
    batches = [torch.randn(4, 8, 32) for _ in range(4)]
    stl.calibrate(model, batches, steps=1, progress=False)
    torch.save(model.state_dict(), "calibrated.pt")

    out = workdir / "calibrated.onnx"
    argv = _export(out, "--format", "onnx", "--basis", "fitted16.safetensors",
                   "--checkpoint", "calibrated.pt")
    argv[argv.index("--config") + 1] = "stl.json"
    assert main(argv) == 0, capsys.readouterr().err
    assert "2 of 2 matmul sites converted" in capsys.readouterr().err
    fresh = copy.deepcopy(dense)
    stl.swap_linears_(fresh, config)
    x = torch.randn(3, 7, 32)
    (got,) = ort_session(out).run(x)
    with torch.no_grad():
        assert rel_err(got, model.eval()(x)) < 1e-4
        assert rel_err(got, fresh(x)) > 1e-3  # the checkpoint was applied


def test_tensorrt_profile(tmp_path):
    """min 1 / opt example / max 4x the example (or --max-shape) on dynamic dims; a
    --max-shape that changes a dim the export fixed is an error naming the input."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), path)
    example = (torch.randn(2, 4),)
    assert _profile(path, example, None) == ({"x": (1, 4)}, {"x": (2, 4)}, {"x": (8, 4)})
    assert _profile(path, example, [(16, 4)])[2] == {"x": (16, 4)}
    with pytest.raises(ValueError, match=r"input 'x' changes dims \[1\], which the exported "
                                         r"model fixed to the example's sizes 2x4"):
        _profile(path, example, [(16, 8)])
