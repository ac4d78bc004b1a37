"""The layout DESIGN.md and the README describe: two packages, ``worker`` and ``producer``, one
subpackage per concern, no import circles, and the worker's own code never reaching into the
producer side or into the replica simulator that lives beside it (``worker.simulator``)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("worker", "producer")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every project module ``name`` imports, at the top or inside a function."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_pkg else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            # the longest known module that the target names (``a.b.c`` -> ``a.b`` if c is a name)
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    graph = {}
    for name, path in mods.items():
        deps = _imports(name, path, known)
        # a package's __init__ importing its own submodules is how it re-exports; a submodule
        # importing its package means it imports that __init__'s imports too
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                found.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    return found


def test_no_module_imports_one_that_imports_it_back() -> None:
    graph = _graph()
    # a package __init__ re-exporting a submodule is not a circle: drop package -> own child edges
    for name, deps in graph.items():
        graph[name] = {d for d in deps if not d.startswith(name + ".")}
    assert _cycles(graph) == []


def test_the_graph_check_finds_a_planted_circle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def _simulator(name: str) -> bool:
    return name == "worker.simulator" or name.startswith("worker.simulator.")


def test_worker_imports_neither_producer_nor_simulator() -> None:
    graph = _graph()
    bad = {n: sorted(d for d in deps if d.split(".")[0] == "producer" or _simulator(d))
           for n, deps in graph.items() if n.split(".")[0] == "worker" and not _simulator(n)}
    assert {n: d for n, d in bad.items() if d} == {}


def test_only_the_two_packages_stand_at_the_top() -> None:
    tops = sorted(p.parent.name for p in ROOT.glob("*/__init__.py"))
    assert tops == ["producer", "tests", "worker"]


def test_each_concern_is_a_package() -> None:
    for pkg in ("producer.cli", "producer.api", "producer.scripting", "worker.simulator", "worker.transports"):
        assert (ROOT / pkg.replace(".", "/") / "__init__.py").is_file(), pkg
    # no prefix-named modules left where a package now stands
    leftovers = [p.name for p in (ROOT / "producer").glob("*.py")
                 if p.name.startswith(("cli_", "api_", "schedule")) or p.name in ("runs.py", "timing.py", "scripts.py")]
    assert leftovers == []
    assert not list((ROOT / "worker").glob("simulator*.py"))


def test_modules_import() -> None:
    import importlib

    for name in ("producer.cli", "producer.api", "producer.scripting.tasks", "worker.simulator", "worker.tasks"):
        importlib.import_module(name)
