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
TRAINING = {"hf_gam.passes", "hf_gam.trainer", "hf_gam.config", "hf_gam.cli", "hf_gam.cli_common",
            "hf_gam.cli_flatness", "hf_gam.data", "hf_gam.sources", "hf_gam.models", "hf_gam.card", "hf_gam"}  # hf_gam itself: its __init__ imports the trainer


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
    assert "hf_gam.functional" in graph["hf_gam.directions"]  # from . import functional as GF
    assert "hf_gam.flatness._objective" in graph["hf_gam.flatness.measures"]  # from ._objective import ...
    assert "hf_gam.functional" in graph["hf_gam.flatness._objective"]  # from .. import functional as GF
    assert "hf_gam.trainer" in graph["hf_gam.cli"]  # inside a function
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycles = import_cycles(import_graph())
    assert not cycles, f"import cycles in hf_gam: {_describe(cycles)}"


def test_flatness_imports_no_training_code():
    """The diagnostics use hf_gam.functional only: no pass runner, trainer, config, CLI, data or card code, not
    even through another module."""
    graph = import_graph()
    flatness = [m for m in graph if m == "hf_gam.flatness" or m.startswith("hf_gam.flatness.")]
    assert {"hf_gam.flatness.measures", "hf_gam.flatness.report", "hf_gam.flatness._objective"} <= set(flatness)
    for module in flatness:
        bad = reachable(graph, module) & TRAINING
        assert not bad, f"{module} imports training code: {sorted(bad)}"


def test_shared_machinery_is_defined_once():
    """``second_order_context`` is defined in hf_gam.functional only (hf_gam.passes re-exports it), and exact HVPs
    (``create_graph`` double backward) are taken by functional.hvp, not re-implemented elsewhere."""
    import hf_gam.functional
    import hf_gam.passes

    assert hf_gam.passes.second_order_context is hf_gam.functional.second_order_context
    defined = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                defined.setdefault(node.name, []).append(_module_name(path))
            if _is_vjp(node):
                defined.setdefault("<autograd.grad with grad_outputs>", []).append(_module_name(path))
    assert defined["second_order_context"] == ["hf_gam.functional"]
    assert defined["<autograd.grad with grad_outputs>"] == ["hf_gam.functional"]


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


def test_every_subpackage_ships():
    """pyproject.toml lists its packages by hand: every folder of hf_gam with an ``__init__.py`` must be there (a
    missing one installs in editable mode and vanishes from the wheel)."""
    import tomllib

    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {_module_name(p) for p in PACKAGE.rglob("__init__.py")}
    assert found <= listed, f"packages missing from pyproject.toml [tool.setuptools] packages: {sorted(found - listed)}"
