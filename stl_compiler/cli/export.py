"""``stl-compiler export``: convert a model to STL and export it for deployment.

::

    stl-compiler export --model mypkg.models:make_model --input-shape 2x16x64 \\
        --format onnx --out model.onnx [--config stl.json --checkpoint calibrated.pt \\
        --basis auto|fitted|FILE.safetensors --rank 24 --tile 4 --fp16 --force]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

FORMATS = ("onnx", "aoti", "tensorrt", "triton")
_DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "bool")
#: Options that only some formats use: (attribute, flag, formats, why it does not apply).
_FORMAT_OPTIONS = (
    ("max_shape", "--max-shape", ("tensorrt",),
     "it sets a TensorRT engine's shape profile; ONNX graphs and AOTInductor packages take "
     "any size on their dynamic dims"),
    ("opset", "--opset", ("onnx", "tensorrt", "triton"), "an AOTInductor package has no ONNX"),
    ("name", "--name", ("triton",), "it names the Triton model directory"),
)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``export`` subcommand."""
    parser = subparsers.add_parser(
        "export", help="convert a model to STL and export it (ONNX, AOTInductor, TensorRT, "
                       "Triton repository)",
        description="Build a model from a factory, convert its matmuls to STL with "
                    "stl_compile, and export it. Progress and timings go to stderr; every "
                    "error is one line on stderr with exit code 2.")
    parser.add_argument("--model", required=True, metavar="MODULE:FACTORY",
                        help="a function returning the nn.Module, called without arguments: "
                             "an import path (mypkg.models:make_model; the current directory "
                             "is on the path) or a Python file (./models.py:make_model)")
    parser.add_argument("--input-shape", required=True, action="append", metavar="SHAPE",
                        help="shape of an example input, e.g. 2x16x64 (repeat per input, in "
                             "forward's order); use sizes >= 2 on dynamic dims")
    parser.add_argument("--input-dtype", action="append", choices=_DTYPES, metavar="DTYPE",
                        help=f"dtype of each input ({', '.join(_DTYPES)}; default float32; "
                             "one value applies to all inputs). Integer inputs are all ones "
                             "(valid token ids and attention masks)")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, type=Path,
                        help="output file (.onnx, .pt2, .plan) or, for --format triton, the "
                             "model repository directory")
    parser.add_argument("--config", type=Path, metavar="JSON",
                        help="an STLConfig saved as JSON (json.dump(config.to_dict(), f)); its "
                             "basis may be a name, the basis itself, or a .safetensors path "
                             "(relative to the JSON file). --tile/--rank/--basis/--min-dim "
                             "override it")
    parser.add_argument("--checkpoint", type=Path, metavar="FILE",
                        help="state_dict (torch.save) of the model after swap_linears_ with the "
                             "same config, then calibrate / distill: loaded into the factory's "
                             "model converted with swap_linears_")
    parser.add_argument("--tile", type=int, default=None,
                        help="tile side t (default 4, or the basis file's)")
    parser.add_argument("--rank", type=int, default=None,
                        help="tensor rank r (default 24, or the basis file's)")
    parser.add_argument("--basis", default=None, metavar="NAME|FILE",
                        help="auto (per site: fitted-bf16 for bf16 / fp16 weights, and "
                             "for every site with --fp16; fitted otherwise) | fitted | "
                             "fitted-bf16 (for --fp16 / bf16 deployment) | dps48 | strassen | "
                             "strassen-pruned | naive | random, or a basis file (.safetensors, "
                             "from stl-compiler fit-basis or STLBasis.save); default: the "
                             "--config's basis, else auto")
    parser.add_argument("--min-dim", type=int, default=None,
                        help="keep sites with a dim below this dense (default: STLConfig's)")
    parser.add_argument("--fp16", action="store_true", help="export in float16")
    parser.add_argument("--opset", type=int, default=None,
                        help="ONNX opset (formats onnx, tensorrt, triton; default 18)")
    parser.add_argument("--max-shape", action="append", metavar="SHAPE",
                        help="tensorrt: largest input shape of the engine profile, per input "
                             "(default: 4x the example on dynamic dims)")
    parser.add_argument("--name", default=None,
                        help="triton: model name (default: the factory's name)")
    parser.add_argument("--force", action="store_true", help="overwrite existing output")
    parser.set_defaults(func=run)
    return parser


