"""Import direction: a module may import its own layer or lower ones, never a higher one.

Layers, highest first (docs/compiler.md, "Import direction"): the front ends (``api``,
``cli``, ``exporters``, ``convert``, ...) → ``passes`` → ``nn`` / ``functional`` →
``runtime`` → the leaves (``bases``, ``tiling``, ``config``, ``report``, ``capture``,
``_files``). Every import is checked, function-level ones included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import stl_compiler

PACKAGE = Path(stl_compiler.__file__).parent

#: top-level module / subpackage → layer (higher numbers may import lower ones)
LAYERS = {
    "bases": 0, "tiling": 0, "config": 0, "report": 0, "capture": 0, "_files": 0,
    "runtime": 1,
    "nn": 2, "functional": 2,
    "passes": 3,
}
FRONT = 4  # api, cli, exporters, convert, generation, fit, demo, models, ...


def _layer(top: str) -> int:
    return LAYERS.get(top, FRONT)


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, top-level stl_compiler module)`` of every intra-package import in ``path``."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = [*base, *(node.module.split(".") if node.module else [])]
                if not target:  # ``from . import x`` at the package root
                    target = [alias.name for alias in node.names][:1]
            elif node.module and node.module.split(".")[0] == "stl_compiler":
                target = node.module.split(".")[1:] or [alias.name for alias in node.names][:1]
            else:
                continue
            found.append((node.lineno, target[0]))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[1]) for alias in node.names
                      if alias.name.startswith("stl_compiler.")]
    return found


def backward_imports() -> list[str]:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if own == "__init__":
            continue  # the package root re-exports the public API
        for line, top in _imports(path):
            if _layer(top) > _layer(own):
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({own}) imports {top}")
    return bad


def test_no_backward_imports():
    assert backward_imports() == []


def test_checker_sees_a_backward_import(tmp_path, monkeypatch):
    """The checker itself can fail: a runtime module importing passes is caught."""
    fake = tmp_path / "stl_compiler"
    (fake / "runtime").mkdir(parents=True)
    (fake / "runtime" / "bad.py").write_text("from ..passes import PASSES\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert backward_imports() == ["stl_compiler/runtime/bad.py:1 (runtime) imports passes"]
