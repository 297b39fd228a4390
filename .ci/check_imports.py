"""The package's import graph must read as its design: layers that only point down, no cycle.

    python .ci/check_imports.py [PACKAGE_DIR]     # default: grad_jax next to this folder

Reads every module's imports (with `ast`, importing nothing) and fails, naming the modules, when
- a module is not placed in a layer below (a new module must be placed where it belongs);
- a module imports a module of a higher layer;
- the modules import each other in a cycle (within a layer too);
- a project module is imported inside a function, except where `LAZY` allows it and says why.
"""

from __future__ import annotations

import ast
import pathlib
import sys

# Bottom to top. A module may import modules of its own layer (without a cycle) and below.
# Module names are relative to the package; a folder ("models") stands for every module in it.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("errors", ("errors",)),
    ("foundations", ("files", "devices")),
    ("models", ("models",)),
    ("config and weights", ("config", "configs", "weights")),
    ("data", ("data",)),
    ("runs", ("runs",)),
    ("inference", ("inference",)),
    ("evaluation", ("evaluation",)),
    ("training", ("training",)),
    ("selection", ("selection",)),
    ("serving", ("serving",)),
    ("commands", ("cli", "main", "predict", "convert", "export", "serve", "benchmark")),
)

# Project imports inside functions that are allowed, and why (importer -> {imported: reason}).
LAZY: dict[str, dict[str, str]] = {
    "inference.loader": {
        "inference.predictor": "a run folder needs the training stack; an exported model does not",
    },
    "serve": {"serving.service": "fastapi (the [serve] extra) loads after the flags are checked"},
}


def _layer_of(module: str) -> int | None:
    for number, (_, members) in enumerate(LAYERS):
        for member in members:
            if module == member or module.startswith(member + "."):
                return number
    return None


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(tree: ast.Module, module: str, package: str, is_package: bool):
    """(imported module, inside a function) for every project import of `tree`."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: resolve against this module's package
                    here = module.split(".") if is_package else module.split(".")[:-1]
                    here = here[: len(here) - (child.level - 1)]
                    base = ".".join([package, *here, *([base] if base else [])])
                names = [base] + [f"{base}.{alias.name}" for alias in child.names]
            else:
                visit(child, inner)
                continue
            for name in names:
                if name == package or name.startswith(package + "."):
                    found.append((name[len(package) + 1 :], in_function))

    visit(tree, False)
    return found


def check(package_dir: pathlib.Path) -> list[str]:
    """Every violation in the package at `package_dir`, as readable lines (empty: all good)."""
    package_dir = package_dir.resolve()
    package = package_dir.name
    modules = {
        _module_name(p, package_dir): p
        for p in sorted(package_dir.rglob("*.py"))
        if "__pycache__" not in p.parts
    }
    modules.pop("", None)  # the package's own __init__
    problems: list[str] = []
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        layer = _layer_of(module)
        if layer is None:
            problems.append(f"{module}: not in any layer of .ci/check_imports.py; place it")
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for target, in_function in _imports(tree, module, package, path.name == "__init__.py"):
            target = _resolve(target, modules)
            if target is None or target == module:
                continue
            graph[module].add(target)
            target_layer = _layer_of(target)
            if target_layer is not None and target_layer > layer:
                problems.append(
                    f"{module} ({LAYERS[layer][0]}) imports {target} "
                    f"({LAYERS[target_layer][0]}), a higher layer"
                )
            allowed = LAZY.get(module, {})  # a lazy `from pkg import mod` also names `pkg`
            if in_function and not any(a == target or a.startswith(target + ".") for a in allowed):
                problems.append(
                    f"{module} imports {target} inside a function; import it at the top, or "
                    "list it in LAZY with the reason (a heavy optional dependency)"
                )
    problems += _cycles(graph)
    return problems


def _resolve(target: str, modules: dict) -> str | None:
    """The project module `target` names (`a.b.Name` -> `a.b`), or None (the package)."""
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    """One line per import cycle found by a depth-first search."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    stack: list[str] = []
    found: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                found.append("import cycle: " + " -> ".join(cycle))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def main(argv: list[str]) -> int:
    here = pathlib.Path(__file__).resolve().parent.parent
    package_dir = pathlib.Path(argv[1]) if len(argv) > 1 else here / "grad_jax"
    problems = check(package_dir)
    for line in problems:
        print(f"check_imports: {line}", file=sys.stderr)
    if not problems:
        print(f"check_imports: {package_dir.name}: layers point down, no cycle")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
