"""No import cycle between league's modules: every import statement of every file (those inside functions too) is an
edge of a graph over the modules, and the graph has no cycle. Dependencies flow one way (ops <- models <- engine,
rl <- config <- flags <- cli)."""

import ast
from pathlib import Path

LEAGUE = Path(__file__).resolve().parents[1] / "league"


def module_names() -> dict[str, Path]:
    names = {}
    for path in LEAGUE.rglob("*.py"):
        parts = path.relative_to(LEAGUE.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imported(module: str, path: Path, node: ast.Import | ast.ImportFrom, names: dict[str, Path]) -> set[str]:
    """The league modules one import statement brings in (``from pkg import mod`` names the module)."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
            package = package[: len(package) - node.level + 1]
            base = ".".join([*package, *([base] if base else [])])
        targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in names else base for alias in node.names]
    found = set()
    for target in targets:
        while target and target not in names:
            target = target.rpartition(".")[0]
        if target and target != module:
            found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    names = module_names()
    graph = {}
    for module, path in names.items():
        nodes = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, (ast.Import, ast.ImportFrom))]
        graph[module] = set().union(*(imported(module, path, n, names) for n in nodes))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_walk_finds_a_cycle_when_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    graph = import_graph()
    assert "league.ops.moe" in graph["league.models.qwen3_5_moe.model"]  # edges are found (from-imports of modules)
    assert "league.rl.trainer" in graph["league.config"]


def test_no_import_cycle_between_league_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
