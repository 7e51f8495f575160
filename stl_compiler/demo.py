"""The main job (``make demo``): the whole STL story on a CPU, in about a minute.

1. Convert: a small ViT trained densely on scikit-learn's 8×8 digits (a few seconds), converted
   to rank-24 STL by ``stl_compile``: the report (what was converted, what stayed dense and
   why, the error per site) and the test accuracy as converted (it drops).
2. Recover: ``swap_linears_`` → ``calibrate`` → ``distill`` with at most 10% of the dense
   training budget: dense vs converted vs recovered accuracy.
3. Deploy: ``stl_compile`` of the recovered model, exported to ONNX, run in ONNX Runtime at
   another batch size: the parity against the torch STL module.
4. Speed: the measured GPU table (``docs/results/proof_encoder.json`` when present, otherwise
   the H200 numbers of ``docs/benchmarks.md``), not a CPU timing, and where STL pays.

    python -m stl_compiler.demo [--seed N] [--speed-json PATH]

Deterministic for a seed (one thread: the model is tiny, and the float sums then do not depend
on the machine's core count). Needs scikit-learn (the digits) and the ``onnx`` extra (section
3 is skipped, saying so, without it); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import tempfile
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from . import STLConfig, stl_compile, swap_linears_
from .digits import Digits, DigitsViT, load, loss_fn, train
from .fit import calibrate, distill

RANK = 24
DENSE_STEPS = 300          # dense training: 300 steps of 128 images
RECOVERY_FRACTION = 0.1    # distillation steps, as a fraction of the dense steps
CALIB_IMAGES = 256         # calibration: the first 256 training images
DISTILL_LR = 2e-4
EXPORT_BATCH = 32          # ONNX is exported at this batch and run at the test set's (450)

#: The JSON of the proof experiment (examples/proof_encoder.py), looked for in this order: the
#: package's data folder (where a release ships it), then the source checkout's docs/results.
SPEED_JSON_NAME = "proof_encoder.json"
_PACKAGE_DIR = Path(__file__).resolve().parent
SPEED_JSON_PATHS = (_PACKAGE_DIR / "data" / SPEED_JSON_NAME,
                    _PACKAGE_DIR.parent / "docs" / "results" / SPEED_JSON_NAME)

#: Fallback when no JSON is found: docs/benchmarks.md's top table ("Wall-clock of compiled
#: models after the STL ops became triton_ops"), copied here so an installed package has it.
BENCHMARKS_MD = {
    "source": "docs/benchmarks.md, top table",
    "device": "NVIDIA H200", "date": "2026-12-03", "commit": "d710d6f+session-tree-0935",
    "what": "8-layer stacks, bf16, r=24, random weights, dense and STL both torch.compile'd",
    "columns": ("stack (8 layers)", "mode", "dense wall ms", "STL wall ms", "x wall", "x GPU"),
    "rows": (("ViT-H-like, d 1280, 32x257 tokens", "default", "5.919", "5.587", "1.06", "1.03"),
             ("ViT-H-like", "reduce-overhead", "5.926", "5.552", "1.07", "1.07"),
             ("DiT-XL-like, d 1152, 16x256 tokens", "default", "2.513", "5.633", "0.45",
              "0.96"),
             ("BERT-large-like, d 1024, 32x512 tokens", "default", "7.221", "7.928", "0.91",
              "0.93")),
}

WHERE = ("Where STL is faster: large matrices. One r=24 layer on an H200 runs 1.52x / 2.09x / "
         "2.27x cuBLAS at n = 4096 / 8192 / 16384 and 1.6-1.9x on LLM prefill shapes (hidden "
         "4096, 8192 tokens; docs/benchmarks.md, 2026-11-21, efb655c): LLM prefill, hidden >= "
         "3k.\nWhere it is not (yet): mid-size models (hidden ~1k: 0.76-1.07x wall-clock on an "
         "H200, 0.90-0.95x with CUDA graphs, 2026-12-03), decode (0.58-0.63x dense tokens/s: "
         "the encoded weight has 1.5x the bytes), small layers (the cost guard keeps them "
         "dense).")


def _section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(3, 96 - len(title)), flush=True)


def _quiet() -> contextlib.AbstractContextManager:
    """Mute torch's internal export / ONNX chatter, as the exporters do (every other warning,
    ours and the model's, still shows)."""
    from .exporters._quiet import quiet_torch_internals

    return quiet_torch_internals()


