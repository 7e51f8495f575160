"""Shared helpers of the accuracy examples: the text corpus, conversion variants, training
loop, tables."""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import multiprocessing
import os
import subprocess
import sys
import sysconfig
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

import stl_compiler as stl

# the transformer block and the training loop live in the package (make demo uses them too)
from stl_compiler.digits import Block, train  # noqa: F401 - re-exported
from stl_compiler.fit import calibrate, distill

#: The char LM's corpus: these files of the running Python's standard library.
FILES = ("argparse.py", "dataclasses.py", "functools.py", "inspect.py", "typing.py",
         "pathlib.py", "subprocess.py", "collections/__init__.py")
#: Characters are ASCII codes; other bytes become "?".
VOCAB = 128
#: Folders left out of :func:`stdlib_files`: tests, third-party packages, generated codec tables.
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
             "encodings"}


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def resolve_file(name: str) -> str:
    """``name`` under the standard library; a module that became a package (``pathlib.py``
    in Python 3.13) resolves to its ``__init__.py``."""
    path = os.path.join(stdlib_root(), name)
    package = os.path.join(path[:-3], "__init__.py")
    if not os.path.isfile(path) and name.endswith(".py") and os.path.isfile(package):
        return package
    return path


def stdlib_files() -> tuple[str, ...]:
    """Every ``.py`` file of the standard library outside :data:`SKIP_DIRS`, relative to its
    root, sorted (so the corpus, and the held-out tail of it, is reproducible)."""
    root = stdlib_root()
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        found += [os.path.relpath(os.path.join(folder, f), root) for f in files
                  if f.endswith(".py")]
    return tuple(sorted(found))


def load_text(files: Sequence[str] = FILES) -> torch.Tensor:
    """The standard-library ``files`` concatenated, as ASCII codes (non-ASCII bytes become
    '?'), a 1-D int64 tensor."""
    data = bytearray()
    for name in files:
        with open(resolve_file(name), "rb") as handle:
            data += handle.read()
    codes = torch.frombuffer(data, dtype=torch.uint8).long() if data else torch.zeros(
        0, dtype=torch.long)
    return torch.where(codes < VOCAB, codes, ord("?"))


