"""The engine's modules import one another one way (a DAG), and none hides an import of a quant module inside a function
(the way an import loop is dodged). optimum-quanto, an optional dependency, may be imported inside a function.
docs/ARCHITECTURE.md names every file of quant/, nodes/ and tools/ in its folder's table."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
QUANT = REPO / "quant"


def _quant_imports(node: ast.AST) -> set[str]:
    """The quant modules an import statement names (relative imports inside quant/)."""
    if isinstance(node, ast.ImportFrom) and node.level == 1:
        return {node.module} if node.module else {alias.name for alias in node.names}
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sd35_fp8.quant."):
        return {node.module.split(".")[2]}
    if isinstance(node, ast.Import):
        return {a.name.split(".")[2] for a in node.names if a.name.startswith("sd35_fp8.quant.")}
    return set()


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    """({module: quant modules it imports at module level}, ["module:line" of quant imports inside functions])."""
    graph, hidden = {}, []
    for path in sorted(QUANT.glob("*.py")):
        tree = ast.parse(path.read_text())
        graph[path.stem] = set().union(*(_quant_imports(node) for node in tree.body)) if tree.body else set()
        for func in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            hidden += [f"{path.stem}:{n.lineno}" for n in ast.walk(func) if _quant_imports(n)]
    return graph, hidden


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of `graph` as a path, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [node])):
                return found
        state[node] = 2
        return None

    return next((c for n in sorted(graph) if n not in state and (c := visit(n, [])) is not None), None)


def test_quant_modules_form_a_dag_without_hidden_imports():
    graph, hidden = _graph()
    assert {"plan", "engine", "decision", "report", "budget", "streaming"} <= set(graph)
    assert graph["decision"] == set() and "plan" not in graph["budget"] and "budget" not in graph["report"]
    assert _cycle(graph) is None, f"import cycle in quant/: {' -> '.join(_cycle(graph))}"
    assert not hidden, f"imports of quant modules inside functions: {hidden}"


def test_the_cycle_finder_finds_a_cycle_and_a_hidden_import():
    """The checks above can fail: a two-module loop and an import inside a function are found."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    tree = ast.parse("def f():\n    from .plan import FP8\n    from optimum.quanto import freeze\n")
    assert [_quant_imports(n) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)] == [{"plan"}, set()]


def test_architecture_names_every_file_of_quant_nodes_and_tools():
    doc = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    for folder in ("quant", "nodes", "tools"):
        section = doc.split(f"## {folder}/ file by file")[1].split("\n## ")[0]
        named = {line.split("`")[1] for line in section.splitlines() if line.startswith("| `")}
        files = {p.name for p in (REPO / folder).iterdir() if p.suffix in (".py", ".json")}
        assert files <= named, f"docs/ARCHITECTURE.md does not name {sorted(files - named)} of {folder}/"