def _note(message: str) -> None:
    print(f"[stl-compiler] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _step(message: str) -> Iterator[None]:
    """Progress lines on stderr around a long step, with its duration."""
    _note(f"{message} ...")
    start = time.perf_counter()
    yield
    _note(f"{message}: done in {time.perf_counter() - start:.1f} s")


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Warnings (ours, the model's) as ``[stl-compiler] warning: ...`` lines, without the
    source line Python would print under them."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        _note(f"warning: {category.__name__}: {message}")

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def _quote(err: BaseException) -> str:
    """``RuntimeError at models.py:9: message``: one line about an error in the user's code."""
    frames = traceback.extract_tb(err.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    first = (str(err).strip().splitlines() or [""])[0][:300]
    return f"{type(err).__name__}{where}: {first}"


def _parse_shape(text: str, flag: str = "--input-shape") -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.replace(",", "x").split("x"))
    except ValueError:
        raise ValueError(f"bad {flag} {text!r}: write sizes separated by x, e.g. 2x16x64") \
            from None
    if not shape or min(shape) < 1:
        raise ValueError(f"bad {flag} {text!r}: sizes must be >= 1")
    return shape


def _example_inputs(shapes: list[str], dtypes: list[str] | None) -> tuple[torch.Tensor, ...]:
    dtypes = dtypes or ["float32"]
    if len(dtypes) == 1:
        dtypes = dtypes * len(shapes)
    if len(dtypes) != len(shapes):
        raise ValueError(f"give one --input-dtype, or one per --input-shape ({len(shapes)}), "
                         f"got {len(dtypes)}")
    inputs = []
    for shape, name in zip(map(_parse_shape, shapes), dtypes):
        dtype = getattr(torch, name)
        inputs.append(torch.randn(shape, dtype=dtype) if dtype.is_floating_point
                      else torch.ones(shape, dtype=dtype))
    return tuple(inputs)


def _is_path(text: str) -> bool:
    """A --model source or a basis given as a file rather than a module / basis name."""
    return text.endswith((".py", ".safetensors")) or "/" in text or os.sep in text


def _import_source(source: str) -> Any:
    """The module holding the factory: a .py file, or an import path (cwd on sys.path)."""
    from .._files import existing_file

    if _is_path(source):
        path = existing_file(source, "--model file").resolve()
        name = f"_stl_compiler_model_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ValueError(f"--model {source}: not a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickling look the module up by name
        sys.path.insert(0, str(path.parent))  # its sibling modules import as in a script
        try:
            spec.loader.exec_module(module)
        except Exception as err:  # noqa: BLE001 - the user's code: reported in one line
            sys.modules.pop(name, None)
            raise ValueError(f"--model: running {path} failed: {_quote(err)}") from err
        finally:
            sys.path.remove(str(path.parent))
        return module
    sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(source)
    except ImportError as err:
        raise ValueError(f"cannot import {source!r} for --model: {err}") from err
    except Exception as err:  # noqa: BLE001 - the user's code: reported in one line
        raise ValueError(f"--model: importing {source!r} failed: {_quote(err)}") from err
    finally:
        sys.path.remove(os.getcwd())


def _load_model(spec: str) -> torch.nn.Module:
    source, sep, attr = spec.rpartition(":")
    if not sep or not source or not attr:
        raise ValueError(f"--model must look like package.module:factory or "
                         f"path/to/file.py:factory, got {spec!r}")
    module = _import_source(source)
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"{source!r} has no callable {attr!r} for --model")
    try:
        model = factory()
    except Exception as err:  # noqa: BLE001 - the user's code: reported in one line
        raise ValueError(f"--model {spec}: the factory raised {_quote(err)}") from err
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"--model factory {spec} returned {type(model).__name__}, not an "
                        "nn.Module")
    return model.eval()


def _load_basis(path: str | os.PathLike, flag: str) -> Any:
    from .. import bases

    try:
        return bases.load(path)
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"{flag}: {err}") from None


