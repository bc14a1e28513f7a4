"""The import graph of core/, ui/, views/ and app.py: no loops, and no import from a lower layer
to a higher one (views > ui > core; the offline pipeline in core.pipeline above the runtime)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

FIRST_PARTY = ("core", "ui", "views", "app")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, known: set[str]) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function (a lazy import still
    ties the two modules together)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
            # ``from core import maps`` imports the module core.maps
            out.update(f"{node.module}.{a.name}" for a in node.names
                       if f"{node.module}.{a.name}" in known)
    return out


def import_graph() -> dict[str, set[str]]:
    files = [ROOT / "app.py", *[p for d in FIRST_PARTY[:3] for p in (ROOT / d).rglob("*.py")]]
    known = {module_name(p) for p in files}
    return {module_name(p): imports(p, known) for p in files}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One loop through each strongly connected group of modules (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in graph:
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                group.append(top)
                if top == node:
                    break
            if len(group) > 1 or node in graph[node]:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    def under(name: str, *prefixes: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in prefixes)

    bad = []
    for module, deps in graph.items():
        for dep in sorted(deps):
            if under(module, "core") and under(dep, "ui", "views", "app", "streamlit"):
                bad.append(f"{module} imports {dep}: core never imports the app or streamlit")
            if (under(module, "core") and not under(module, "core.pipeline")
                    and under(dep, "core.pipeline")):
                bad.append(f"{module} imports {dep}: the runtime never imports the build "
                           "pipeline")
            if under(module, "ui") and under(dep, "views", "app"):
                bad.append(f"{module} imports {dep}: ui never imports a page or the router")
            if under(dep, "views", "app"):
                bad.append(f"{module} imports {dep}: pages run through st.navigation, never "
                           "by import")
    return bad


def test_the_graph_is_read():
    graph = import_graph()
    assert {"app", "core.index", "core.pipeline.training", "ui.resources",
            "views.lookup"} <= set(graph)
    assert "core.pipeline.evaluation" in graph["core.pipeline.training"]
    assert "core.pipeline.corpus" in graph["core.pipeline.training"]  # imported in a function


def test_no_import_loops():
    assert cycles(import_graph()) == []


def test_no_import_from_a_lower_layer_to_a_higher_one():
    assert layer_violations(import_graph()) == []


def test_the_checks_see_a_loop_and_a_wrong_way_import():
    graph = {"core.a": {"core.b"}, "core.b": {"core.c"}, "core.c": {"core.a"}, "core.d": set()}
    assert cycles(graph) == [["core.a", "core.b", "core.c"]]
    wrong = {"core.text": {"core.pipeline.training", "streamlit"}, "ui.x": {"views.lookup"}}
    assert len(layer_violations(wrong)) == 4
