"""The toolkit's modules import each other without circles.

Every ``import`` and ``from toolkit... import`` statement counts, also those inside
functions (a lazy import only hides a circle from the interpreter, not from a reader).
The graph is read from the sources with :mod:`ast`, and its strongly connected
components must all be single modules.
"""
from __future__ import annotations

import ast
from pathlib import Path

TOOLKIT = Path(__file__).resolve().parents[1] / "toolkit"


def module_name(path: Path) -> str:
    parts = path.relative_to(TOOLKIT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """``{module: the toolkit modules it imports}``."""
    modules = {module_name(p): p for p in TOOLKIT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # ``from package import submodule`` reads the submodule, as
                # ``from package.submodule import name`` does, not the package's other names
                names = [f"{node.module}.{alias.name}" for alias in node.names]
                found.update(names)
                if not all(n in modules for n in names):
                    found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
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
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_is_read():
    graph = import_graph()
    assert "toolkit.fingerprint" in graph["toolkit.streaming"]
    assert "toolkit.fingerprint" in graph["toolkit.patterns"]
    assert "toolkit.streaming" in graph["toolkit.patterns"]
    # ``from toolkit.layers import operations``: the submodule, not the package
    assert "toolkit.layers.operations" in graph["toolkit.layers.tracing"]
    assert "toolkit.layers" not in graph["toolkit.layers.tracing"]
    assert "toolkit.layers" in graph["toolkit.patterns"]  # Layer, Plan: names of the package


def test_no_import_circles():
    assert circles(import_graph()) == []


def test_a_circle_is_found():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_the_fingerprint_is_importable_where_it_was():
    from toolkit import fingerprint as module
    from toolkit.patterns import fingerprint

    assert fingerprint is module.fingerprint
