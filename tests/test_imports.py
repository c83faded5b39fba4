"""Imports inside the package flow one way and never in a circle (read from the source, not run).

Every `import` counts, at module level or inside a function: a function-level import that dodges
an import cycle still ties the two modules together. `from bgjax.x import y` imports bgjax.x.y
when that is a module, else bgjax.x.
"""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import bgjax

# Layers, highest first: a module may import its own layer and the ones below it, never above.
# "pkg.*" covers the package and everything in it; an exact name wins over a pattern.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("bgjax.cli",),
    (  # commands
        "bgjax.train",
        "bgjax.evaluate",
        "bgjax.demo",
        "bgjax.sweep",
        "bgjax.aggregate",
        "bgjax.dfr",
        "bgjax.show_variants",
        "bgjax.analysis.*",
        "bgjax.data.prepare",
        "bgjax.models.convert",
    ),
    # what a trained run is: on disk, its state, its masks, its task's loss and evaluator
    (
        "bgjax.workdir",
        "bgjax.rerun",
        "bgjax.tasks.*",
        "bgjax.train_state",
        "bgjax.train_step",
        "bgjax.masks",
        "bgjax.lock",
    ),
    (
        "bgjax.data.*",
        "bgjax.models.*",
        "bgjax.parallel",
        "bgjax.checkpoint",
        "bgjax.optim",
        "bgjax.metrics",
        "bgjax.findings",
        "bgjax.selection",
        "bgjax.plots",
        "bgjax.config_utils",
        "bgjax.clflags",
        "bgjax.xla_options",
        "bgjax.hostmem",
        "bgjax.console",
        "bgjax.metric_writer",
        "bgjax.configs.*",  # loaded by file; they import only config_utils and variants
    ),
    ("bgjax.variants", "bgjax"),
)

ROOT = Path(bgjax.__file__).parent


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package in `root`."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join((package, *parts))] = path
    return modules


def _parse(path: Path) -> ast.Module:
    """`ast.parse` of the file. CPython 3.11 checks the AST conversion's recursion depth against
    state another thread's parse can move at the same time ("SystemError: AST constructor
    recursion depth mismatch", seen once with a test worker's background threads): the parse
    is deterministic, so it is tried again."""
    for attempt in range(3):
        try:
            return ast.parse(path.read_text(), str(path))
        except SystemError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that module `name` imports anywhere in its file."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(_parse(path)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = name.split(".")
                anchor = anchor[: len(anchor) - node.level + is_package]
                base = ".".join(anchor + ([base] if base else []))
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            # `import bgjax.data.in9` names a module; keep the longest known prefix.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path = ROOT, package: str = "bgjax") -> dict[str, set[str]]:
    modules = module_files(root, package)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> b -> ... -> a) per strongly connected group of modules (Tarjan)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(graph, group) for group in groups]


def _cycle_in(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A shortest cycle through the group's first module (breadth-first)."""
    start = min(group)
    parents, frontier = {start: None}, [start]
    while frontier:
        step = []
        for node in frontier:
            for nxt in sorted(graph[node] & group):
                if nxt == start:
                    path = [node]
                    while parents[path[-1]] is not None:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if nxt not in parents:
                    parents[nxt] = node
                    step.append(nxt)
        frontier = step
    raise AssertionError(f"no cycle in {group}")


def layer_of(name: str) -> int | None:
    """0 for the lowest layer; None when the table does not list the module."""
    for exact in (True, False):
        for rank, patterns in enumerate(reversed(LAYERS)):
            for pattern in patterns:
                if exact and name == pattern:
                    return rank
                if not exact and pattern.endswith(".*"):
                    package = pattern[:-2]
                    if name == package or fnmatch.fnmatch(name, pattern):
                        return rank
    return None


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles (function-level imports count):\n" + "\n".join(
        " -> ".join(cycle) for cycle in cycles
    )


def test_every_module_has_a_layer():
    missing = sorted(name for name in import_graph() if layer_of(name) is None)
    assert not missing, f"add these modules to LAYERS in {__file__}: {missing}"


def test_imports_flow_downward():
    upward = [
        f"{name} imports {target}"
        for name, targets in sorted(import_graph().items())
        for target in sorted(targets)
        if None not in (layer_of(name), layer_of(target)) and layer_of(target) > layer_of(name)
    ]
    assert not upward, "imports against the layer order (see LAYERS):\n" + "\n".join(upward)


def test_cycle_finder_sees_function_level_and_from_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("X = 1\n")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.sub import X\n")
    (pkg / "sub" / "c.py").write_text("from . import X\n\ndef g():\n    import pkg.a\n")
    (pkg / "sub" / "d.py").write_text("from pkg.sub import c\n")
    graph = import_graph(pkg, "pkg")
    assert graph["pkg.a"] == {"pkg.b"}
    assert graph["pkg.b"] == {"pkg.sub"}
    assert graph["pkg.sub.c"] == {"pkg.sub", "pkg.a"}
    assert graph["pkg.sub.d"] == {"pkg.sub.c"}
    assert find_cycles(graph) == []
    (pkg / "sub" / "__init__.py").write_text("def h():\n    from pkg.sub.d import Y\n")
    assert find_cycles(import_graph(pkg, "pkg")) == [
        ["pkg.a", "pkg.b", "pkg.sub", "pkg.sub.d", "pkg.sub.c", "pkg.a"]
    ]
