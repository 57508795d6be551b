"""Architecture rules of the package, checked on its source: the import graph of hf_gam's modules has no cycle, the
flatness diagnostics do not reach training code, shared machinery is defined once, and ``import hf_gam`` does not
load matplotlib.

The graph is built with ``ast`` over ``hf_gam/**/*.py``: an edge ``a -> b`` for every ``import``/``from ... import``
of an hf_gam module ``b`` anywhere in ``a`` (module level and inside functions: a lazy import still couples the two),
relative imports resolved, ``from pkg import name`` counted as an import of ``pkg.name`` when that is a module.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path


PACKAGE = Path(__file__).resolve().parents[1] / "hf_gam"
# Floors: what each part of the package may import of hf_gam (a module belongs to the longest prefix listed).
# hf_gam itself (its __init__) and __main__ sit on top and may import anything.
FLOORS = {
    "hf_gam.errors": set(),
    "hf_gam.formatting": set(),
    "hf_gam.testing": set(),
    "hf_gam.core": {"hf_gam.core"},
    "hf_gam.metrics": {"hf_gam.metrics", "hf_gam.errors"},
    "hf_gam.data": {"hf_gam.data", "hf_gam.errors"},
    "hf_gam.flatness": {"hf_gam.flatness", "hf_gam.core.functional", "hf_gam.formatting"},
    "hf_gam.optim": {"hf_gam.core"},
    "hf_gam.trainer": {"hf_gam.trainer", "hf_gam.core", "hf_gam.flatness", "hf_gam.formatting", "hf_gam.errors"},
    "hf_gam.cli": {"hf_gam.cli", "hf_gam.core", "hf_gam.trainer", "hf_gam.data", "hf_gam.flatness",
                   "hf_gam.metrics", "hf_gam.formatting", "hf_gam.errors"},
}
TRAINING = {"hf_gam.core.step", "hf_gam.core.oracles", "hf_gam.trainer", "hf_gam.trainer.trainer",
            "hf_gam.trainer.config", "hf_gam.cli", "hf_gam.cli.common", "hf_gam.cli.flatness", "hf_gam.data",
            "hf_gam.data.sources", "hf_gam.cli.models", "hf_gam.trainer.card", "hf_gam"}  # hf_gam: imports the trainer


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """``{module: {hf_gam modules it imports}}`` for every module of the package."""
    paths = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                for alias in node.names:
                    sub = f"{module}.{alias.name}"
                    targets.add(sub if sub in paths else module)
        graph[name] = {t for t in targets if t in paths and t != name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted; sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def _describe(cycles: list[list[str]]) -> str:
    return "; ".join(" <-> ".join(c) for c in cycles)


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph[todo.pop()] - seen:
            seen.add(w)
            todo.append(w)
    return seen


def test_the_graph_sees_known_edges():
    """The checker itself: relative, absolute, ``from . import module`` and function-level imports are edges."""
    graph = import_graph()
    assert "hf_gam.core.functional" in graph["hf_gam.core.directions"]  # from . import functional
    assert "hf_gam.flatness._objective" in graph["hf_gam.flatness.measures"]  # from ._objective import ...
    assert "hf_gam.core.functional" in graph["hf_gam.flatness._objective"]  # from ..core import functional
    assert "hf_gam.trainer" in graph["hf_gam.cli.train"]  # inside a function
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycles = import_cycles(import_graph())
    assert not cycles, f"import cycles in hf_gam: {_describe(cycles)}"


def floor_of(module: str) -> str | None:
    """The entry of :data:`FLOORS` a module belongs to (the longest matching prefix), ``None`` for the top."""
    matches = [f for f in FLOORS if module == f or module.startswith(f + ".")]
    return max(matches, key=len) if matches else None


def _allowed(target: str, allowed: set[str]) -> bool:
    return any(target == a or target.startswith(a + ".") for a in allowed)


def test_floors():
    """Each part of the package imports only the floors below it (FLOORS): the core nothing else of hf_gam, the
    diagnostics the core's tensor math only, no arrow up (e.g. the trainer never imports the CLI)."""
    graph = import_graph()
    assert floor_of("hf_gam.core.step") == "hf_gam.core" and floor_of("hf_gam") is None
    violations = []
    for module, targets in sorted(graph.items()):
        floor = floor_of(module)
        if floor is None:
            continue
        violations += [f"{module} -> {t}" for t in sorted(targets) if not _allowed(t, FLOORS[floor])]
    assert not violations, "imports against the floors: " + "; ".join(violations)