def config() -> STLConfig:
    """Rank 24, the shipped fitted basis, the cost guard off (see :func:`convert_section`)."""
    return STLConfig(rank=RANK, max_cost_ratio=None)


def convert_section(data: Digits, seed: int) -> dict:
    _section("1. Convert: a ViT trained densely, then rank-24 STL")
    torch.manual_seed(seed)
    dense = DigitsViT()
    seconds = train(dense, data.batches(seed), loss_fn, DENSE_STEPS, lr=3e-3)
    params = sum(p.numel() for p in dense.parameters())
    dense_acc = data.accuracy(dense)
    print(f"dense: a ViT (2 blocks, width 64, {params / 1e3:.0f}k parameters) on scikit-learn's "
          f"8x8 digits,\n  trained {DENSE_STEPS} steps of 128 images ({seconds:.0f} s): test "
          f"accuracy {dense_acc:.2f} % ({len(data.test_idx)} held-out images)")
    print(f"stl_compile(dense, (images,), STLConfig(rank={RANK}, max_cost_ratio=None), "
          f"backend=\"eager\"):\n  max_cost_ratio=None turns the cost guard off: at width 64 "
          f"STL saves few or no FLOPs (the FLOPs\n  column), so the default guard (0.8) would "
          f"keep every layer dense. Sections 1-3 are about accuracy;\n  speed is section 4.\n")
    example = data.images[data.train_idx[:EXPORT_BATCH]]
    with _quiet():
        converted = stl_compile(dense, (example,), config(), backend="eager")
    report = converted.stl_report
    # the decode->encode fusion table is for performance work (docs/compiler.md): one line here
    print(dataclasses.replace(report, boundaries=[]))
    fused = sum(b.kind != "not fused" for b in report.boundaries)
    print(f"fusion: {fused} of {len(report.boundaries)} decode->encode boundaries between STL "
          f"sites fused (the full report lists them)")
    converted_acc = data.accuracy(converted)
    print(f"\ntest accuracy as converted: {converted_acc:.2f} % (dense {dense_acc:.2f} %)")
    return {"dense_model": dense, "dense": dense_acc, "converted": converted_acc,
            "dense_seconds": seconds}


def recover_section(data: Digits, dense: torch.nn.Module, seed: int) -> dict:
    _section("2. Recover: calibrate + distill, with 10% of the dense training budget")
    student = copy.deepcopy(dense)
    swap_linears_(student, config(), keep_reference=True)
    print(f"student = swap_linears_(copy of dense, STLConfig(rank={RANK}, max_cost_ratio=None), "
          f"keep_reference=True)")
    start = time.perf_counter()
    table = calibrate(student, data.calibration(CALIB_IMAGES), steps=0, teacher=dense,
                      progress=False)
    calib_s = time.perf_counter() - start
    calibrated = data.accuracy(student)
    before = [row["error_before"] for row in table.rows]
    after = [row["error_after"] for row in table.rows]
    print(f"calibrate(student, {CALIB_IMAGES} training images, teacher=dense, steps=0) "
          f"({calib_s:.1f} s): each layer's\n  encoded weight by least squares on its real "
          f"inputs; layer output error {min(before):.2f}-{max(before):.2f} -> "
          f"{min(after):.2f}-{max(after):.2f}")
    steps = round(RECOVERY_FRACTION * DENSE_STEPS)
    stream = data.batches(seed + 1)
    batches = [next(stream)[0] for _ in range(steps)]
    start = time.perf_counter()
    distill(student, dense, batches, steps=steps, lr=DISTILL_LR, progress=False)
    distill_s = time.perf_counter() - start
    recovered = data.accuracy(student)
    print(f"distill(student, dense, {steps} batches of 128 images, steps={steps}, "
          f"lr={DISTILL_LR:g}) ({distill_s:.1f} s):\n  {steps} steps = "
          f"{RECOVERY_FRACTION:.0%} of the dense training's {DENSE_STEPS}; KL on the logits; "
          f"only STL parameters train")
    return {"student": student, "calibrated": calibrated, "recovered": recovered}


def print_accuracies(dense: float, converted: float, calibrated: float, recovered: float
                     ) -> None:
    print(f"\n  {'test accuracy':<36} {'%':>6}")
    for label, value in ((f"dense ({DENSE_STEPS} steps)", dense),
                         (f"STL r={RANK}, as converted", converted),
                         (f"STL r={RANK}, + calibrate", calibrated),
                         (f"STL r={RANK}, + distill = recovered", recovered)):
        print(f"  {label:<36} {value:>6.2f}")


