"""The package's import graph: layers point down only and there is no import circle, counting every import
statement (module level and inside functions), so a circle cannot hide behind a function-local import."""

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "qspeech"

# Lower rank = lower layer; a module may import modules of its own rank or lower, and the graph must be a DAG.
# Within the stages the order is a chain (e.g. tasks may import data, data may not import tasks).
LAYERS = [
    ("leaves", ["qspeech", "qspeech.errors", "qspeech.atomic", "qspeech.seeding", "qspeech.paper", "qspeech.checks",
                "qspeech.records", "qspeech.identity", "qspeech.distributed", "qspeech.preemption"]),
    ("quant core", ["qspeech.quant"]),
    ("loggers", ["qspeech.loggers"]),
    ("loop", ["qspeech.loop"]),
    ("upstream", ["qspeech.upstream"]),
    ("data", ["qspeech.data"]),
    ("feature cache", ["qspeech.feature_cache"]),
    ("features", ["qspeech.features"]),
    ("train", ["qspeech.train"]),
    ("cost", ["qspeech.cost"]),
    ("tasks", ["qspeech.tasks"]),
    ("schema", ["qspeech.config"]),
    ("pipeline", ["qspeech.cache_admin", "qspeech.quantize_upstream", "qspeech.export", "qspeech.results",
                  "qspeech.cost_command", "qspeech.runner", "qspeech.bench", "qspeech.pretrain", "qspeech.report",
                  "qspeech.demo", "qspeech.search"]),
    ("cli", ["qspeech.cli", "qspeech.hydra_setup", "qspeech.sweep_check", "qspeech.completion", "qspeech.__main__"]),
]


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = p
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Every qspeech module `name` imports, anywhere in the file (a `from pkg import mod` counts as pkg.mod)."""
    out = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
        for t in targets:
            while t and t not in mods:  # `import qspeech.quant.api` of a missing attr: its nearest module
                t = t.rpartition(".")[0]
            if t.startswith("qspeech") and t != name:
                out.add(t)
    return out


def _layer(name: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > best and (p != "qspeech" or name == p):
                best, rank = len(p), i
    assert rank is not None, f"{name} belongs to no layer: add it to LAYERS in tests/test_layers.py"
    return rank


@pytest.fixture(scope="module")
def graph():
    mods = _modules()
    return {m: _imports(m, p, mods) for m, p in mods.items()}


def test_every_module_has_a_layer(graph):
    for m in graph:
        _layer(m)


def test_imports_point_down(graph):
    bad = [f"{a} ({LAYERS[_layer(a)][0]}) imports {b} ({LAYERS[_layer(b)][0]})"
           for a, deps in graph.items() for b in deps if _layer(b) > _layer(a)]
    assert not bad, "upward imports:\n" + "\n".join(sorted(bad))


def test_quant_core_imports_only_torch_and_leaves(graph):
    leaves = set(LAYERS[0][1])
    core = lambda m: m == "qspeech.quant" or m.startswith("qspeech.quant.")  # noqa: E731
    bad = [f"{a} imports {b}" for a, deps in graph.items() if core(a) for b in deps if not (core(b) or b in leaves)]
    assert not bad, "\n".join(bad)


def test_no_import_circle(graph):
    # A package imports its own submodules (__init__ re-exports), so fold submodule -> own package edges away.
    edges = defaultdict(set)
    for a, deps in graph.items():
        for b in deps:
            if not a.startswith(b + "."):
                edges[a].add(b)
    state, stack, cycles = {}, [], []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(edges[n]):
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles[:10])


def test_the_check_sees_function_local_imports(tmp_path):
    # The graph builder must count imports inside functions, or circles could hide there.
    mods = {"qspeech.a": tmp_path / "a.py", "qspeech.b": tmp_path / "b.py"}
    mods["qspeech.a"].write_text("def f():\n    from qspeech.b import g\n    return g\n")
    mods["qspeech.b"].write_text("import os\n")
    assert _imports("qspeech.a", mods["qspeech.a"], mods) == {"qspeech.b"}
