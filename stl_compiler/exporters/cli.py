"""``stl-compiler export``: convert a model to STL and export it for deployment.

::

    stl-compiler export --model mypkg.models:make_model --input-shape 2x16x64 \\
        --format onnx --out model.onnx [--rank 24 --tile 4 --basis fitted --fp16 --force]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

FORMATS = ("onnx", "aoti", "tensorrt", "triton")
_DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "bool")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``export`` subcommand."""
    parser = subparsers.add_parser(
        "export", help="convert a model to STL and export it (ONNX, AOTInductor, TensorRT, "
                       "Triton repository)",
        description="Build a model from a factory, convert its matmuls to STL with "
                    "stl_compile, and export it. Progress goes to stderr.")
    parser.add_argument("--model", required=True, metavar="MODULE:FACTORY",
                        help="import path of a function returning the nn.Module, e.g. "
                             "mypkg.models:make_model")
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
    parser.add_argument("--tile", type=int, default=4, help="tile side t (default 4)")
    parser.add_argument("--rank", type=int, default=24, help="tensor rank r (default 24)")
    parser.add_argument("--basis", default="fitted",
                        help="fitted | strassen | strassen-pruned | naive | random (default "
                             "fitted)")
    parser.add_argument("--min-dim", type=int, default=None,
                        help="keep sites with a dim below this dense (default: STLConfig's)")
    parser.add_argument("--fp16", action="store_true", help="export in float16")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset")
    parser.add_argument("--max-shape", action="append", metavar="SHAPE",
                        help="tensorrt: largest input shape of the engine profile, per input "
                             "(default: 4x the example on dynamic dims)")
    parser.add_argument("--name", default=None,
                        help="triton: model name (default: the factory's name)")
    parser.add_argument("--force", action="store_true", help="overwrite existing output")
    parser.set_defaults(func=run)
    return parser


@contextlib.contextmanager
def _step(message: str) -> Iterator[None]:
    """Progress lines on stderr around a long step."""
    print(f"[stl-compiler] {message} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield
    print(f"[stl-compiler] {message}: done in {time.perf_counter() - start:.1f} s",
          file=sys.stderr, flush=True)


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.replace(",", "x").split("x"))
    except ValueError:
        raise ValueError(f"bad shape {text!r}: write sizes separated by x, e.g. 2x16x64") \
            from None
    if not shape or min(shape) < 1:
        raise ValueError(f"bad shape {text!r}: sizes must be >= 1")
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


def _load_model(spec: str) -> torch.nn.Module:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--model must look like package.module:factory, got {spec!r}")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"cannot import {module_name!r} for --model: {err}") from err
    finally:
        sys.path.remove(os.getcwd())
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"{module_name!r} has no callable {attr!r} for --model")
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"--model factory {spec} returned {type(model).__name__}, not an "
                        "nn.Module")
    return model.eval()


def _convert(model: torch.nn.Module, inputs: tuple, args: argparse.Namespace
             ) -> torch.nn.Module:
    """The one place the CLI converts a model to STL."""
    from ..api import stl_compile
    from ..config import STLConfig

    options = {} if args.min_dim is None else {"min_dim": args.min_dim}
    config = STLConfig(tile=args.tile, rank=args.rank, basis=args.basis, **options)
    converted = stl_compile(model, inputs, config, backend="eager")
    report = converted.stl_report
    print(f"[stl-compiler] {len(report.converted)} of {len(report.sites)} matmul sites "
          f"converted to STL", file=sys.stderr)
    return converted


def _check_output(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to overwrite it")


def _profile(onnx_path: Path, inputs: tuple, max_shapes: list[str] | None
             ) -> tuple[dict, dict, dict]:
    """TensorRT profile: dynamic dims from 1 (min) over the example (opt) to --max-shape."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    names = [value.name for value in graph.input]
    dynamic = {value.name: [not d.HasField("dim_value") for d in value.type.tensor_type.shape.dim]
               for value in graph.input}
    if max_shapes is not None and len(max_shapes) != len(names):
        raise ValueError(f"give one --max-shape per input ({len(names)}), got {len(max_shapes)}")
    low, opt, high = {}, {}, {}
    for i, (name, example) in enumerate(zip(names, inputs)):
        flags = dynamic[name]
        opt[name] = tuple(example.shape)
        low[name] = tuple(1 if dyn else s for s, dyn in zip(example.shape, flags))
        high[name] = (_parse_shape(max_shapes[i]) if max_shapes else
                      tuple(4 * s if dyn else s for s, dyn in zip(example.shape, flags)))
    return low, opt, high


def run(args: argparse.Namespace) -> int:
    """Load, convert, export; the output appears only when every step succeeded."""
    from . import (
        build_tensorrt_engine,
        export_aoti,
        export_onnx,
        write_triton_model_repository,
    )

    name = args.name or args.model.rpartition(":")[2]
    out: Path = args.out
    _check_output(out / name if args.format == "triton" else out, args.force)
    if args.format == "tensorrt":
        from .tensorrt import _import_tensorrt

        _import_tensorrt()  # fail before the slow steps when TensorRT is missing
    inputs = _example_inputs(args.input_shape, args.input_dtype)
    with _step(f"loading {args.model}"):
        model = _load_model(args.model)
    with _step("converting to STL (stl_compile)"):
        model = _convert(model, inputs, args)
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
                low, opt, high = _profile(onnx_path, inputs, args.max_shape)
                with _step(f"building the TensorRT engine {out}"):
                    build_tensorrt_engine(onnx_path, out, fp16=args.fp16, min_shapes=low,
                                          opt_shapes=opt, max_shapes=high)
    print(f"wrote {out / name if args.format == 'triton' else out}")
    return 0