def deploy_section(data: Digits, student: torch.nn.Module) -> dict:
    _section("3. Compile, export to ONNX, run in ONNX Runtime")
    example = data.images[data.train_idx[:EXPORT_BATCH]]
    start = time.perf_counter()
    with _quiet():
        module = stl_compile(student, (example,), STLConfig(rank=RANK, max_cost_ratio=None,
                                                            measure_error=False),
                             backend="eager")
    report = module.stl_report
    fused = sum(b.kind != "not fused" for b in report.boundaries)
    print(f"stl_compile(recovered, (images,), backend=\"eager\") "
          f"({time.perf_counter() - start:.1f} s): {len(report.sites)} sites, "
          f"{sum(s.preconverted for s in report.sites)} STL layers kept\n  as calibrated, "
          f"{fused} of {len(report.boundaries)} boundaries fused. backend=\"eager\" skips "
          f"torch.compile (over 30 s to\n  compile on a CPU); the default, "
          f"backend=\"inductor\", is what runs fast on a GPU.")
    test = data.test_images()
    with torch.no_grad():
        torch_out = module(test)
    try:
        from .exporters import export_onnx
        from .runtime import ort_session
    except ImportError as err:  # the onnx extra is optional
        print(f"ONNX skipped: {err}")
        return {"onnx_error": None}
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        start = time.perf_counter()
        # only the batch dim dynamic: "auto" would also try the 8x8 image dims, which the
        # model fixes anyway, at twice the export time
        path = export_onnx(module, (example,), os.path.join(tmp, "digits_stl.onnx"),
                           dynamic_shapes=({0: torch.export.Dim("batch")},))
        size = os.path.getsize(path) / 1e3
        session = ort_session(path)
        (ort_out,) = session.run(test)
        seconds = time.perf_counter() - start
    ort_out = torch.as_tensor(ort_out)
    err = float((ort_out - torch_out).norm() / torch_out.norm())
    print(f"export_onnx(module, batch {EXPORT_BATCH}): {size:.0f} kB of standard ONNX ops, "
          f"dynamic batch; run in ONNX Runtime\n  ({session.provider}) at batch {len(test)} "
          f"(export + run {seconds:.1f} s)")
    print(f"parity: |ONNX Runtime - torch STL module| / |torch STL module| = {err:.1e}; test "
          f"accuracy {data.accuracy_of(ort_out):.2f} %\n  (torch {data.accuracy_of(torch_out):.2f}"
          f" %)")
    return {"onnx_error": err}


@dataclasses.dataclass(frozen=True)
class SpeedTable:
    """What section 4 prints: where the numbers come from, and the table itself."""

    found: Path | None      # the JSON read, or None (the docs/benchmarks.md fallback)
    note: str               # one line: where the numbers come from (or why no JSON)
    device: str
    date: str
    commit: str
    what: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


def _fmt(value: object, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def speed_table_from_json(data: dict) -> tuple[str, tuple[str, ...], tuple[tuple[str, ...], ...]]:
    """``(what, columns, rows)`` of a proof_encoder.json; ValueError when it is malformed."""
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows:
        raise ValueError("no 'rows'")
    out = []
    for row in rows:
        try:
            out.append((str(row["model"]), str(row.get("stage", "-")),
                        _fmt(row.get("masked_acc"), ".2f"), _fmt(row.get("loss"), ".4f"),
                        _fmt(row.get("wall_ms"), ".3f"), _fmt(row.get("gpu_ms"), ".3f"),
                        _fmt(row.get("host_ms"), ".3f"), _fmt(row.get("speedup_vs_dense"),
                                                              ".2f")))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"bad row {row!r}: {err}") from err
    corpus = data.get("corpus")
    if isinstance(corpus, dict):
        corpus = corpus.get("name") or ", ".join(f"{k} {v}" for k, v in list(corpus.items())[:3])
    cfg = data.get("config") if isinstance(data.get("config"), dict) else {}
    shape = ", ".join(text.format(**cfg) for keys, text in (
        (("layers", "dim"), "{layers} layers, hidden {dim}"), (("mlp",), "MLP {mlp}"),
        (("batch", "seq"), "batch {batch}x{seq}"), (("inference_dtype",), "{inference_dtype}"),
        (("backend",), "backend {backend}")) if all(k in cfg for k in keys))
    what = ("masked-character encoder" + (f" ({shape})" if shape else "") + ": held-out "
            "accuracy / loss; inference wall-clock per batch")
    if corpus:
        what += f"; corpus: {corpus}"
    columns = ("model", "stage", "acc %", "loss", "wall ms", "gpu ms", "host ms", "x dense")
    return what, columns, tuple(out)


