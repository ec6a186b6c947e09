"""The package's shape, checked: files and functions a reader can hold in their head, no private name borrowed
from another module, and qspeech's own modules imported at the top of a file (a function-local import hides a
dependency; only heavy or optional third-party packages are imported where used)."""

import ast
from pathlib import Path


PKG = Path(__file__).resolve().parent.parent / "qspeech"
MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 60


def _files():
    return sorted(p for p in PKG.rglob("*.py"))


def _rel(p: Path) -> str:
    return str(p.relative_to(PKG.parent))


def _functions(tree):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_file_over_450_lines():
    long = {_rel(p): n for p in _files() if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert not long, long


def test_no_function_over_60_lines():
    long = {f"{_rel(p)}:{f.name}": f.end_lineno - f.lineno + 1 for p in _files()
            for f in _functions(ast.parse(p.read_text())) if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES}
    assert not long, long


def test_no_private_name_imported_from_another_module():
    found = []
    for p in _files():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qspeech"):
                found += [f"{_rel(p)}: {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert not found, found


def test_qspeech_modules_are_imported_at_module_level():
    local = []
    for p in _files():
        for f in _functions(ast.parse(p.read_text())):
            for node in ast.walk(f):
                if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("qspeech")):
                    local.append(f"{_rel(p)}:{f.name}: {node.module}")
                elif isinstance(node, ast.Import) and any(a.name.startswith("qspeech") for a in node.names):
                    local.append(f"{_rel(p)}:{f.name}: {node.names[0].name}")
    assert not local, local
