"""The dependency direction of fedvault's subpackages (DESIGN.md): core <- privacy, security,
strategies <- client, server <- simulations, deploy <- the CLI. A test that fails on an upward
import or a cycle, read from the source (static imports, including ones inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

import fedvault

#: Layer of each subpackage; a module may import its own layer's package or lower layers only.
LAYERS = {
    "fedvault": 0,  # core: config, protocol, tasks, run dir, atomic I/O, errors, plots, logs
    "fedvault.privacy": 1,
    "fedvault.security": 1,
    "fedvault.strategies": 1,
    "fedvault.client": 2,
    "fedvault.server": 2,
    "fedvault.simulations": 3,
    "fedvault.deploy": 3,
}
#: The modules that may import everything: the command line, and the front door's lazy re-exports.
TOP = {"fedvault.cli", "fedvault"}
ROOTS = {
    "fedvault": "fedvault",
    "fedvault.tasks": "fedvault/tasks",
    "fedvault.privacy": "privacy",
    "fedvault.security": "security",
    "fedvault.strategies": "strategies",
    "fedvault.client": "client",
    "fedvault.server": "server",
    "fedvault.simulations": "simulations",
    "fedvault.deploy": "deploy",
}
REPO = Path(__file__).resolve().parents[1]


def package_of(module: str) -> str:
    """The subpackage a module belongs to; everything else under ``fedvault`` (tasks included) is core."""
    top = ".".join(module.split(".")[:2])
    return top if top in LAYERS else "fedvault"


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in ROOTS.items():
        for path in sorted((REPO / folder).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            found[name] = path
    return found


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "fedvault":
                names.update(f"fedvault.{alias.name}" for alias in node.names)
            elif node.module.startswith("fedvault."):
                names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("fedvault."))
    return names


def test_no_module_imports_upward():
    known = modules()
    upward = []
    for module, path in known.items():
        if module in TOP:
            continue
        own = LAYERS[package_of(module)]
        for target in imports(path):
            target_package = package_of(target)
            if LAYERS[target_package] > own or (LAYERS[target_package] == own and target_package != package_of(module)):
                upward.append(f"{module} -> {target}")
    assert not upward, "imports against the layering (DESIGN.md):\n" + "\n".join(sorted(upward))


def test_client_and_server_never_import_each_other_and_there_is_no_cycle():
    known = modules()
    graph = {m: {t for t in imports(p) if t in known} for m, p in known.items() if m not in TOP}
    seen: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(node: str, stack: list[str]) -> list[str] | None:
        seen[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if seen.get(nxt) == 1:
                return [*stack, node, nxt]
            if nxt not in seen and (cycle := visit(nxt, [*stack, node])):
                return cycle
        seen[node] = 2
        return None

    for start in sorted(graph):
        if start not in seen:
            cycle = visit(start, [])
            assert cycle is None, "import cycle: " + " -> ".join(cycle)
    assert fedvault.__name__ == "fedvault"