def _read_config(path: Path) -> dict[str, Any]:
    """The JSON of ``STLConfig.to_dict()``; a basis path in it is relative to the file."""
    from .._files import existing_file

    existing_file(path, "--config file")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"--config {path} is not JSON ({err}); write it with "
                         "json.dump(config.to_dict(), f)") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path} holds a JSON {type(data).__name__}, not the object "
                         "of STLConfig.to_dict()")
    basis = data.get("basis")
    if isinstance(basis, str) and _is_path(basis):
        data["basis"] = _load_basis(path.parent / basis, f"--config {path} basis")
    return data


def _tile_support(basis: Any, tile: Any, rank: Any) -> str | None:
    """Why the named ``basis`` has nothing for ``tile`` / ``rank``, and what the CLI can do
    instead; None when that is not the problem."""
    from .. import bases

    if not isinstance(basis, str) or not isinstance(tile, int) or tile < 2:
        return None
    rank_text = "R" if rank is None else rank
    others = (f"--basis naive or random (any tile >= 2), or a basis file fitted for it "
              f"(stl-compiler fit-basis --tile {tile} --rank {rank_text} --init random --out "
              "FILE, then --basis FILE)")
    if basis in ("strassen", "strassen-pruned") and tile & (tile - 1):
        return f"--basis {basis} needs a power-of-two --tile (2, 4, 8, ...), got {tile}; use " \
               + others
    # the shipped conditionings each name needs ("auto" picks one per site, by its dtype)
    conditionings = {"fitted": (None,), "fitted-bf16": ("bf16",), "auto": (None, "bf16")}
    if basis not in conditionings:
        return None

    def fitted_ranks(t: int) -> list[int]:
        return sorted(set.intersection(*(set(bases.fitted_ranks(t, c))
                                         for c in conditionings[basis])))

    shipped_ranks = fitted_ranks(tile)
    if not shipped_ranks or rank is not None and rank not in shipped_ranks:
        shipped = {t: ranks for t in range(2, 17) if (ranks := fitted_ranks(t))}
        listing = "; ".join(f"tile {t}: ranks {', '.join(map(str, r))}"
                            for t, r in shipped.items())
        asked = f"--tile {tile}" + ("" if rank is None or not shipped_ranks else
                                    f" --rank {rank}")
        what = (f"{basis} basis" if basis != "auto" else
                "fitted and fitted-bf16 basis (basis auto, the default, picks one per site)")
        return f"no {what} ships for {asked} (shipped: {listing}); pick a shipped tile " \
               f"and rank, or use {others}"
    return None


def _fp16_basis(data: dict[str, Any]) -> None:
    """With --fp16 the model converts in float32 and deploys in float16, so basis "auto" (the
    default, by the dtype at conversion) would pick the float32 bases: use the bf16-conditioned
    ones (they serve fp16 as well, docs/quality.md) wherever the config says "auto"."""
    if data.get("basis", "auto") == "auto":
        data["basis"] = "fitted-bf16"
        _note("--fp16: basis auto -> fitted-bf16 (the bf16-conditioned bases, for float16 "
              "deployment)")
    overrides = data.get("overrides")
    if isinstance(overrides, Mapping):
        data["overrides"] = {
            pattern: {**override, "basis": "fitted-bf16"}
            if isinstance(override, Mapping) and override.get("basis") == "auto" else override
            for pattern, override in overrides.items()}


def _config(args: argparse.Namespace) -> Any:
    """The STLConfig of --config, overridden by --tile / --rank / --basis / --min-dim; with
    --fp16, basis "auto" becomes "fitted-bf16" (:func:`_fp16_basis`)."""
    from ..bases import STLBasis
    from ..config import STLConfig

    data = _read_config(args.config) if args.config is not None else {}
    given = {key: getattr(args, key) for key in ("tile", "rank", "min_dim")
             if getattr(args, key) is not None}
    if args.basis is not None:
        data["basis"] = (_load_basis(args.basis, "--basis") if _is_path(args.basis)
                         else args.basis)
    if args.fp16:
        _fp16_basis(data)
    basis = data.get("basis")
    if isinstance(basis, STLBasis):  # the basis fixes the tile and the rank
        for key in ("tile", "rank"):
            if key in given and given[key] != getattr(basis, key):
                raise ValueError(f"--{key} {given[key]} but the basis {basis.name!r} has {key} "
                                 f"{getattr(basis, key)}: drop --{key} or give a basis of "
                                 f"{key} {given[key]}")
            data[key] = getattr(basis, key)
    data.update(given)
    try:
        return STLConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        problem = _tile_support(data.get("basis", STLConfig.basis),
                                data.get("tile", STLConfig.tile), data.get("rank"))
        source = f"--config {args.config} with the options given" if args.config else \
            "the options given"
        raise ValueError(problem or f"{source} make no valid STLConfig: {err}") from None


