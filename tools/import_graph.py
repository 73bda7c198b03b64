"""Draw vitcli's import graph from the source (ast, nothing imported) and check the layering.

    python tools/import_graph.py            # the module graph grouped by layer, then the checks
    python tools/import_graph.py --mermaid  # the layer graph as a Mermaid flowchart

Layers, from top to bottom: cli -> services -> (explain, data, weights) -> model, with the
shared base (errors, fileio, runtime, distributed, _version) below all of them. An import may
point down or sideways within its own layer, never up; `model/` imports torch and the standard
library only; `services/` never imports typer or rich. Exit status 1 when a rule is broken or
there is a cycle.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "vitcli"

# Lower number = lower layer. A module may import modules of its own layer or below.
LAYERS = {
    "cli": 4,
    "console": 4,  # rich lives here, for the CLI only
    "__main__": 4,
    "__init__": 4,  # the public API re-exports from everywhere, lazily
    "services": 3,
    "explain": 2,  # the explanation maths, beside data and weights, above model
    "data": 2,
    "weights": 2,
    "model": 1,
    "runtime": 0,
    "distributed": 0,
    "errors": 0,
    "fileio": 0,
    "text": 0,
    "_version": 0,
}
# (importer's top-level part, imported top-level part): sideways imports within one layer that
# are allowed. weights needs data's Preprocess; data never needs weights.
ALLOWED_SIDEWAYS = {("weights", "data")}
# Layers whose parts may import each other freely (the command line; the shared base).
OPEN_LAYERS = {4, 0}
FORBIDDEN_THIRD_PARTY = {
    "model": {"PIL", "rich", "typer", "safetensors", "numpy"},
    "services": {"typer", "rich"},
    "data": {"typer", "rich"},
    "weights": {"typer", "rich"},
    "explain": {"typer", "rich", "PIL"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def resolve(importer: str, is_package: bool, level: int, target: str | None) -> str:
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    if importer == "__init__":
        base = []
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, *([target] if target else [])])


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node except those under `if TYPE_CHECKING:` (annotations only, never imported)."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    return [node for node in ast.walk(tree) if id(node) not in skipped]


def collect() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """({module: modules of vitcli it imports}, {module: third-party top-level names})."""
    internal: dict[str, set[str]] = defaultdict(set)
    external: dict[str, set[str]] = defaultdict(set)
    modules = {module_name(p) for p in ROOT.rglob("*.py")}
    for path in sorted(ROOT.rglob("*.py")):
        name = module_name(path)
        internal[name]
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in _runtime_nodes(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    top = (node.module or "").split(".")[0]
                    if top == "vitcli":
                        internal[name].add((node.module or "").removeprefix("vitcli."))
                    else:
                        external[name].add(top)
                    continue
                target = resolve(name, is_package, node.level, node.module)
                for alias in node.names:
                    candidate = f"{target}.{alias.name}" if target else alias.name
                    internal[name].add(candidate if candidate in modules else target)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    top = alias.name.split(".")[0]
                    if top == "vitcli":
                        internal[name].add(alias.name.removeprefix("vitcli."))
                    else:
                        external[name].add(top)
    for name in internal:
        internal[name] = {t for t in internal[name] if t and t != name}
    return internal, external


def top(module: str) -> str:
    return module.split(".")[0]


def check(internal: dict[str, set[str]], external: dict[str, set[str]]) -> list[str]:
    problems = []
    for importer, targets in sorted(internal.items()):
        for target in sorted(targets):
            a, b = top(importer), top(target)
            if a == b or a not in LAYERS or b not in LAYERS:
                continue
            sideways = LAYERS[b] == LAYERS[a] and LAYERS[a] not in OPEN_LAYERS
            if LAYERS[b] > LAYERS[a] or (sideways and (a, b) not in ALLOWED_SIDEWAYS):
                problems.append(f"{importer} imports {target}: {a} may not import {b}")
    for importer, names in sorted(external.items()):
        forbidden = FORBIDDEN_THIRD_PARTY.get(top(importer), set()) & names
        if forbidden:
            problems.append(f"{importer} imports {', '.join(sorted(forbidden))}")
    # Cycles between modules (depth-first search).
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(internal.get(node, ())):
            if state.get(nxt) == 1:
                problems.append("cycle: " + " -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt in internal and nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(internal):
        if node not in state:
            visit(node)
    return problems


def layer_edges(internal: dict[str, set[str]]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for importer, targets in internal.items():
        for target in targets:
            if top(importer) != top(target):
                edges[top(importer)].add(top(target))
    return edges


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mermaid", action="store_true", help="print the layer graph as Mermaid")
    args = parser.parse_args()
    internal, external = collect()
    if args.mermaid:
        print("flowchart TD")
        for importer, targets in sorted(layer_edges(internal).items()):
            for target in sorted(targets):
                print(f"    {importer} --> {target}")
    else:
        for importer in sorted(internal, key=lambda m: (-LAYERS.get(top(m), 0), m)):
            targets = ", ".join(sorted(internal[importer])) or "-"
            print(f"{importer:32} -> {targets}")
    problems = check(internal, external)
    for problem in problems:
        print(f"layering: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
