#!/usr/bin/env python3
"""The package's shape in figures: modules over 400 lines, functions over 80, import cycles, lines,
functions with more than 7 parameters, and string-keyed reads of the typed contracts.

    python hack/code-figures.py [ROOT]      # ROOT defaults to this checkout; prints one JSON object

Import cycles are counted among the package's own modules, on every import statement (lazy ones
inside functions included: a cycle hidden behind a lazy import is still a cycle to a reader).

Parameters are counted as a caller sees them (positional, keyword-only; not self/cls, *args or
**kwargs); Kopf handlers are left out, because Kopf passes them its own keyword set.

A string-keyed read is `x["key"]` or `x.get("key")` with a key that names a field of the round's
metrics, the progress file, local mode's state or the engine's status (CONTRACT_KEYS): a place
that reads one of those documents by hand instead of through its type. Their one parser
(selflearn/contracts/, the operator's status model) is left out.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

MODULE_LIMIT, FUNCTION_LIMIT, PARAM_LIMIT = 400, 80, 7
# Keys that belong to one contract each and to nothing else in the package.
CONTRACT_KEYS = {
    "round metrics": {"train_loss", "ppl", "knowledge", "format_ok", "retention", "phase_seconds", "train_tokens",
                      "losses", "tokens_per_s", "probe_seconds", "parent_probe_reused", "qa_pairs", "held_out",
                      "correction_steps", "preference_steps"},
    "progress": {"eta_s", "phase"},
    "local state": {"promoted", "promoted_id", "serving_id", "current_round", "trainer_pid", "served_at"},
    "engine status": {"degraded", "degraded_reason", "queue_depth", "loaded_at", "last_swap_error", "swap_failures",
                      "generation_defaults"},
    "decision": {"outcome", "decision"},
    "operator status": {"activeJob", "servingCheckpoint", "nextRoundAt", "lastPerplexity", "observedGeneration",
                        "consecutiveFailures", "lastRoundAt"},
}
# Each contract's one parser, where reading its keys is the point.
PARSERS = ("selflearn/contracts/", "selflearn/operator/status.py")


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    return len([n for n in names if n not in ("self", "cls")])


def _is_kopf_handler(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Decorated by kopf.*, or written to Kopf's calling convention (its keywords and a **catch-all)."""
    for d in fn.decorator_list:
        target = d.func if isinstance(d, ast.Call) else d
        if "kopf" in ast.unparse(target):
            return True
    names = {x.arg for x in fn.args.args + fn.args.kwonlyargs}
    return fn.args.kwarg is not None and bool(names & {"patch", "body", "memo"}) and "logger" in names


def _keyed_reads(tree: ast.AST) -> list[tuple[int, str, str]]:
    out = []
    for node in ast.walk(tree):
        key = None
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) \
                and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
            key = node.slice.value
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" \
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            key = node.args[0].value
        if key is None:
            continue
        for contract, keys in CONTRACT_KEYS.items():
            if key in keys:
                out.append((node.lineno, contract, key))
    return out


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
    many_params: list[str] = []
    keyed: list[str] = []
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
                if _params(node) > PARAM_LIMIT and not _is_kopf_handler(node):
                    many_params.append(f"{rel}:{node.name} ({_params(node)})")
        if not rel.startswith(PARSERS):
            keyed += [f"{rel}:{line} {contract} [{key!r}]" for line, contract, key in _keyed_reads(tree)]
    cycles = _cycles(graph)
    return {"modules_over_400": len(big_modules), "modules_over_400_list": big_modules,
            "functions_over_80": len(long_functions), "functions_over_80_list": long_functions,
            "import_cycles": len(cycles), "import_cycles_list": [" <-> ".join(c) for c in cycles],
            "functions_over_7_params": len(many_params), "functions_over_7_params_list": many_params,
            "contract_keyed_reads": len(keyed), "contract_keyed_reads_list": keyed,
            "package_lines": total, "package_files": len(files)}


if __name__ == "__main__":
    print(json.dumps(figures(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent)))