def _load_checkpoint(model: torch.nn.Module, path: Path, config: Any) -> None:
    """Convert ``model`` with ``swap_linears_(config)`` and load the calibrated state."""
    from .._files import existing_file
    from ..convert import swap_linears_

    existing_file(path, "--checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise ValueError(f"--checkpoint {path} is not a torch state_dict file (save one with "
                         f"torch.save(model.state_dict(), path)): {_quote(err)}") from None
    if not isinstance(state, Mapping) or \
            not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"--checkpoint {path} holds a {type(state).__name__}, not a state_dict "
                         "(save one with torch.save(model.state_dict(), path))")
    swap_linears_(model, config)
    fix = ("convert with the config used before calibration (--config, or the same --tile / "
           "--rank / --basis / --min-dim)")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # size mismatches
        detail = "; ".join(line.strip() for line in str(err).splitlines()[1:4])
        raise ValueError(f"--checkpoint {path} does not fit the model converted with this "
                         f"config: {detail}; {fix}") from None
    if missing or unexpected:
        raise ValueError(f"--checkpoint {path} does not fit the model converted with this "
                         f"config: missing keys {list(missing)[:4]}, unexpected keys "
                         f"{list(unexpected)[:4]}; {fix}")
    model.eval()


def _convert(model: torch.nn.Module, inputs: tuple, config: Any) -> torch.nn.Module:
    """The one place the CLI converts a model to STL."""
    from ..api import stl_compile
    from ..capture import CaptureError

    try:
        converted = stl_compile(model, inputs, config, backend="eager")
    except CaptureError as err:
        raise ValueError(f"stl_compile could not capture the model: {err}") from err
    report = converted.stl_report
    error = "" if report.model_rel_error is None else \
        f" (model output relative error {report.model_rel_error:.3g} on the example)"
    _note(f"{len(report.converted)} of {len(report.sites)} matmul sites converted to STL{error}")
    reasons: dict[str, int] = {}
    for site in report.skipped:
        reasons[site.reason] = reasons.get(site.reason, 0) + 1
    for reason, count in reasons.items():
        _note(f"  left dense ({count} site{'s' * (count > 1)}): {reason}")
    return converted


