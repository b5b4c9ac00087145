"""The package layering, checked from the source (AST), so it stays true.

- ``sender`` and ``receiver`` never import each other;
- ``protocol`` (the contract) imports none of the other packages;
- ``trainer`` (the training loop both sides use) imports neither side;
- there is no import cycle between modules.

Imports inside functions count: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("protocol", "trainer", "sender", "receiver", "plada_cli")
FORBIDDEN = {
    "sender": {"receiver"},
    "receiver": {"sender"},
    "protocol": {"sender", "receiver", "trainer", "plada_cli"},
    "trainer": {"sender", "receiver", "plada_cli"},
}


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    return modules


def _imported(module: str, path: Path, node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = module.split(".")
        if path.name != "__init__.py":
            base = base[:-1]
        base = base[: len(base) - node.level + 1]
        target = ".".join([*base, node.module] if node.module else base)
    else:
        target = node.module or ""
    return [target, *(f"{target}.{alias.name}" for alias in node.names)]


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the project modules it imports (at any depth in its code)."""
    modules = module_files(root)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for target in _imported(name, path, node):
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every broken rule, one line each."""
    found = []
    for module, targets in sorted(graph.items()):
        top = module.split(".")[0]
        for target in sorted(targets):
            if target.split(".")[0] in FORBIDDEN.get(top, set()):
                found.append(f"{module} imports {target}")
    found += ["cycle: " + " <-> ".join(component) for component in cycles(graph)]
    return found


def test_the_project_keeps_its_layering() -> None:
    graph = import_graph(ROOT)
    assert {"sender.cli", "receiver.cli", "trainer.training", "protocol.payload"} <= set(graph)
    assert (
        "trainer.training" in graph["sender.scoring.image_teachers"]
    )  # the checker sees real imports
    assert violations(graph) == []


def test_the_checker_finds_planted_violations(tmp_path: Path) -> None:
    files = {
        "protocol/__init__.py": "",
        "protocol/base.py": "def make():\n    from protocol.readers import Reader\n",
        "protocol/readers.py": "from protocol.base import make\n",
        "sender/__init__.py": "",
        "sender/teach.py": "from receiver import training\n",
        "receiver/__init__.py": "",
        "receiver/training.py": "from . import job\n",
        "receiver/job.py": "from .training import loop\nimport sender.teach\n",
        "trainer/__init__.py": "",
        "trainer/loop.py": "import protocol.base\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert violations(import_graph(tmp_path)) == [
        "receiver.job imports sender.teach",
        "sender.teach imports receiver",
        "sender.teach imports receiver.training",
        "cycle: protocol.base <-> protocol.readers",
        "cycle: receiver.job <-> receiver.training <-> sender.teach",
    ]
