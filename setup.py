"""The compiled engine (shardproxy/engine/_cengine.c), built when it can be.

Everything else about the package is in pyproject.toml. Where no compiler
or no Python headers exist, the install still succeeds and shardproxy runs
its Python engines, saying so (``shardproxy version``); with
``SHARDPROXY_BUILD_EXTENSION=yes`` (CI) a failed build fails the install.
Warnings are errors (the same flags as scripts/test-sanitized, which builds
it with ASan and UBSan for the tests).
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

REQUIRED = os.environ.get("SHARDPROXY_BUILD_EXTENSION", "").lower() in ("1", "yes", "true")

CFLAGS = ["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-Wconversion", "-Wno-sign-conversion"]


class OptionalBuildExt(build_ext):
    """build_ext that lets the install go on without the extension, unless
    SHARDPROXY_BUILD_EXTENSION says it is required."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as e:  # no compiler at all
            self._skip(e)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as e:  # a compiler that failed
            self._skip(e)

    def _skip(self, error: Exception) -> None:
        if REQUIRED:
            raise error
        print(
            f"shardproxy: the compiled engine was not built ({error}); the Python engines will run",
            file=sys.stderr,
        )


setup(
    ext_modules=[
        Extension(
            "shardproxy.engine._cengine",
            [
                "shardproxy/engine/_cengine.c",
                "shardproxy/engine/_chttp.c",
                "shardproxy/engine/_chandshake.c",
            ],
            depends=["shardproxy/engine/_chttp.h", "shardproxy/engine/_chandshake.h"],
            extra_compile_args=CFLAGS,
        )
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
