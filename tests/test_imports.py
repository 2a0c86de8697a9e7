"""fastinfer's modules import in one direction (DESIGN "Data flow"): no import cycles, not even
through imports inside functions (which hid ops <-> _ops_sparse and convert <-> sparsify), and
every submodule can be the first one imported."""

from __future__ import annotations

import ast
import os
import pkgutil

import fastinfer
from conftest import run_python

PACKAGE_DIR = os.path.dirname(fastinfer.__file__)  # the installed package the tests run against


def _modules() -> dict[str, str | None]:
    """Qualified name -> source file of every module of the installed package (None for the
    compiled extensions _C and _C_cuda: they import nothing of ours)."""
    out: dict[str, str | None] = {"fastinfer": os.path.join(PACKAGE_DIR, "__init__.py")}
    for info in pkgutil.walk_packages([PACKAGE_DIR], prefix="fastinfer."):
        path = os.path.join(info.module_finder.path, info.name.rsplit(".", 1)[1])
        path = os.path.join(path, "__init__.py") if info.ispkg else path + ".py"
        out[info.name] = path if os.path.exists(path) else None
    return out


def _imports(name: str, path: str | None, modules: dict[str, str | None]) -> set[str]:
    """The fastinfer modules `name` imports anywhere in its file (functions included)."""
    out = set()
    if path is None:
        return out
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{name}: relative import (fastinfer imports absolutely)"
            base = node.module or ""
            if base != "fastinfer" and not base.startswith("fastinfer."):
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in modules:
                    out.add(sub)
                elif base in modules:
                    out.add(base)
    out.discard(name)
    return out


def test_module_list_is_complete():
    names = set(_modules())
    for expect in ("fastinfer._runtime", "fastinfer.config", "fastinfer.convert._select", "fastinfer.ops._schema",
                   "fastinfer.ops._prepared", "fastinfer.nn._base", "fastinfer.plan.rules", "fastinfer.bench.ops"):
        assert expect in names, expect


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        path.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_every_submodule_imports_first_in_a_fresh_interpreter():
    """One interpreter that has imported torch but nothing of fastinfer forks a child per submodule;
    the child imports that submodule first (so it, not fastinfer/__init__.py's order, starts the
    chain), then checks the public API is whole."""
    names = [n for n, path in sorted(_modules().items()) if path and n not in ("fastinfer", "fastinfer.__main__")]
    code = f"""
        import importlib, os, sys, traceback
        import torch
        assert not any(m.startswith("fastinfer") for m in sys.modules)
        failed = []
        for name in {names!r}:
            pid = os.fork()
            if pid == 0:
                try:
                    importlib.import_module(name)
                    import fastinfer
                    assert callable(fastinfer.prune) and callable(fastinfer.ops.int8_linear), name
                except BaseException:
                    traceback.print_exc()
                    os._exit(1)
                os._exit(0)
            if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0:
                failed.append(name)
        print("failed", failed)
    """
    res = run_python(code, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "failed []", res.stdout + res.stderr[-3000:]