def _check_output(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to overwrite it")


def _check_options(args: argparse.Namespace) -> None:
    """Options the format cannot use: a warning line each; an unsupported --opset: an error."""
    from ..exporters.onnx import supported_opsets

    for attr, flag, formats, why in _FORMAT_OPTIONS:
        if getattr(args, attr) is not None and args.format not in formats:
            _note(f"warning: {flag} is ignored for --format {args.format}: {why}")
    opsets = supported_opsets()
    if args.opset is not None and args.format != "aoti" and args.opset not in opsets:
        raise ValueError(f"--opset {args.opset} is not supported: this torch's ONNX exporter "
                         f"writes opsets {opsets.start} to {opsets.stop - 1}")


def _max_shapes(texts: list[str] | None, inputs: tuple) -> list[tuple[int, ...]] | None:
    """--max-shape parsed and checked against the examples: one per input, same rank, each
    dim at least the example's."""
    if texts is None:
        return None
    if len(texts) != len(inputs):
        raise ValueError(f"give one --max-shape per --input-shape ({len(inputs)}), got "
                         f"{len(texts)}")
    shapes = [_parse_shape(text, "--max-shape") for text in texts]
    for i, (shape, example) in enumerate(zip(shapes, inputs)):
        if len(shape) != example.dim() or any(m < e for m, e in zip(shape, example.shape)):
            raise ValueError(f"--max-shape {texts[i]} must have the rank of input {i}'s "
                             f"--input-shape {'x'.join(map(str, example.shape))} and no "
                             "smaller size")
    return shapes


def _profile(onnx_path: Path, inputs: tuple, max_shapes: list[tuple[int, ...]] | None
             ) -> tuple[dict, dict, dict]:
    """TensorRT profile: dynamic dims from 1 (min) over the example (opt) to --max-shape."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    names = [value.name for value in graph.input]
    dynamic = {value.name: [not d.HasField("dim_value") for d in value.type.tensor_type.shape.dim]
               for value in graph.input}
    low, opt, high = {}, {}, {}
    for i, (name, example) in enumerate(zip(names, inputs)):
        flags = dynamic[name]
        opt[name] = tuple(example.shape)
        low[name] = tuple(1 if dyn else s for s, dyn in zip(example.shape, flags))
        high[name] = (max_shapes[i] if max_shapes else
                      tuple(4 * s if dyn else s for s, dyn in zip(example.shape, flags)))
        fixed = [axis for axis, dyn in enumerate(flags) if not dyn and
                 high[name][axis] != example.shape[axis]]
        if fixed:
            raise ValueError(f"--max-shape of input {name!r} changes dims {fixed}, which the "
                             f"exported model fixed to the example's sizes "
                             f"{'x'.join(map(str, example.shape))}")
    return low, opt, high


def run(args: argparse.Namespace) -> int:
    """Load, convert, export; the output appears only when every step succeeded."""
    from ..capture import check_runs_on_example
    from ..exporters._quiet import quiet_torch_internals

    name = args.name or args.model.rpartition(":")[2]
    out: Path = args.out
    _check_output(out / name if args.format == "triton" else out, args.force)
    _check_options(args)
    if args.format == "tensorrt":
        from ..exporters.tensorrt import _import_tensorrt

        _import_tensorrt()  # fail before the slow steps when TensorRT is missing
    config = _config(args)
    inputs = _example_inputs(args.input_shape, args.input_dtype)
    max_shapes = _max_shapes(args.max_shape, inputs) if args.format == "tensorrt" else None
    with _one_line_warnings(), quiet_torch_internals():
        with _step(f"loading {args.model}"):
            model = _load_model(args.model)
            if args.checkpoint is not None:
                _load_checkpoint(model, args.checkpoint, config)
            check_runs_on_example(model, inputs, {}, fix="give one --input-shape (and "
                                  "--input-dtype) per input of forward, as it expects them")
        with _step("converting to STL (stl_compile)"):
            model = _convert(model, inputs, config)
        _export(args, model, inputs, max_shapes, name)
    print(f"wrote {out / name if args.format == 'triton' else out}")
    return 0


def _export(args: argparse.Namespace, model: torch.nn.Module, inputs: tuple,
            max_shapes: list[tuple[int, ...]] | None, name: str) -> None:
    from ..exporters import (
        build_tensorrt_engine,
        export_aoti,
        export_onnx,
        write_triton_model_repository,
    )

    out: Path = args.out
    dtype = torch.float16 if args.fp16 else None
    if args.format == "aoti":
        with _step(f"compiling the AOTInductor package {out}"):
            export_aoti(model, inputs, out, dtype=dtype)
    elif args.format == "onnx":
        with _step(f"exporting ONNX {out}"):
            export_onnx(model, inputs, out, dtype=dtype, opset=args.opset)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = Path(tmp) / f"{name}.onnx"
            with _step("exporting ONNX"):
                export_onnx(model, inputs, onnx_path, dtype=dtype, opset=args.opset)
            if args.format == "triton":
                with _step(f"writing the Triton model repository {out / name}"):
                    write_triton_model_repository(onnx_path, out, name, overwrite=args.force)
            else:
                low, opt, high = _profile(onnx_path, inputs, max_shapes)
                with _step(f"building the TensorRT engine {out}"):
                    build_tensorrt_engine(onnx_path, out, fp16=args.fp16, min_shapes=low,
                                          opt_shapes=opt, max_shapes=high)
