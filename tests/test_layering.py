"""The package's import layering (docs/architecture.md) holds: no cycles, no upward imports, and method
packages never import each other. Every ``import`` in ``src/oodforge`` counts, the lazy ones inside
functions included, since a lazy upward import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "oodforge"

#: lowest first; a module may import its own layer or lower ones
LAYERS = [
    {"", "progress", "metrics", "selective", "intervals", "checks", "outdir"},
    {"data"},
    {"models"},
    {"detectors", "outliers", "hub"},
    {"synth", "ssod", "oe", "synood", "recipes"},  # method packages: never each other
    {"bench", "keys", "protocol", "report", "zoo"},
    {"workflows", "demo", "deploy", "api"},  # api: oodforge.fit / evaluate / guard (the root re-exports it lazily)
    {"cli"},  # and every package's own cli.py (the command functions cli.py wires)
]
METHODS = LAYERS[4]


def _modules() -> dict[str, tuple[Path, bool]]:
    mods = {}
    for p in ROOT.rglob("*.py"):
        parts = list(p.relative_to(ROOT.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the oodforge modules it imports (``from pkg import name`` counts as ``pkg.name`` when that
    is a module)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, (path, is_pkg) in mods.items():
        pkg = m if is_pkg else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in mods else src for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            graph[m] |= {t for t in targets if t in mods and t != m}
    return graph


def layer_of(module: str) -> int:
    parts = module.split(".")
    if parts[-1] == "cli":
        return len(LAYERS) - 1
    top = parts[1] if len(parts) > 1 else ""
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS and docs/architecture.md")


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_upward_imports_and_no_imports_between_method_packages():
    bad = []
    for m, targets in import_graph().items():
        for t in targets:
            if layer_of(t) > layer_of(m):
                bad.append(f"{m} imports {t} (a higher layer)")
            elif (layer_of(m) == layer_of(t) == 4 and _package(m) != _package(t)
                  and _package(m) in METHODS and _package(t) in METHODS):
                bad.append(f"{m} imports {t} (another method package)")
    assert not bad, "\n".join(sorted(bad))


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycles():
    assert find_cycles(import_graph()) == []


def test_the_checks_catch_what_they_should():
    """The two checks above fail on a cycle and on an upward import (guards against a vacuous test)."""
    assert find_cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert layer_of("oodforge.models.backbones") < layer_of("oodforge.ssod.model")
    assert layer_of("oodforge.synood.cli") == len(LAYERS) - 1
    graph = import_graph()
    assert "oodforge.models.base" in graph["oodforge.ssod.model"]  # the graph sees real imports
