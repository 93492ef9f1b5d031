"""The package's import graph has no cycle: kernels sit below the ops, never beside them.

Every ``import`` and ``from ... import`` statement of every module under ``prompt_kernels/`` counts,
wherever it stands (module level, inside a function, under ``TYPE_CHECKING``): a lazy import inside a
function still makes the two modules depend on each other. ``from package import name`` is an edge to
``package.name`` when that is a module (a ``.py`` file, a package or a compiled extension), else to
``package``. Importing a submodule also runs its parents' ``__init__``; those implicit edges are not
counted (every module would then depend on ``prompt_kernels/__init__.py``), so a cycle here is one
that the modules' own import statements make. ``importlib.import_module`` calls are not seen.
"""

from __future__ import annotations

import ast
from pathlib import Path

import prompt_kernels

ROOT = Path(prompt_kernels.__file__).resolve().parent
PACKAGE = ROOT.name


def _module_names() -> dict[str, Path | None]:
    """Dotted name -> source file (None for compiled extensions) of every module in the package."""
    mods: dict[str, Path | None] = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    for path in [*ROOT.rglob("*.so"), *ROOT.rglob("*.pyd")]:
        parts = [*path.relative_to(ROOT.parent).parts[:-1], path.name.split(".")[0]]
        mods.setdefault(".".join(parts), None)
    return mods


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules its import statements name (see the module docstring)."""
    mods = _module_names()

    def known(name: str | None) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        graph[name] = set()
        if path is None:
            continue
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [known(a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [
                    f"{module}.{a.name}" if f"{module}.{a.name}" in mods else known(module)
                    for a in node.names
                ]
            else:
                continue
            graph[name].update(t for t in targets if t and t != name)
    return graph


def strongly_connected_components(graph: dict[str, set[str]]) -> list[list[str]]:
    """The components of more than one module (Tarjan's algorithm, iterative): each is a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_the_walk_sees_the_package():
    graph = import_graph()
    assert f"{PACKAGE}.ops.gated_prefix_attention" in graph
    assert f"{PACKAGE}.kernels.gated_prefix_attention" in graph
    # a lazy import inside a function is an edge
    assert f"{PACKAGE}.kernels.gated_prefix_attention" in graph[f"{PACKAGE}.ops.gated_prefix_attention"]
    assert f"{PACKAGE}.ops" in graph[PACKAGE]
    # and a cycle is found
    assert strongly_connected_components({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [
        ["a", "b", "c"]
    ]


def test_no_import_cycle():
    cycles = strongly_connected_components(import_graph())
    assert not cycles, f"import cycles among {PACKAGE} modules: {cycles}"


def test_kernels_never_import_ops():
    """The Triton kernels, their floors and launch cases sit below the ops: no kernels module imports
    an ops module (the ops import the kernels, lazily)."""
    graph = import_graph()
    bad = {
        m: sorted(t for t in targets if t == f"{PACKAGE}.ops" or t.startswith(f"{PACKAGE}.ops."))
        for m, targets in graph.items()
        if m.startswith(f"{PACKAGE}.kernels")
    }
    assert not any(bad.values()), f"kernels modules importing ops: { {m: t for m, t in bad.items() if t} }"
