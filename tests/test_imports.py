"""The import graph of src/jointrank, read from the AST of every module (module-level and function-level imports,
intra-package only): no new import cycle and no new import of another module's private name.

Cycles that hide behind function-local imports still count: they are how the package got tangled. The known ones
below predate this test and are what issue #13 (one engine, one config, one format) removes; each fix should
shrink these lists, and the test fails if they grow or a new cycle appears."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "jointrank"

# Strongly connected components allowed in the import graph: none since issue #13 (one engine, one config, one
# format) removed the last ones. Kept as a list so a deliberate exception has to be written down here.
KNOWN_CYCLES: list[set[str]] = []
KNOWN_PRIVATE: set[tuple[str, str, str]] = set()  # emptied: every cross-module import is of a public name


def modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imports(name: str, path: Path, known: dict) -> list[tuple[str, str | None]]:
    """(module imported, name taken from it or None) for every import statement anywhere in the module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:  # `from pkg import module` imports the module, not a name of pkg
                found.append((f"{target}.{a.name}", None) if f"{target}.{a.name}" in known else (target, a.name))
    return [(t, n) for t, n in found if t in known and t != name]


def graph():
    known = modules()
    edges, private = {m: set() for m in known}, set()
    for name, path in known.items():
        for target, imported in imports(name, path, known):
            edges[name].add(target)
            if imported and imported.startswith("_") and not imported.startswith("__"):
                private.add((name, target, imported))
    return edges, private


def cycles(edges: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
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

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle_through_a_function_local_import():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(edges) == [{"a", "b", "c"}]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_new_import_cycle():
    new = [c for c in cycles(graph()[0]) if not any(c <= k for k in KNOWN_CYCLES)]
    assert not new, "new import cycle(s): " + "; ".join(" <-> ".join(sorted(c)) for c in new)


def test_no_new_private_import_across_modules():
    new = graph()[1] - KNOWN_PRIVATE
    assert not new, "private names imported from another module: " + ", ".join(
        f"{a} imports {n} from {b}" for a, b, n in sorted(new))


def test_the_known_lists_only_shrink():
    """A fixed cycle or private import must leave the lists above, so they never hide a new one."""
    edges, private = graph()
    found = cycles(edges)
    stale = [k for k in KNOWN_CYCLES if not any(c & k for c in found)]
    assert not stale and KNOWN_PRIVATE <= private, (stale, KNOWN_PRIVATE - private)
