"""bench/'s import graph is a DAG: no module imports (at the top or inside a function) a module that imports it back.
The packages `methods` and `tasks` are one node each: their modules import their package's registry and the package
imports them to register them, by design (a method or task is one file); what they import from bench counts.
`python tests/test_structure.py` prints the graph."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bench", "methods", "tasks")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).glob("*.py"))}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports anywhere in its file (function-local imports included). `from pkg import x`
    counts as importing pkg.x where that is a module, else pkg."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:  # `import bench.x.y` -> the nearest project module
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def node(module: str) -> str:
    """bench modules are nodes of their own; methods.* and tasks.* collapse into their package."""
    return module if module.startswith("bench") else module.split(".")[0]


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = graph.setdefault(node(name), set())
        deps.update(node(m) for m in imports_of(name, path, modules))
        deps.discard(node(name))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None
    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_graph_sees_function_local_and_package_imports():
    graph = import_graph()
    # bench.cli imports bench.runner only inside functions; `from methods import get_method` is the package
    assert "bench.runner" in graph["bench.cli"] or "bench.sweep" in graph["bench.cli"]
    assert "methods" in graph["bench.runner"] and "bench.engine" in graph["methods"]  # methods.covariance


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_import_graph_is_a_dag():
    graph = import_graph()
    assert len(graph) > 20
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


if __name__ == "__main__":
    g = import_graph()
    width = max(map(len, g))
    for mod in sorted(g):
        print(f"{mod:<{width}} -> {', '.join(sorted(g[mod])) or '-'}")
    cycle = find_cycle(g)
    print(f"\n{len(g)} modules, {sum(map(len, g.values()))} import edges; "
          + (f"CYCLE: {' -> '.join(cycle)}" if cycle else "no cycle (a DAG)"))
    sys.exit(1 if cycle else 0)
