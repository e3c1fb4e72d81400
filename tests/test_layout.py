"""The package's layout: no module imports another that (directly or through others) imports it back."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "src" / "blip3o_next"


def relative_imports() -> dict[str, set[str]]:
    """Module -> the package modules it imports (every relative import, at module level or inside a function)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        package = parts[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = list(package[: len(package) - (node.level - 1)])
                deps.add(".".join(base + ([node.module] if node.module else [])))
        graph[".".join(p for p in parts if p != "__init__")] = deps
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    done, path, cycles = set(), [], []

    def visit(node: str) -> None:
        if node in path:
            cycles.append(path[path.index(node):] + [node])
        elif node in graph and node not in done:
            path.append(node)
            for dep in sorted(graph[node]):
                visit(dep)
            path.pop()
            done.add(node)

    for node in sorted(graph):
        visit(node)
    return cycles


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_cycles():
    graph = relative_imports()
    assert {"training.trainer", "training.grpo", "training.recipes", "shapeworld.render"} <= set(graph)
    assert find_cycles(graph) == []
