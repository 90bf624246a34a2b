"""The product's import graph, read with ast (lazy imports inside functions included): no circle
between modules, no edge from a package up to one above it (from the bottom: pipeline, kernels, model,
train, bench; kernels may use pipeline.errors), and no product module over ~500 lines."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOOR = {"pipeline": 1, "kernels": 2, "model": 3, "train": 4, "bench": 5}
MAX_LINES = 520  # "about 500": a module past this is two modules


def modules() -> dict[str, Path]:
    found = {}
    for package in FLOOR:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the product modules it imports (`from pkg import submodule` counts as the submodule)."""

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in mods.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            targets |= {t for t in map(resolve, names) if t and t != name}
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def upward(graph: dict[str, set[str]]) -> list[str]:
    """Edges from a package to one above it."""
    return sorted(
        f"{a} -> {b}"
        for a, targets in graph.items()
        for b in targets
        if FLOOR[b.split(".")[0]] > FLOOR[a.split(".")[0]]
    )


def test_the_import_graph_has_no_circle():
    graph = edges(modules())
    assert len(graph) > 50
    assert cycles(graph) == []


def test_no_package_imports_one_above_it():
    assert upward(edges(modules())) == []


def test_the_checker_sees_a_circle_and_an_upward_edge():
    graph = {"pipeline.a": {"model.b"}, "model.b": {"model.c"}, "model.c": {"model.b"}}
    assert cycles(graph) == [["model.b", "model.c"]]
    assert upward(graph) == ["pipeline.a -> model.b"]


def test_no_product_module_is_over_about_500_lines():
    long = {
        name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}
