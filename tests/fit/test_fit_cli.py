import json

import pytest

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


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--restarts", "0"], "--restarts must be >= 1"),
    (["--tile", "3"], "--tile 3 with --init strassen-pruned: that init starts from Strassen's "
                      "exact basis, which exists only for power-of-two tiles (2, 4, 8, ...); "
                      "use --init random for tile 3"),
    (["--init", "deflate", "--rank", "50"], "Strassen's basis for tile 4 has rank 49"),
    (["--init", "deflate-dps48", "--rank", "49"], "--rank 49 with --init deflate-dps48: the "
                                                  "scheme it starts from has rank 48"),
    (["--init", "deflate-dps48", "--tile", "8"], "--tile 8 with --init deflate-dps48: that init "
                                                 "starts from the exact rank-48 scheme for 4x4 "
                                                 "tiles"),
])
def test_fit_basis_cli_rejects_bad_arguments_in_one_line(tmp_path, capsys, argv, message):
    out = tmp_path / "basis.safetensors"
    assert main(["fit-basis", "--rank", "12", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not out.exists()


def test_fit_basis_cli_fits_odd_tiles_with_a_random_init(tmp_path, capsys):
    out = tmp_path / "basis.safetensors"
    argv = ["fit-basis", "--tile", "3", "--rank", "10", "--init", "random", "--out", str(out),
            "--steps", "5", "--restarts", "1"]
    assert main(argv) == 0
    from stl_compiler import bases
    assert (bases.load(out).tile, bases.load(out).rank) == (3, 10)


@pytest.mark.parametrize("init, exact", [("deflate", 49), ("deflate-dps48", 48)])
def test_fit_basis_cli_warns_with_an_estimate_before_a_long_deflate(tmp_path, capsys,
                                                                     monkeypatch, init, exact):
    from stl_compiler.fit import cli, fitting

    if init == "deflate":  # the estimate scales one timed candidate refit: more rows, longer
        assert 0 < cli._deflate_estimate(4, 48, 49) < cli._deflate_estimate(4, 40, 49)
    estimates = []
    monkeypatch.setattr(cli, "_deflate_estimate",
                        lambda tile, rank, start: estimates.append(start) or 240.0)
    calls = []
    monkeypatch.setattr(fitting, "fit_basis", lambda *a, **k: calls.append(k) or (
        fitting.bases.random(4, 12), 1.0))
    out = tmp_path / "basis.safetensors"
    assert main(["fit-basis", "--rank", "12", "--init", init, "--method", "sgd",
                 "--steps", "5", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"--init {init} removes rows one at a time" in err and "about 240 s" in err
    assert calls and calls[0]["init"] == init and estimates == [exact]
