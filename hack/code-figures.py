#!/usr/bin/env python3
"""The package's shape in figures: modules over 400 lines, functions over 80, import cycles, lines.

    python hack/code-figures.py [ROOT]      # ROOT defaults to this checkout; prints one JSON object

Import cycles are counted among the package's own modules, on every import statement (lazy ones
inside functions included: a cycle hidden behind a lazy import is still a cycle to a reader).
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

MODULE_LIMIT, FUNCTION_LIMIT = 400, 80


def _module_name(pkg_root: Path, path: Path) -> str:
    parts = list(path.relative_to(pkg_root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST, module: str, is_pkg: bool, known: set[str]) -> set[str]:
    out: set[str] = set()
    package = module if is_pkg else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), i.e. import cycles; a
    package's __init__ importing its own submodules is not one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return found


def figures(root: Path) -> dict:
    pkg = root / "selflearn"
    files = sorted(p for p in pkg.rglob("*.py") if "__pycache__" not in p.parts)
    known = {_module_name(pkg, p) for p in files}
    graph: dict[str, set[str]] = {}
    big_modules, long_functions, total = [], [], 0
    for path in files:
        text = path.read_text()
        lines = text.count("\n")
        total += lines
        rel = str(path.relative_to(root))
        if lines > MODULE_LIMIT:
            big_modules.append(f"{rel} ({lines})")
        tree = ast.parse(text)
        module = _module_name(pkg, path)
        deps = _imports(tree, module, path.name == "__init__.py", known)
        # A package's __init__ pulling in its submodules, and a submodule reaching its package,
        # is how packages work, not a cycle between concepts.
        graph[module] = {d for d in deps if not (d.startswith(module + ".") or module.startswith(d + "."))}
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > FUNCTION_LIMIT:
                    long_functions.append(f"{rel}:{node.name} ({n})")
    cycles = _cycles(graph)
    return {"modules_over_400": len(big_modules), "modules_over_400_list": big_modules,
            "functions_over_80": len(long_functions), "functions_over_80_list": long_functions,
            "import_cycles": len(cycles), "import_cycles_list": [" <-> ".join(c) for c in cycles],
            "package_lines": total, "package_files": len(files)}


if __name__ == "__main__":
    print(json.dumps(figures(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent)))
