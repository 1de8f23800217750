"""Layers point down only: every import of one rankserve package from another, at module level or
inside a function, must be one that docs/ARCHITECTURE.md's layer table allows. The table is read
from the doc itself, so the rule and its documentation cannot drift apart."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "rankserve"
DOC = ROOT / "docs" / "ARCHITECTURE.md"


def layer_table(doc: str) -> dict[str, set[str]]:
    """package -> the packages it may import, from the doc's ``| package | owns | may import |``
    table (rows top to bottom, highest layer first). "everything below" means every package of a
    lower row; "nothing of ours" means none."""
    rows = []
    for line in doc.split("## Layers", 1)[1].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] in ("package", "") or set(cells[0]) <= set("-: "):
            continue
        rows.append((re.findall(r"`(\w+)`", cells[0]), cells[2]))
    allowed: dict[str, set[str]] = {}
    for i, (packages, may) in enumerate(rows):
        below = {p for later, _ in rows[i + 1:] for p in later}
        if may == "everything below":
            targets = below
        elif may == "nothing of ours":
            targets = set()
        else:
            targets = {t.strip().strip("`") for t in may.split(",")}
            assert targets <= below, f"{packages} may import {targets - below}, which is not below it in the table"
        for package in packages:
            allowed[package] = targets
    return allowed


def imported_modules(path: Path, src: Path) -> list[tuple[int, str]]:
    """(line, dotted name) of everything the file imports, module-level or inside a function;
    relative imports are resolved, and ``from pkg import name`` yields ``pkg.name``."""
    package = path.relative_to(src.parent).with_suffix("").parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (base, node.module) if p)
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def upward_imports(allowed: dict[str, set[str]], src: Path = SRC) -> list[str]:
    """``path:line: A imports B`` for every import of package B from package A that A may not make."""
    bad = []
    for path in sorted(src.rglob("*.py")):
        parts = path.relative_to(src).parts
        if len(parts) < 2:
            continue  # rankserve/__init__.py belongs to no layer
        own = parts[0]
        for line, name in imported_modules(path, src):
            top, _, rest = name.partition(".")
            target = rest.split(".")[0]
            if top == src.name and (src / target).is_dir() and target != own and target not in allowed[own]:
                bad.append(f"{path.relative_to(src.parent)}:{line}: {own} imports {target}")
    return bad


def test_every_package_is_in_the_layer_table():
    packages = {p.name for p in SRC.iterdir() if (p / "__init__.py").is_file()}
    assert set(layer_table(DOC.read_text(encoding="utf-8"))) == packages


def test_no_package_imports_a_higher_layer():
    assert upward_imports(layer_table(DOC.read_text(encoding="utf-8"))) == []


def test_an_upward_import_is_caught(tmp_path):
    """The check itself can fail: upward imports inside a function, relative, or of a package by
    ``from rankserve import`` are reported; downward ones are not."""
    src = tmp_path / "rankserve"
    for package in ("core", "predict", "server"):
        (src / package).mkdir(parents=True)
        (src / package / "__init__.py").write_text("")
    (src / "predict" / "hidden.py").write_text("def f():\n    from rankserve.server import app\n")
    (src / "predict" / "relative.py").write_text("from ..core import request\nfrom .. import server\n")
    (src / "predict" / "absolute.py").write_text("import rankserve.core\nfrom rankserve import server\n")
    (src / "server" / "ok.py").write_text("from rankserve.predict import base\nfrom . import ok\n")
    allowed = {"core": set(), "predict": {"core"}, "server": {"predict", "core"}}
    assert upward_imports(allowed, src) == [
        "rankserve/predict/absolute.py:2: predict imports server",
        "rankserve/predict/hidden.py:2: predict imports server",
        "rankserve/predict/relative.py:2: predict imports server",
    ]


def test_the_table_may_not_point_up():
    doc = ("## Layers\n| package | owns | may import |\n|---|---|---|\n| `server` | x | everything below |\n"
           "| `core` | y | server |\n")
    with pytest.raises(AssertionError, match="not below it"):
        layer_table(doc)
