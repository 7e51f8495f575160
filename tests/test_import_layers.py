"""Import direction: a module may import its own layer or lower ones, never a higher one; the
scripts outside the package (tools/, benchmarks/, examples/) import none of its private names.

Layers, highest first (docs/compiler.md, "Import direction"): the front ends (``api``,
``cli``, ``exporters``, ``convert``, ...) → ``passes`` → ``nn`` / ``functional`` →
``runtime`` → the leaves (``bases``, ``tiling``, ``config``, ``report``, ``capture``,
``_files``). Every import is checked, function-level ones included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

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


# --- scripts outside the package use its public names only ----------------------------------

ROOT = Path(__file__).resolve().parents[1]


def _private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def private_names(path: Path) -> list[str]:
    """``line: name`` of every private stl_compiler name ``path`` imports or reads: a module
    or name with a leading underscore in an import, or an underscore attribute of a name bound
    by an stl_compiler import (``fit.calibrate._capture``)."""
    tree = ast.parse(path.read_text(), str(path))
    bound, found = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and not node.level and node.module \
                and node.module.split(".")[0] == "stl_compiler":
            for alias in node.names:
                if any(map(_private, [*node.module.split("."), alias.name])):
                    found.add((node.lineno, f"{node.module}.{alias.name}"))
                bound.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "stl_compiler":
                    if any(map(_private, parts)):
                        found.add((node.lineno, alias.name))
                    bound.add(alias.asname or parts[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain, base = [node.attr], node.value
            while isinstance(base, ast.Attribute):
                chain.append(base.attr)
                base = base.value
            if isinstance(base, ast.Name) and base.id in bound and any(map(_private, chain)):
                found.add((node.lineno, ".".join([base.id, *reversed(chain)])))
    return [f"{line}: {name}" for line, name in sorted(found)]


def scripts_using_private_names(folder: Path) -> list[str]:
    return [f"{path.relative_to(folder.parent)}:{use}" for path in sorted(folder.rglob("*.py"))
            for use in private_names(path)]


@pytest.mark.parametrize("folder", ["tools", "benchmarks", "examples"])
def test_scripts_use_public_names_only(folder):
    """tools/, benchmarks/ and examples/ are users of the package: what they need is public
    (documented, kept working), so a refactor of a private helper cannot break them."""
    assert scripts_using_private_names(ROOT / folder) == []


def test_private_name_checker_sees_each_form(tmp_path):
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "t.py").write_text(
        "import stl_compiler\n"
        "import stl_compiler._files\n"
        "from stl_compiler import fit, stl_compile\n"
        "from stl_compiler.fit._progress import Progress\n"
        "from stl_compiler.fit.fitting import _als, als\n"
        "fit.calibrate._capture(None)\n"
        "print(stl_compiler.__version__, fit.calibrate.calibrate_layer)\n")
    assert scripts_using_private_names(tmp_path / "tools") == [
        "tools/t.py:2: stl_compiler._files",
        "tools/t.py:4: stl_compiler.fit._progress.Progress",
        "tools/t.py:5: stl_compiler.fit.fitting._als",
        "tools/t.py:6: fit.calibrate._capture"]
