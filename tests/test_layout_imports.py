"""Imports point one way: utils.py <- clip/ <- src/ <- main.py.

Every .py file of the repository is parsed (nothing is imported) and each `import` / `from ... import`
statement, at module level or inside a function, becomes an edge between project modules. Loading a
module by name (the dataset registry's plugins, `importlib.import_module`) is not an import edge: those
modules import the registry, not the other way round. A module importing itself (src/sweep.py under
``__main__``, so that submitit pickles its functions by reference) is not a cycle.

    python tests/test_layout_imports.py [ROOT]   # prints the graph's arrows from clip/ into src/ and its cycles
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]



def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Module name -> file of every .py file under ``root`` (hidden folders and caches left out)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            found[".".join(parts)] = path
    return found


def _project_module(name: str, modules: set[str]) -> str | None:
    """The most specific project module ``name`` refers to (``clip.factory.create_model`` -> ``clip.factory``)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def imports_of(module: str, path: Path, modules: set[str]) -> set[str]:
    """Project modules that ``module`` imports anywhere in its file (inside functions too)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package, up level - 1
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from pkg import name`: the submodule pkg.name when there is one, else pkg itself
            names = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
        else:
            continue
        for name in names:
            target = _project_module(name, modules)
            if target is not None and target != module:
                found.add(target)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    files = module_files(root)
    return {module: imports_of(module, path, set(files)) for module, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as one cycle through them."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for v in sorted(graph):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return [_one_cycle(graph, component) for component in components]


def _one_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the first module of ``component`` (breadth-first inside it), closed."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return sorted(component)  # unreachable for a strongly connected component


def _describe(found: list[list[str]]) -> str:
    return "; ".join(" -> ".join(cycle) for cycle in found) or "none"


def _under(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


GRAPH = import_graph()
ALL_CYCLES = cycles(GRAPH)


def test_the_graph_covers_the_repository():
    expected = {"main", "merge_func", "utils", "clip", "clip.factory", "src.modeling", "src.datasets.registry"}
    assert expected <= set(GRAPH)
    assert "clip.factory" in GRAPH["clip"] and "src.datasets.registry" in GRAPH["src.datasets.hf_sets"]


def test_clip_imports_nothing_from_src_main_or_merge_func():
    bad = {m: sorted(d for d in deps if _under(d, "src", "main", "merge_func"))
           for m, deps in GRAPH.items() if _under(m, "clip")}
    bad = {m: deps for m, deps in bad.items() if deps}
    assert not bad, f"clip/ is checkpoint and model IO and imports only utils.py: {bad}"


def test_nothing_below_main_imports_main():
    found = {m for m, deps in GRAPH.items() if "main" in deps and _under(m, "src", "clip", "merge_func", "utils")}
    assert not found, f"{sorted(found)} import main.py: the script imports the library, never the reverse"


def test_utils_is_the_bottom_layer():
    assert not GRAPH["utils"], f"utils.py imports {sorted(GRAPH['utils'])}; it must import no project module"


def test_no_cycle_in_clip_and_the_datasets():
    part = {m: {d for d in deps if _under(d, "clip", "src.datasets")}
            for m, deps in GRAPH.items() if _under(m, "clip", "src.datasets")}
    found = cycles(part)
    assert not found, (f"import cycles in clip/ and src/datasets/: {_describe(found)} "
                       f"(whole repository: {_describe(ALL_CYCLES)})")


def test_no_cycle_in_the_repository():
    assert not ALL_CYCLES, f"import cycles: {_describe(ALL_CYCLES)}"


def test_the_checker_finds_cycles_and_function_level_imports(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("def f():\n    from pkg import b\n")
    (tmp_path / "pkg" / "b.py").write_text("from . import c\nimport os\n")
    (tmp_path / "pkg" / "c.py").write_text("import pkg.a\nfrom pkg.a import f\nimport pkg.c\n")
    graph = import_graph(tmp_path)
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.c"}, "pkg.c": {"pkg.a"}}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]


if __name__ == "__main__":
    graph = import_graph(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT)
    arrows = sorted((m, d) for m, deps in graph.items() if _under(m, "clip") for d in deps if not _under(d, "clip"))
    print("clip/ ->", ", ".join(f"{m} -> {d}" for m, d in arrows) or "nothing outside clip/")
    print("imports of main below it:", sorted(m for m, deps in graph.items()
                                             if "main" in deps and _under(m, "src", "clip", "merge_func", "utils")))
    print("cycles:", _describe(cycles(graph)))
