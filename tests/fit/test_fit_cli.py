import json

from stl_compiler.cli import main


def test_fit_basis_cli_prints_json_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "basis.safetensors"
    argv = ["fit-basis", "--tile", "4", "--rank", "12", "--out", str(out), "--steps", "20",
            "--restarts", "1", "--json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert set(summary) == {"alpha", "alpha_2_4", "rank", "tile"}
    assert (summary["rank"], summary["tile"]) == (12, 4)
    assert abs(summary["alpha_2_4"] - 0.53) < 0.02
    from stl_compiler import bases
    assert bases.load(out).alpha == summary["alpha"]

    assert main(argv) == 2
    assert "--force" in capsys.readouterr().err
    assert main(argv + ["--force"]) == 0