def split_text(text: torch.Tensor | None = None, train_fraction: float = 0.9
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``train_fraction`` of ``text`` (default: :func:`load_text` of :data:`FILES`)
    for training, the rest held out."""
    text = load_text() if text is None else text
    split = int(train_fraction * len(text))
    return text[:split], text[split:]


RANKS = (16, 24, 32, 40, 49)


def parse_args(doc: str, out: str, ranks: tuple[int, ...] = RANKS) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=list(ranks))
    parser.add_argument("--bf16-cuda", action="store_true",
                        help="also evaluate every model in bf16 on the CUDA device (training "
                             "stays fp32 on CPU): the precision users deploy in")
    parser.add_argument("--steps", type=int, default=None, help="training steps (dense and A)")
    parser.add_argument("--out", default=out, help="JSON results file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1,
                        help="ranks run in parallel processes (one thread each)")
    args = parser.parse_args()
    args.ranks = sorted(set(args.ranks))
    torch.set_num_threads(1)
    return args


#: The exact row of each grouping: Strassen's rank-49 basis mixes the rows of a tile, so with
#: "batch" (rows are different sequences) the exact basis is the row-separable naive one.
EXACT = {"tokens": ("strassen", 49), "batch": ("naive", 64)}


def config(rank: int, row_grouping: str) -> stl.STLConfig:
    """The fitted basis below the grouping's exact rank (:data:`EXACT`), the exact basis at it
    (with "batch", "fitted" is the row-separable basis of the rank). The cost guard is off:
    the examples measure accuracy at every rank, on layers too narrow for STL to save FLOPs."""
    name, exact = EXACT[row_grouping]
    return stl.STLConfig(rank=rank, basis=name if rank == exact else "fitted",
                         row_grouping=row_grouping, max_cost_ratio=None)


def to_stl(model: nn.Module, rank: int, row_grouping: str, keep_reference: bool = False
           ) -> nn.Module:
    """A converted deep copy of ``model`` (every nn.Linear with in/out >= 16)."""
    student = copy.deepcopy(model)
    stl.swap_linears_(student, config(rank, row_grouping), keep_reference=keep_reference)
    return student


def convert_variants(dense: nn.Module, rank: int, row_grouping: str, calib: list,
                     distill_batches: list, distill_steps: int, evaluate: Callable,
                     lr: float, calib_options: dict | None = None,
                     distill_options: dict | None = None) -> dict:
    """(B): plain encoding, + calibration, + distillation (from the calibrated model).

    ``calib_options`` / ``distill_options``: extra keyword arguments of :func:`calibrate`
    (``steps=2`` unless given; the dense model is the teacher) and :func:`distill`."""
    plain = to_stl(dense, rank, row_grouping)
    result = {"plain": evaluate(plain)}
    calibrated = to_stl(dense, rank, row_grouping, keep_reference=True)
    table = calibrate(calibrated, calib, **{"steps": 2, "teacher": dense, "progress": False,
                                            **(calib_options or {})})
    result["calibrated"] = evaluate(calibrated)
    result["calibration"] = table.rows
    distill(calibrated, dense, distill_batches, steps=distill_steps,
            **{"lr": lr, "progress": False, **(distill_options or {})})
    result["distilled"] = evaluate(calibrated)
    return result


#: The models of a rank's row, in the order :func:`compare_ranks` evaluates them.
VARIANTS = ("scratch", "plain", "calibrated", "distilled")


class DeviceCopy(nn.Module):
    """A deep copy of ``model`` on ``device`` in ``dtype`` (eval mode), called like the model
    with CPU inputs: floating-point inputs are cast to ``dtype``, integer ones (token ids)
    only moved; the output comes back as float32 on the CPU, so any CPU metric applies."""

    def __init__(self, model: nn.Module, device: str = "cuda",
                 dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.inner = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
        self.device, self.dtype = torch.device(device), dtype

    @torch.no_grad()
    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        moved = [x.to(self.device, self.dtype if x.is_floating_point() else x.dtype)
                 for x in inputs]
        return self.inner(*moved).float().cpu()


def bf16_cuda(metric: Callable[[nn.Module], float]) -> Callable[[nn.Module], float]:
    """``metric`` of the model run in bf16 on the CUDA device (:class:`DeviceCopy`)."""
    if not torch.cuda.is_available():
        raise SystemExit("--bf16-cuda needs a CUDA device")
    return lambda model: metric(DeviceCopy(model))


def compare_ranks(ranks: list[int], init: nn.Module, dense: nn.Module, row_grouping: str,
                  batches: Callable[[], Iterator], loss_fn: Callable, steps: int, calib: list,
                  distill_batches: list, metric: Callable[[nn.Module], float], fmt: str,
                  recipe: Callable[[int], tuple[dict, dict]] | None = None, jobs: int = 1,
                  extra_metrics: dict[str, Callable[[nn.Module], float]] | None = None
                  ) -> dict:
    """Per rank: (A) train from scratch with STL, (B) convert ``dense`` plain, + calibration,
    + distillation; ``metric`` of each, printed as it goes. ``recipe(rank)``: the
    ``(calib_options, distill_options)`` of :func:`convert_variants` at that rank (default:
    ``calibrate(steps=2)``, ``distill(lr=2e-4)`` on the STL parameters). ``jobs > 1`` runs
    the ranks in that many forked processes; every rank starts from the same random state,
    so a rank's numbers do not depend on ``jobs`` or on the other ranks. ``extra_metrics``
    (name → metric, e.g. ``{"bf16": bf16_cuda(metric)}``) are taken of the same models at the
    same moments; a row holds them as ``row[name] = {variant: value}``."""
    rng_state = torch.get_rng_state()
    extra_metrics = extra_metrics or {}

    def one_rank(rank: int) -> dict:
        torch.set_rng_state(rng_state)
        extras: dict[str, list[float]] = {name: [] for name in extra_metrics}

        def evaluate(model: nn.Module) -> float:
            for name, extra in extra_metrics.items():
                extras[name].append(extra(model))
            return metric(model)

        scratch = to_stl(init, rank, row_grouping)
        train(scratch, batches(), loss_fn, steps, lr=3e-3)
        row = {"scratch": evaluate(scratch)}
        calib_options, distill_options = recipe(rank) if recipe else ({}, {})
        row.update(convert_variants(dense, rank, row_grouping, calib, distill_batches,
                                    len(distill_batches), evaluate, 2e-4, calib_options,
                                    distill_options))
        for name, values in extras.items():
            row[name] = dict(zip(VARIANTS, values, strict=True))
        print(f"rank {rank}: " + ", ".join(f"{k}={v:{fmt}}" for k, v in row.items()
                                          if isinstance(v, float))
              + "".join(f"; {name}: " + ", ".join(f"{k}={v:{fmt}}" for k, v in row[name].items())
                        for name in extras), flush=True)
        return row

    if jobs <= 1:
        return {rank: one_rank(rank) for rank in ranks}
    if torch.cuda.is_available():
        # measured on an H200: the forked workers die in their first backward
        raise SystemExit("--jobs > 1 forks worker processes, which PyTorch's autograd does not "
                         "support on a CUDA machine once a backward has run (the dense "
                         "model's training did). Run one process per rank instead, e.g. "
                         "`for r in 16 24 32; do python examples/digits_vit.py --ranks $r "
                         "--out digits_r$r.json & done; wait`")
    global _RANK_JOB
    _RANK_JOB = one_rank  # forked workers inherit it; closures do not pickle
    with multiprocessing.get_context("fork").Pool(min(jobs, len(ranks))) as pool:
        rows = pool.map(_run_rank_job, ranks, chunksize=1)
    return dict(zip(ranks, rows))


_RANK_JOB: Callable[[int], dict] | None = None


def _run_rank_job(rank: int) -> dict:
    return _RANK_JOB(rank)


def report(title: str, metric: str, dense: float, results: dict, path: str, extra: dict,
           dense_extra: dict[str, float] | None = None) -> None:
    """Print the (A)/(B) table (and one per extra metric: ``dense_extra`` holds the dense
    model's value of each) and write everything to ``path``."""
    tables = [(metric, dense, {rank: row for rank, row in results.items()})]
    tables += [(f"{metric}, {name}", value, {rank: row[name] for rank, row in results.items()})
               for name, value in (dense_extra or {}).items()]
    for label, dense_value, rows in tables:
        print(f"\n{title} ({label}); dense: {dense_value:.4g}")
        print(f"{'rank':>5} {'A: scratch':>11} {'B: plain':>9} {'B: +calib':>10} "
              f"{'B: +distill':>12}")
        for rank, row in rows.items():
            print(f"{rank:>5} {row['scratch']:>11.4g} {row['plain']:>9.4g} "
                  f"{row['calibrated']:>10.4g} {row['distilled']:>12.4g}")
    if dense_extra:
        extra = {**extra, "dense_extra": dense_extra}
    with open(path, "w") as handle:
        json.dump({"metric": metric, "dense": dense, "ranks": results, **extra}, handle,
                  indent=1)
    print(f"wrote {path}")


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def commit() -> str:
    """``git rev-parse --short HEAD`` (+dirty when the tree has changes), or $STL_COMMIT."""
    if os.environ.get("STL_COMMIT"):
        return os.environ["STL_COMMIT"]
    git = lambda *a: subprocess.run(["git", *a], cwd=REPO, text=True, capture_output=True,  # noqa: E731
                                    timeout=20)
    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode:
            return "unknown (no git checkout)"
        return head.stdout.strip() + ("+dirty" if git("status", "--porcelain").stdout.strip()
                                      else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@contextlib.contextmanager
def tee_to_log(path: str | os.PathLike | None) -> Iterator[None]:
    """Inside the block, stdout and stderr also go to ``path`` (nothing when None)."""
    if path is None:
        yield
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as log:
        sys.stdout, sys.stderr = Tee(sys.__stdout__, log), Tee(sys.__stderr__, log)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__


class Tee:
    """Writes to several streams (the console and a log file)."""

    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()
