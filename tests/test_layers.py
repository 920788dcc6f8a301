"""The house's layering, read from the source with `ast` (nothing is imported):

    cli → sweep → search / train / export → plot / tracking → data → space → ops → kernels,
    with base modules (errors, config, runs, distributed, divergence, precision, meters, runtime) under all.

A module imports only from its own layer or the layers below it; no two modules import each other, directly
or round a circle (function-level imports count too); and no `_private` name is imported from another module.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "milenas_fast"

# Top to bottom. A module belongs to the first layer with a prefix of its dotted name (without the package).
LAYERS = [
    ("cli", ["", "__main__", "cli", "info", "patch"]),  # "" is the package's __init__: the public API
    ("sweep", ["sweep"]),
    ("commands", ["search", "train", "export"]),
    ("report", ["plot", "tracking"]),
    ("data", ["data"]),
    ("space", ["space"]),
    ("ops", ["ops"]),
    ("kernels", ["kernels"]),
    ("base", ["errors", "config", "runs", "distributed", "divergence", "precision", "meters", "runtime"]),
]


def _modules() -> dict[str, Path]:
    """Dotted name → file, for milenas_fast/ and kernels/ (installed as milenas_fast.kernels)."""
    out = {}
    for base, prefix in ((ROOT / PACKAGE, PACKAGE), (ROOT / "kernels", f"{PACKAGE}.kernels")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([prefix] + parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, str, int]]:
    """(imported module, imported name or "", line) for every import of a project module in `path`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, "", node.lineno) for a in node.names if a.name in MODULES]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                if f"{target}.{a.name}" in MODULES:  # `from . import x`: the module x
                    out.append((f"{target}.{a.name}", "", node.lineno))
                elif target in MODULES:
                    out.append((target, a.name, node.lineno))
    return [(t, n, line) for t, n, line in out if t != name]


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def layer(name: str) -> int:
    rest = name.removeprefix(PACKAGE).removeprefix(".")
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(rest == p or (p and rest.startswith(p + ".")) for p in prefixes):
            return i
    raise AssertionError(f"{name} is in no layer: add it to LAYERS in {Path(__file__).name}")


def upward(graph: dict) -> list[str]:
    return [f"{name} ({LAYERS[layer(name)][0]}) imports {target} ({LAYERS[layer(target)][0]}), line {line}"
            for name, imports in graph.items() for target, _, line in imports if layer(target) < layer(name)]


def circles(graph: dict) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w, _, _ in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    assert len(MODULES) > 40  # the walk found the house
    for name in MODULES:
        layer(name)


def test_imports_run_downward_only():
    assert upward(GRAPH) == []


def test_no_import_circles():
    assert circles(GRAPH) == []


def test_no_private_name_is_imported_from_another_module():
    found = [f"{name} imports {target}.{n}, line {line}" for name, imports in GRAPH.items()
             for target, n, line in imports if n.startswith("_") and not n.startswith("__")]
    assert found == []


@pytest.mark.parametrize("graph, expect", [
    ({f"{PACKAGE}.ops.a": [(f"{PACKAGE}.space.b", "", 1)], f"{PACKAGE}.space.b": []}, "upward"),
    ({f"{PACKAGE}.space.a": [(f"{PACKAGE}.space.b", "", 1)], f"{PACKAGE}.space.b": [(f"{PACKAGE}.space.a", "", 2)]},
     "circle"),
])
def test_the_checks_can_fail(graph, expect):
    """The same checks on made-up graphs: an upward import and a two-module circle are caught."""
    if expect == "upward":
        assert upward(graph) and not circles(graph)
    else:
        assert circles(graph) == [[f"{PACKAGE}.space.a", f"{PACKAGE}.space.b"]] and not upward(graph)
