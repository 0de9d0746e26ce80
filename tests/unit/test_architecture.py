"""The package's shape: no import cycle, and each layer imports only the layers below it (README, Architecture)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "kdrun"
# Lowest first: a module may import its own layer and the ones before it, never a later one.
LAYERS = ["core", "data", "models", "losses", "training", "reporting", "config", "pipeline", "cli"]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path, known: set[str]) -> set[str]:
    """Every kdrun module ``path`` imports, anywhere in the file (function-local imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("kdrun")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kdrun") and not node.level:
            for alias in node.names:  # ``from kdrun.core import distributed`` imports a module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return {m for m in found if m in known}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, set(mods)) - {name} for name, path in mods.items()}


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_subpackage_is_a_layer_with_a_docstring():
    # kdrun.conf is the YAML package (the top-level conf/, linked into a worktree's kdrun/), not a code layer
    subpackages = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py") if p.parent.name != "conf")
    assert set(subpackages) == set(LAYERS), "a new subpackage needs its place in LAYERS and the README"
    for name in subpackages:
        tree = ast.parse((PACKAGE / name / "__init__.py").read_text())
        assert ast.get_docstring(tree), f"kdrun/{name}/__init__.py needs a one-line docstring of its job"


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])


def test_lower_layers_never_import_higher_ones():
    violations = [
        f"{src} ({LAYERS[layer(src)]}) imports {dst} ({LAYERS[layer(dst)]})"
        for src, targets in graph().items()
        for dst in targets
        if layer(src) is not None and layer(dst) is not None and layer(dst) > layer(src)
    ]
    assert not violations, "\n".join(violations)


def test_the_checks_themselves_catch_a_cycle_and_a_violation(tmp_path):
    """The graph builder sees function-local imports and ``from pkg import module`` (the forms that hid cycles)."""
    (tmp_path / "a.py").write_text("def f():\n    from kdrun.core import distributed\n")
    (tmp_path / "b.py").write_text("from kdrun.pipeline.run import run\n")
    known = {"kdrun.core.distributed", "kdrun.core", "kdrun.pipeline.run"}
    assert imports(tmp_path / "a.py", known) == {"kdrun.core.distributed"}
    assert imports(tmp_path / "b.py", known) == {"kdrun.pipeline.run"}
    assert layer("kdrun.pipeline.run") > layer("kdrun.training.loop")


MAX_FUNCTION_LINES = 60


def test_every_function_fits_on_one_screen():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}: {lines} lines")
    assert not long, "\n".join(long)