def load_speed_table(paths: Sequence[str | os.PathLike] | None = None) -> SpeedTable:
    """The measured GPU table: the first of ``paths`` (default :data:`SPEED_JSON_PATHS`) that
    exists and reads as a proof_encoder.json, else the H200 numbers of docs/benchmarks.md
    (:data:`BENCHMARKS_MD`), with a note that says which and why."""
    paths = [Path(p) for p in (SPEED_JSON_PATHS if paths is None else paths)]
    problems = []
    for path in paths:
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
            what, columns, rows = speed_table_from_json(data)
        except (OSError, ValueError) as err:
            problems.append(f"{path} unreadable ({str(err)[:80]})")
            continue
        return SpeedTable(path, f"measured by examples/proof_encoder.py: {path}",
                          str(data.get("device", "?")), str(data.get("date", "?")),
                          str(data.get("commit", "?")), what, columns, rows)
    why = "; ".join(problems) or f"no {SPEED_JSON_NAME} found (looked in: " + ", ".join(
        str(p) for p in paths) + ")"
    fb = BENCHMARKS_MD
    return SpeedTable(None, f"{why}.\nShowing the H200 numbers recorded in {fb['source']}:",
                      fb["device"], fb["date"], fb["commit"], fb["what"], fb["columns"],
                      fb["rows"])


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text == "-"
    return True


def format_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Text columns left-aligned, numeric ones right-aligned, two spaces apart."""
    widths = [max(len(str(r[i])) for r in (columns, *rows)) for i in range(len(columns))]
    numeric = [all(_is_number(str(r[i])) for r in rows) for i in range(len(columns))]
    line = lambda r: "  " + "  ".join(  # noqa: E731
        str(v).rjust(w) if num else str(v).ljust(w)
        for v, w, num in zip(r, widths, numeric)).rstrip()
    return "\n".join([line(columns), *(line(r) for r in rows)])


def speed_section(paths: Sequence[str | os.PathLike] | None = None) -> SpeedTable:
    _section("4. Speed: measured on a GPU (a CPU and a model this small say nothing about it)")
    table = load_speed_table(paths)
    for line in table.note.splitlines():
        print(textwrap.fill(line, 100, subsequent_indent="  ", break_long_words=False,
                            break_on_hyphens=False))
    print(f"device {table.device}, date {table.date}, commit {table.commit}")
    print(textwrap.fill(f"({table.what})", 100, subsequent_indent="  "))
    print(format_table(table.columns, table.rows))
    print()
    for line in WHERE.splitlines():
        print(textwrap.fill(line, 100, subsequent_indent="  ", break_long_words=False,
                            break_on_hyphens=False))
    return table


def run(seed: int = 0, speed_json: Sequence[str | os.PathLike] | None = None) -> dict:
    """Every section in order; returns the numbers (for tests)."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    print(f"stl-compiler demo: convert a model to Strassen-Tile (STL) layers, recover its "
          f"accuracy,\ndeploy it; then where STL is fast (seed {seed})")
    try:
        data = load()
    except ImportError as err:  # scikit-learn is not a dependency of the package
        raise SystemExit(f"stl_compiler.demo: {err}") from None
    first = convert_section(data, seed)
    second = recover_section(data, first["dense_model"], seed)
    print_accuracies(first["dense"], first["converted"], second["calibrated"],
                     second["recovered"])
    third = deploy_section(data, second["student"])
    table = speed_section(speed_json)
    print(f"\n(demo: {time.perf_counter() - start:.0f} s)")
    return {"dense": first["dense"], "converted": first["converted"],
            "calibrated": second["calibrated"], "recovered": second["recovered"],
            "onnx_error": third["onnx_error"], "speed_table": table}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--speed-json", default=None,
                        help=f"a proof_encoder.json to show in section 4 (default: "
                             f"{', '.join(str(p) for p in SPEED_JSON_PATHS)})")
    args = parser.parse_args(argv)
    run(args.seed, None if args.speed_json is None else [args.speed_json])


if __name__ == "__main__":
    main()
