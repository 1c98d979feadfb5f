"""The import statements of the package, read with `ast` (every one: module level, inside functions,
under `if TYPE_CHECKING:`), for the structure tests (tests/unit/test_imports.py) and the packaging
test's declared-dependency check."""
from __future__ import annotations

import ast
import os
from typing import Dict, List, Optional, Set

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "mgpt4_dist"


def module_files(root: str) -> Dict[str, str]:
    """{dotted module name: file} of every .py file of the package under `root`."""
    found = {}
    for folder, _, files in os.walk(os.path.join(root, PACKAGE)):
        for name in files:
            if not name.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(folder, name), root)[:-3].split(os.sep)
            if rel[-1] == "__init__":
                rel = rel[:-1]
            found[".".join(rel)] = os.path.join(folder, name)
    return found


def imported_names(path: str, module: str, is_package: bool) -> List[str]:
    """Every module name an import statement of `path` names (absolute; relative ones resolved),
    `from X import y` giving `X.y` too (y may be a submodule)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".") if is_package else module.split(".")[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names]
    return names


def import_graph(root: str) -> Dict[str, Set[str]]:
    """{module: mgpt4_dist modules it imports}; `from pkg import sub` is an edge to pkg.sub when sub is a
    module, else to pkg."""
    files = module_files(root)
    graph = {}
    for module, path in files.items():
        edges = set()
        for name in imported_names(path, module, path.endswith("__init__.py")):
            if name in files and name != module:
                edges.add(name)
            elif name.rsplit(".", 1)[0] in files and name.rsplit(".", 1)[0] != module and name.startswith(PACKAGE):
                edges.add(name.rsplit(".", 1)[0])
        # A module imports its own package first: only an __init__ that imports back makes that a cycle,
        # and it is counted through the __init__'s own edges.
        graph[module] = {e for e in edges if not module.startswith(e + ".")}
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One import cycle as [a, b, ..., a], or None."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def third_party_imports(root: str) -> Dict[str, Set[str]]:
    """{top-level name of every non-package import: modules importing it}."""
    files = module_files(root)
    found: Dict[str, Set[str]] = {}
    for module, path in files.items():
        for name in imported_names(path, module, path.endswith("__init__.py")):
            top = name.split(".")[0]
            if top and top != PACKAGE:
                found.setdefault(top, set()).add(module)
    return found
