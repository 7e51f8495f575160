"""``stl-compiler export``: formats, --force, progress lines, clear errors."""

from __future__ import annotations

import os
import sys
import textwrap

import onnx
import pytest
import torch
from stl_helpers import rel_err

from stl_compiler.cli import main
from stl_compiler.runtime import ort_session

FACTORIES = textwrap.dedent('''
    import torch
    from torch import nn

    def make_mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 24))

    def not_a_module():
        return 42

    CONSTANT = 1
''')


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A directory holding ``mymodels.py`` (the user's code), as the current directory."""
    (tmp_path / "mymodels.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    sys.modules.pop("mymodels", None)


def _export(out, *extra: str) -> list[str]:
    return ["export", "--model", "mymodels:make_mlp", "--input-shape", "2x6x32",
            "--basis", "strassen", "--min-dim", "1", "--out", str(out), *extra]


def _dense():
    import mymodels

    return mymodels.make_mlp().eval()


def test_onnx_export_and_force(workdir, capsys):
    out = workdir / "out" / "mlp.onnx"
    assert main(_export(out, "--format", "onnx")) == 0
    err = capsys.readouterr().err
    assert "converting to STL (stl_compile) ..." in err and "done in" in err
    assert "2 of 2 matmul sites converted" in err
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        assert rel_err(ort_session(out).run(x)[0], _dense()(x)) < 1e-4
    before = out.stat().st_mtime_ns

    assert main(_export(out, "--format", "onnx")) == 2  # exists, no --force
    err = capsys.readouterr().err
    assert "already exists; pass --force" in err and "loading" not in err
    assert out.stat().st_mtime_ns == before

    assert main(_export(out, "--format", "onnx", "--force", "--fp16")) == 0
    graph = onnx.load(str(out)).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
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
    assert sorted(os.listdir(workdir)) == ["mymodels.py"]


@pytest.mark.parametrize("args,match", [
    (["--model", "mymodels"], "package.module:factory"),
    (["--model", "nomodule:make"], "cannot import 'nomodule'"),
    (["--model", "mymodels:CONSTANT"], "no callable 'CONSTANT'"),
    (["--model", "mymodels:not_a_module"], "returned int, not an nn.Module"),
    (["--input-shape", "2xfoo"], "bad shape '2xfoo'"),
    (["--input-shape", "2x0x32"], "sizes must be >= 1"),
    (["--input-dtype", "int64", "--input-dtype", "int64"], "one per --input-shape"),
])
def test_bad_arguments(workdir, capsys, args, match):
    argv = _export(workdir / "m.onnx", "--format", "onnx")
    for flag, value in zip(args[::2], args[1::2]):
        if flag in argv and flag != "--input-dtype":
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    assert main(argv) == 2
    assert match in capsys.readouterr().err
    assert sorted(os.listdir(workdir)) == ["mymodels.py"]
