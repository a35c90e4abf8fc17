"""The package's layers (docs/architecture.md): import-linter's contracts in pyproject.toml hold, and no
module dodges them with an import inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parent.parent


def test_layer_contracts_are_kept(capsys):
    code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    assert code == 0, capsys.readouterr().out[-4000:]


def late_zoo_imports(path: Path) -> list[str]:
    """The zoo modules that `path` imports inside a function."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for inner in ast.walk(node):
                names = [inner.module or ""] if isinstance(inner, ast.ImportFrom) else \
                    [a.name for a in inner.names] if isinstance(inner, ast.Import) else []
                found += [n for n in names if n == "zoo" or n.startswith("zoo.")]
    return found


def test_no_zoo_import_inside_a_function():
    """An import inside a function hides an edge from the contracts; only optional dependencies may be late."""
    late = {(p.relative_to(ROOT).as_posix(), m) for p in (ROOT / "zoo").rglob("*.py") for m in late_zoo_imports(p)}
    assert not late, sorted(late)


def test_late_import_scan_sees_one(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import os\n\ndef f():\n    from zoo.model import build\n    import zoo.cli\n    import json\n")
    assert late_zoo_imports(path) == ["zoo.model", "zoo.cli"]
