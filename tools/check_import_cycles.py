"""Find import cycles among Clowder's own modules; print each, exit 1 if there is any (run by `make lint`).

Our modules are the packages under services/*/clowder_*, libs/common/clowder_common, libs/sdk/clowder and
cli/clowder_cli; the generated contracts (libs/common/gen) are not ours and are left out. Every import counts,
wherever it stands: one inside a function or under `if TYPE_CHECKING:` hides a cycle from the interpreter but
the two modules still cannot be understood, tested or moved apart, which is what this check is for.

An edge goes from a module to the module it names: `import a.b` and `from a import b` (b a module) point at
a.b; `from a.b import name` (name defined in a/b/__init__.py) points at the package a.b. A package's
__init__ that re-exports its submodules is not a cycle with them unless a submodule imports the package back.

Usage: python tools/check_import_cycles.py [--root DIR]
"""

from __future__ import annotations

import argparse
import ast
import pathlib
import sys
from collections import deque
from dataclasses import dataclass

ROOT = pathlib.Path(__file__).resolve().parent.parent
# (folder that is on sys.path, glob of our top-level packages in it)
SOURCE_ROOTS = (
    ("services/*", "clowder_*"),
    ("libs/common", "clowder_common"),
    ("libs/sdk", "clowder"),
    ("cli", "clowder_cli"),
)


@dataclass(frozen=True)
class Edge:
    target: str
    line: int
    # "top" (runs on import), "lazy" (inside a function) or "typing" (under TYPE_CHECKING).
    kind: str


def find_modules(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """{dotted module name: file} for every .py file of our packages."""
    modules: dict[str, pathlib.Path] = {}
    for folder_glob, package_glob in SOURCE_ROOTS:
        for folder in sorted(root.glob(folder_glob)):
            for package in sorted(folder.glob(package_glob)):
                if not package.is_dir():
                    continue
                for path in sorted(package.rglob("*.py")):
                    parts = path.relative_to(folder).with_suffix("").parts
                    if parts[-1] == "__init__":
                        parts = parts[:-1]
                    modules[".".join(parts)] = path
    return modules


class _Imports(ast.NodeVisitor):
    """Collects (imported name, line, kind) for every import statement of one module."""

    def __init__(self, module: str, is_package: bool) -> None:
        self.package = module if is_package else module.rpartition(".")[0]
        self.found: list[tuple[str, list[str], int, str]] = []
        self._kind = ["top"]

    def _absolute(self, level: int, name: str | None) -> str:
        if level == 0:
            return name or ""
        base = self.package.split(".")
        base = base[: len(base) - (level - 1)] if level > 1 else base
        return ".".join([*base, name] if name else base)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append((alias.name, [], node.lineno, self._kind[-1]))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = self._absolute(node.level, node.module)
        self.found.append((module, [a.name for a in node.names], node.lineno, self._kind[-1]))

    def _visit_as(self, kind: str, nodes: list[ast.stmt]) -> None:
        # A lazy import under TYPE_CHECKING (or the reverse) is still only as strong as its weakest reason.
        self._kind.append(kind if self._kind[-1] == "top" else self._kind[-1])
        for child in nodes:
            self.visit(child)
        self._kind.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._visit_as("lazy", node.body)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._visit_as("lazy", node.body)

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else ""
        if name == "TYPE_CHECKING":
            self._visit_as("typing", node.body)
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)


def import_graph(modules: dict[str, pathlib.Path]) -> dict[str, list[Edge]]:
    graph: dict[str, list[Edge]] = {}
    for module, path in modules.items():
        collector = _Imports(module, path.name == "__init__.py")
        collector.visit(ast.parse(path.read_text(), str(path)))
        edges: dict[str, Edge] = {}
        for imported, names, line, kind in collector.found:
            targets = [f"{imported}.{n}" for n in names if f"{imported}.{n}" in modules]
            if len(targets) < len(names) or not names:
                targets.append(imported)  # names defined in the package (or module) itself
            for target in targets:
                # `import a.b.c` of a module we do not have (generated code, third party) points nowhere.
                if target in modules and target != module:
                    previous = edges.get(target)
                    # Keep the strongest reason for the edge: one that runs at import time beats a lazy one.
                    if previous is None or _rank(kind) < _rank(previous.kind):
                        edges[target] = Edge(target, line, kind)
        graph[module] = sorted(edges.values(), key=lambda e: e.target)
    return graph


def _rank(kind: str) -> int:
    return ("top", "lazy", "typing").index(kind)


def strongly_connected(graph: dict[str, list[Edge]]) -> list[list[str]]:
    """Tarjan's components with more than one module (iterative: deep packages must not hit the recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            advanced = False
            for edge in edges:
                if edge.target not in index:
                    index[edge.target] = low[edge.target] = counter
                    counter += 1
                    stack.append(edge.target)
                    on_stack.add(edge.target)
                    work.append((edge.target, iter(graph[edge.target])))
                    advanced = True
                    break
                if edge.target in on_stack:
                    low[node] = min(low[node], index[edge.target])
            if advanced:
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
                    components.append(sorted(component))
    return sorted(components)


def shortest_cycle(graph: dict[str, list[Edge]], component: list[str]) -> list[str]:
    """A shortest cycle through the component's first module, as a list of modules ending where it starts."""
    members = set(component)
    start = component[0]
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for edge in graph[node]:
            if edge.target not in members:
                continue
            if edge.target == start:
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [*reversed(path), start]
            if edge.target not in came_from:
                came_from[edge.target] = node
                queue.append(edge.target)
    return [start, start]  # not reached: a component of two or more always has a cycle through each member


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=pathlib.Path, default=ROOT, help="repository root (default: this one)")
    args = parser.parse_args(argv)
    modules = find_modules(args.root)
    graph = import_graph(modules)
    components = strongly_connected(graph)
    for component in components:
        cycle = shortest_cycle(graph, component)
        print(f"import cycle among {len(component)} modules: {' -> '.join(cycle)}")
        for module in component:
            for edge in graph[module]:
                if edge.target in component:
                    where = modules[module].relative_to(args.root)
                    print(f"  {where}:{edge.line}: {module} imports {edge.target} ({edge.kind})")
    if components:
        print(f"{len(components)} import cycle(s) in {len(modules)} modules", file=sys.stderr)
        return 1
    print(f"no import cycles in {len(modules)} modules")
    return 0


if __name__ == "__main__":
    sys.exit(main())
