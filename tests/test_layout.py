"""The package layout is the architecture: every import of every module (module level, inside
functions, under TYPE_CHECKING) points down the layers, and no modules import each other in a circle."""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "hobbit"

# what each part of hobbit may import (besides itself); cli may import anything
ALLOWED = {
    "paths": set(),                                         # where hobbit keeps what it builds
    "policies": set(),                                      # torch-free decisions
    "kernels": {"paths"},                                   # native CPU kernels, built on first use
    "store": {"kernels"},                                   # the on-disk formats and readers
    "runtime": {"store", "policies"},                       # the engine
    "serve": {"runtime", "store", "policies"},              # on top of the engine
    "models": {"runtime", "store", "policies", "paths"},    # making models to run
    "lab": {"runtime", "store", "policies", "models", "kernels"},  # measuring the engine
    "hobbit": {"runtime"},                                  # hobbit/__init__.py: hobbit.load
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path) -> set[str]:
    """Every hobbit module `path` imports, wherever the import statement is."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from hobbit.x import y`: y is a module of its own or a name in hobbit.x
            out |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                    for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            raise AssertionError(f"{path}: relative import (use absolute hobbit.* imports)")
    return {m for m in out if m == "hobbit" or m.startswith("hobbit.")}


def part(module: str) -> str:
    """'runtime' for hobbit.runtime.engine, 'cli' for hobbit.cli, 'hobbit' for hobbit itself."""
    return module.split(".")[1] if "." in module else "hobbit"


GRAPH = {m: imports(p) for m, p in MODULES.items()}


def test_every_import_points_down_the_layers():
    bad = []
    for m, deps in GRAPH.items():
        if part(m) == "cli":
            continue
        allowed = ALLOWED[part(m)] | {part(m)}
        bad += [f"{m} -> {d}" for d in sorted(deps) if part(d) not in allowed]
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_import_cycles():
    """No circle of modules, however lazily imported (package __init__s only import downwards too)."""
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH.get(v, ()):
            if w not in GRAPH:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in GRAPH[v]:
                cycles.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_policies_import_only_the_standard_library():
    for m, p in MODULES.items():
        if part(m) != "policies":
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            for name in names:
                top = name.split(".")[0]
                assert top in sys.stdlib_module_names or name.startswith("hobbit.policies") or top == "__future__", \
                    f"{m} imports {name}: policies are torch-free and stand alone"


def test_imports_resolve_to_modules():
    """The graph above is real: every hobbit import names an existing module (or a name inside one)."""
    missing = sorted({d for deps in GRAPH.values() for d in deps if d not in MODULES})
    assert not missing, f"imports of modules that do not exist: {missing}"


def test_architecture_lists_every_module():
    """ARCHITECTURE.md's module table names every module there is, and only those."""
    text = (SRC.parent / "ARCHITECTURE.md").read_text()
    table = text[text.index("## Modules"):]
    table = table[:table.index("\n## ")]
    listed = {m.group(1) for m in re.finditer(r"^\| `([\w/]+\.py)` \|", table, re.M)}
    there = {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    assert listed == there, f"not in ARCHITECTURE.md: {sorted(there - listed)}; no such module: {sorted(listed - there)}"
