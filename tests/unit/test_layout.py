"""The layout's rules (shardproxy/__init__.py): the packages' import arrows
point one way, no module imports itself back through others, and the
sans-IO packages load neither trio nor a socket.

Every module of the tree is read (ast) and its imports of shardproxy
modules collected, those inside functions and under TYPE_CHECKING too (a
cycle that only typing closes is still a cycle of the design). The sans-IO
packages (protocol, policy, config) are also imported each in a fresh
interpreter, so that an indirect import through a library is caught.
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
# package -> the shardproxy packages it must not import
FORBIDDEN_ARROWS = {
    "protocol": {"*"},  # nothing of ours
    "policy": {"*", "-protocol", "-config"},  # only protocol and config
    "engine": {"worker", "control"},
    "control": {"engine", "worker"},
}
SANS_IO_PACKAGES = ("protocol", "policy", "config")
FORBIDDEN_LIBRARIES = {"trio", "socket", "select", "selectors", "asyncio", "ssl"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, source: str) -> set[str]:
    """The shardproxy modules (or packages) ``source`` imports, resolved."""
    package = name if name == "shardproxy" or name.count(".") == 0 else name.rsplit(".", 1)[0]
    if Path(modules().get(name, Path())).name == "__init__.py":
        package = name
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "shardproxy"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            if module.split(".")[0] != "shardproxy":
                continue
            known = modules()
            for alias in node.names:  # `from shardproxy.x import y`: y may be a module
                sub = f"{module}.{alias.name}"
                found.add(sub if sub in known else module)
    return found - {name}


def top_package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def arrow_violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, targets in sorted(graph.items()):
        rule = FORBIDDEN_ARROWS.get(top_package(module))
        if rule is None:
            continue
        allowed = {r[1:] for r in rule if r.startswith("-")} | {top_package(module)}
        for target in sorted(targets):
            pkg = top_package(target)
            if pkg in allowed:
                continue
            if "*" in rule or pkg in rule:
                found.append(f"{module} imports {target}")
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle's modules (Tarjan's strongly connected components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
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
    return found


def package_graph() -> dict[str, set[str]]:
    # A package's __init__ imports nothing here but its own modules, so
    # module-level edges are the design's; "shardproxy" itself (version) is
    # a leaf everyone may use.
    graph = {n: imports_of(n, p.read_text()) for n, p in modules().items()}
    return {n: {t for t in ts if t != "shardproxy"} for n, ts in graph.items()}


def test_the_import_arrows_point_one_way() -> None:
    graph = package_graph()
    assert len(graph) > 30 and sum(map(len, graph.values())) > 60  # it read the tree
    assert arrow_violations(graph) == []


def test_no_module_imports_itself_back() -> None:
    assert cycles(package_graph()) == []


def test_the_checks_see_what_they_look_for() -> None:
    graph = {
        "shardproxy.protocol.frames": {"shardproxy.config"},
        "shardproxy.policy.balancer": {"shardproxy.protocol.http1", "shardproxy.engine.relay"},
        "shardproxy.engine.relay": {"shardproxy.worker.process"},
        "shardproxy.control.admin": {"shardproxy.telemetry.metrics"},
        "shardproxy.telemetry.metrics": {"shardproxy.control.admin"},
    }
    assert arrow_violations(graph) == [
        "shardproxy.engine.relay imports shardproxy.worker.process",
        "shardproxy.policy.balancer imports shardproxy.engine.relay",
        "shardproxy.protocol.frames imports shardproxy.config",
    ]
    assert cycles(graph) == [["shardproxy.control.admin", "shardproxy.telemetry.metrics"]]
    source = "from shardproxy.protocol import frames\nfrom ..config import Config\n"
    assert imports_of("shardproxy.engine.relay", source) == {
        "shardproxy.protocol.frames",
        "shardproxy.config",
    }


SANS_IO = sorted(  # their modules (config's is its package's __init__)
    n
    for n, p in modules().items()
    if top_package(n) in SANS_IO_PACKAGES and (p.name != "__init__.py" or n == "shardproxy.config")
)


def loaded_forbidden(module: str) -> set[str]:
    """The forbidden libraries present after importing ``module`` in a fresh interpreter."""
    # -I: no user site, no PYTHON* variables; put this source tree first by hand.
    script = (
        "import importlib, json, sys\n"
        f"sys.path.insert(0, {str(PACKAGE.parent)!r})\n"
        f"m = importlib.import_module({module!r})\n"
        "mods = {n.split('.')[0] for n in sys.modules}\n"
        f"print(json.dumps([m.__file__, sorted(mods & set({sorted(FORBIDDEN_LIBRARIES)!r}))]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    path, found = json.loads(result.stdout)
    if module.startswith("shardproxy"):
        # The module under test is this tree's, not some installed copy.
        assert PACKAGE in Path(path).resolve().parents
    return set(found)


@pytest.mark.parametrize("name", SANS_IO)
def test_sans_io_modules_load_no_trio_and_no_socket(name: str) -> None:
    assert loaded_forbidden(name) == set()


@pytest.mark.parametrize("name", SANS_IO)
def test_sans_io_sources_import_no_trio_and_no_socket(name: str) -> None:
    tree = ast.parse(modules()[name].read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            imported.add("__import__")
    assert imported, "found no imports at all: is this the module's source?"
    assert imported & (FORBIDDEN_LIBRARIES | {"__import__", "importlib"}) == set()


def test_the_probe_sees_what_it_looks_for() -> None:
    # Controls: the same probe reports trio and socket where they are loaded,
    # and a bare interpreter loads none of them by itself.
    assert len(SANS_IO) >= 10, SANS_IO
    assert {"trio", "socket"} <= loaded_forbidden("trio")
    assert "socket" in loaded_forbidden("socket")
    assert loaded_forbidden("json") == set()
