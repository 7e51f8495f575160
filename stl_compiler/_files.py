"""Atomic output: build every artifact in a staging directory, move it into place at the end.

A failed or interrupted export leaves the destination as it was: nothing half-written.
A leaf module (standard library only): the exporters, the CLI and ``runtime.ort`` (optimized
ONNX Runtime models) all write through it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def existing_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a Path, or a FileNotFoundError that names ``what`` it should be."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}" +
                                (" (it is a directory)" if path.is_dir() else ""))
    return path


def writable_parent(path: str | os.PathLike) -> Path:
    """Create the parent directory of ``path`` if needed; fail clearly if it is not writable."""
    path = Path(path)
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PermissionError(f"cannot create the output directory {parent}: "
                              f"{err.strerror or err}") from err
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"the output directory {parent} is not writable")
    return path


def output_file(path: str | os.PathLike) -> Path:
    """:func:`writable_parent` for a file output, which must not be an existing directory."""
    path = writable_parent(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory: give the path of the file to write")
    return path


@contextlib.contextmanager
def staged(path: str | os.PathLike) -> Iterator[Path]:
    """Yield ``staging / path.name``; on success move what the caller wrote beside it.

    The caller writes its artifact (a file or a directory) at the yielded path, plus any
    sibling files it needs (e.g. ``model.onnx.data``) in the same staging directory. On a
    clean exit every staged entry replaces its namesake in ``path.parent``; on an exception
    the staging directory is deleted and the destination is untouched.
    """
    path = writable_parent(path)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial",
                                        dir=path.parent))
    except OSError as err:
        raise PermissionError(f"cannot write in the output directory {path.parent}: "
                              f"{err.strerror or err}") from err
    try:
        yield staging / path.name
        for entry in sorted(staging.iterdir(), key=lambda p: p.name == path.name):
            _replace(entry, path.parent / entry.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _replace(source: Path, target: Path) -> None:
    """Move ``source`` onto ``target`` (a file or a directory), replacing what was there."""
    if target.is_dir() and not target.is_symlink():
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old",
                                      dir=target.parent))
        os.replace(target, trash / target.name)
        os.replace(source, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(source, target)
