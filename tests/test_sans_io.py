"""STYLE habit 1: protocol logic imports no trio and touches no socket.

Each module is imported in a fresh interpreter and the modules it loaded are
inspected, so that an indirect import (through a helper module or a library)
is caught as well as a direct one. The module's own source is also checked
for direct imports, which catches an import hidden inside a function.

None of the standard-library or h11 modules these use pulls in ``socket``
(checked: http.cookies, urllib.parse, hashlib, decimal, tomllib, h11), so the
strict check applies to all of them; should that change, the control test
below shows what the bare interpreter loads.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import shardproxy

PACKAGE = Path(shardproxy.__file__).resolve().parent
SANS_IO = (
    "frames",
    "http1",
    "handshake",
    "config",
    "balancer",
    "routing",
    "stats",
    "sampling",
    "proxyproto",
    "admission",
    "decisions",
)
FORBIDDEN = {"trio", "socket", "select", "selectors", "asyncio", "ssl"}


def loaded_forbidden(module: str) -> set[str]:
    """The forbidden modules present after importing ``module`` in a fresh interpreter."""
    # -I: no user site, no PYTHON* variables; put this source tree first by hand.
    script = (
        "import importlib, json, sys\n"
        f"sys.path.insert(0, {str(PACKAGE.parent)!r})\n"
        f"m = importlib.import_module({module!r})\n"
        "mods = {n.split('.')[0] for n in sys.modules}\n"
        f"print(json.dumps([m.__file__, sorted(mods & set({sorted(FORBIDDEN)!r}))]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", script],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    path, found = json.loads(result.stdout)
    if module.startswith("shardproxy."):
        # The module under test is this tree's, not some installed copy.
        assert Path(path).resolve().parent == PACKAGE
    return set(found)


@pytest.mark.parametrize("name", SANS_IO)
def test_importing_loads_no_trio_and_no_socket(name: str) -> None:
    assert loaded_forbidden(f"shardproxy.{name}") == set()


@pytest.mark.parametrize("name", SANS_IO)
def test_source_imports_no_trio_and_no_socket(name: str) -> None:
    tree = ast.parse((PACKAGE / f"{name}.py").read_text(), filename=f"{name}.py")
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            imported.add("__import__")
    assert imported, "found no imports at all: is this the module's source?"
    assert imported & (FORBIDDEN | {"__import__", "importlib"}) == set()


def test_the_check_sees_what_it_looks_for() -> None:
    # Controls: the same probe reports trio and socket where they are loaded,
    # and a bare interpreter loads none of them by itself.
    assert {"trio", "socket"} <= loaded_forbidden("trio")
    assert "socket" in loaded_forbidden("socket")
    assert loaded_forbidden("json") == set()
