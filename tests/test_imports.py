"""The package has no import circle: read from the source, every import counted (also those
inside functions and those under `if TYPE_CHECKING:`: a circle of types is a circle of layers),
a submodule import also importing its package's __init__."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fedtune"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _all_nodes(tree: ast.AST):
    for node in ast.iter_child_nodes(tree):
        yield node
        yield from _all_nodes(node)


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in _all_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedtune"):
                targets.add(node.module)
                targets |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("fedtune")}
        closed = set()
        for target in targets:  # importing fedtune.a.b runs fedtune.a's __init__ first
            parts = target.split(".")
            closed |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)}
        graph[name] = {t for t in closed if t in modules and t != name and not name.startswith(t + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_finder_sees_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_fedtune_has_no_import_circle():
    graph = import_graph()
    # The algorithms sit below the runtime (local.py: the per-process model cache, a client's round):
    # they are handed the models they work on, and never fetch one.
    for algorithm in (m for m in graph if m.startswith("fedtune.algorithms")):
        assert "fedtune.local" not in graph[algorithm], algorithm
    # the layers below the algorithms do not import them, not even for types
    for lower in ("fedtune.local", "fedtune.train", "fedtune.config", "fedtune.plugins", "fedtune.client_losses"):
        assert not any(t.startswith("fedtune.algorithms") for t in graph[lower]), lower
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
