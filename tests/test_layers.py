"""The layers, kept honest: which module may import which, checked by walking the imports."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dcache"
SANS_IO = ("codec", "ops", "protocol", "shard", "store", "events", "wsframe", "net", "shellwords", "security")
NO_EVENT_LOOP = (*SANS_IO, "client", "commands", "cli", "errors")
NODE = ("node", "router", "reactor", "peers", "membership", "metrics", "localcluster")


def imports_of(module: str) -> set[str]:
    """The dcache modules ``module`` imports, at its top or inside functions."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    for node in ast.walk(tree):  # imports for type annotations only are not imports at run time
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            node.body = []
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dcache."):
            found.add(node.module.split(".")[1])
    return found - {module}


def modules() -> list[str]:
    return sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__"))


def test_no_two_modules_import_each_other_nor_any_cycle() -> None:
    graph = {m: imports_of(m) & set(modules()) for m in modules()}
    # Imports at the top of a module and inside its functions both count: a
    # cycle through a function's import is still a cycle in the design.
    visiting: list[str] = []
    done: set[str] = set()

    def visit(m: str) -> None:
        if m in done:
            return
        assert m not in visiting, f"import cycle: {' -> '.join(visiting[visiting.index(m) :] + [m])}"
        visiting.append(m)
        for other in sorted(graph[m]):
            visit(other)
        visiting.pop()
        done.add(m)

    for m in graph:
        visit(m)


@pytest.mark.parametrize("module", NO_EVENT_LOOP)
def test_the_sans_io_side_and_the_one_shot_cli_load_no_trio(module: str) -> None:
    code = f"import sys, dcache.{module}; print(sorted(m for m in ('trio', 'dcache.aio', 'dcache.transport', 'dcache.node') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


@pytest.mark.parametrize("module", ("client", "aio", "commands", "shell", "bench"))
def test_the_user_side_imports_nothing_of_the_node(module: str) -> None:
    # (cli is the whole executable: its `serve` runs a node.)
    assert not imports_of(module) & set(NODE)


@pytest.mark.parametrize("module", NODE)
def test_the_node_imports_nothing_of_the_command_line(module: str) -> None:
    assert not imports_of(module) & {"cli", "shell", "commands", "bench", "aio"}


@pytest.mark.parametrize("module", SANS_IO)
def test_sans_io_modules_import_only_sans_io_modules(module: str) -> None:
    assert imports_of(module) <= {*SANS_IO, "errors"}, imports_of(module)
