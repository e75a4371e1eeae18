"""How this process was started, for the processes and commands it hands on.

shardproxy runs from a venv (``pip install``) or from the single-file build
(``scripts/build-zipapp``: a shiv zipapp whose first line runs the system
Python with ``-sE``). In the second case the system Python alone cannot
import shardproxy or its dependencies: shiv unpacked them into its own
site-packages directory and put that on this process's ``sys.path`` only.
"""

from __future__ import annotations

import os
import sys
import zipfile
from pathlib import Path

import shardproxy

# The directory shardproxy was imported from: a venv's site-packages, the
# source tree, or the directory shiv unpacked the zipapp's packages into.
PACKAGES = str(Path(shardproxy.__file__).resolve().parent.parent)


def module_command(module: str, *args: str) -> tuple[list[str], dict[str, str]]:
    """The command and environment that run ``python -m module args`` with
    the same interpreter and the same packages as this process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = PACKAGES  # the packages this process runs; nothing else
    return [sys.executable, "-m", module, *args], env


def zipapp() -> str | None:
    """The path of the single-file build this process runs from, or None."""
    argv0 = sys.argv[0] if sys.argv else ""
    if argv0 and os.path.isfile(argv0) and zipfile.is_zipfile(argv0):
        return os.path.abspath(argv0)
    return None


def websocket_client_command(url: str) -> str:
    """A shell line that opens an interactive WebSocket client (the
    ``websockets`` package's) on ``url``, wherever shardproxy runs from."""
    archive = zipapp()
    if archive is not None:  # shiv runs another entry point of the same file
        return f"SHIV_ENTRY_POINT=websockets.__main__:main {archive} {url}"
    return f"{sys.executable} -m websockets {url}"