def test_every_module_has_a_floor():
    """A new top-level module or subpackage gets its floor in FLOORS (or it escapes the check above)."""
    top = {"hf_gam", "hf_gam.__main__"}
    unplaced = sorted(m for m in import_graph() if m not in top and floor_of(m) is None)
    assert not unplaced, f"modules without a floor in tests/test_architecture.py FLOORS: {unplaced}"


def test_flatness_imports_no_training_code():
    """The diagnostics use hf_gam.core.functional only: no pass runner, trainer, config, CLI, data or card code, not
    even through another module."""
    graph = import_graph()
    flatness = [m for m in graph if m == "hf_gam.flatness" or m.startswith("hf_gam.flatness.")]
    assert {"hf_gam.flatness.measures", "hf_gam.flatness.report", "hf_gam.flatness._objective"} <= set(flatness)
    for module in flatness:
        bad = reachable(graph, module) & TRAINING
        assert not bad, f"{module} imports training code: {sorted(bad)}"


def test_shared_machinery_is_defined_once():
    """``second_order_context`` is defined in hf_gam.core.functional only, exact HVPs (``create_graph`` double
    backward) are taken by functional.hvp, not re-implemented elsewhere, and "how many processes" is asked in
    hf_gam.core.collectives only (``world_size``)."""
    defined = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                defined.setdefault(node.name, []).append(_module_name(path))
            if _is_vjp(node):
                defined.setdefault("<autograd.grad with grad_outputs>", []).append(_module_name(path))
    assert defined["second_order_context"] == ["hf_gam.core.functional"]
    assert defined["<autograd.grad with grad_outputs>"] == ["hf_gam.core.functional"]
    assert defined["world_size"] == ["hf_gam.core.collectives"]
    asked = sorted({_module_name(p) for p in PACKAGE.rglob("*.py") if "get_world_size(" in p.read_text()})
    assert asked == ["hf_gam.core.collectives"], f"world size asked outside hf_gam.core.collectives: {asked}"


def test_user_errors_have_one_base_caught_once():
    """Every user-error class of the package derives from hf_gam.errors.UserError (only UserError itself subclasses
    ValueError directly), and the command line catches user errors in one place, by that base."""
    direct, handlers = [], []
    for path in PACKAGE.rglob("*.py"):
        module = _module_name(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and "ValueError" in {_name(b) for b in node.bases}:
                direct.append(f"{module}.{node.name}")
            if isinstance(node, ast.ExceptHandler) and node.type is not None and module.startswith("hf_gam.cli"):
                caught = node.type.elts if isinstance(node.type, ast.Tuple) else [node.type]
                names = {_name(c) for c in caught}
                if names & {"UserError", "UsageError", "DataError", "ModelLoadError", "MetricLoadError",
                            "CheckpointMismatchError"}:
                    handlers.append((module, sorted(names)))
    assert direct == ["hf_gam.errors.UserError"], f"user errors not derived from UserError: {direct}"
    assert handlers == [("hf_gam.cli", ["UserError"])], handlers


def _name(node: ast.AST) -> str:
    return node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")


def _is_vjp(node: ast.AST) -> bool:
    """``torch.autograd.grad(outputs, inputs, grad_outputs, ...)``: the second backward of an HVP."""
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "grad"
            and isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "autograd"
            and (len(node.args) >= 3 or any(k.arg == "grad_outputs" for k in node.keywords)))


def test_import_hf_gam_does_not_load_matplotlib():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE.parent), os.environ.get("PYTHONPATH", "")])}
    code = ("import sys, hf_gam, hf_gam.flatness; assert hf_gam.__file__.startswith(sys.argv[1]), hf_gam.__file__; "
            "assert 'matplotlib' not in sys.modules, 'import hf_gam loaded matplotlib'")
    done = subprocess.run([sys.executable, "-c", code, str(PACKAGE)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_every_subpackage_is_found():
    """pyproject.toml finds the packages (no hand-written list): every folder of hf_gam with ``.py`` modules has an
    ``__init__.py`` (the evaluate metric modules and the card template aside: package data), and setuptools' own
    discovery with the project's settings finds every one of them. The built wheel is checked in test_cli.py."""
    import tomllib

    from setuptools import find_packages

    find = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    found = set(find_packages(str(PACKAGE.parent), include=find["include"]))
    folders = {_module_name(p.parent / "__init__.py") for p in PACKAGE.rglob("*.py")
               if PACKAGE / "metrics" not in p.parents or p.parent == PACKAGE / "metrics"}
    assert folders <= found, f"folders of modules not found as packages: {sorted(folders - found)}"
