"""The build: the request path runs compiled (mypyc) unless built with EDGEPROXY_PURE=1."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

from build_check import REPO, compiled_sources

import proxy


def test_request_path_is_compiled_as_built() -> None:
    """Every module setup.py lists is a C extension (EDGEPROXY_PURE=1: every one is Python):
    the suite runs the code the package ships."""
    pure = os.environ.get("EDGEPROXY_PURE") == "1"
    for src in compiled_sources():
        name = src.removesuffix(".py").replace("/", ".")
        origin = importlib.import_module(name).__file__ or ""
        assert origin.endswith(".py") == pure, (name, origin)
    assert proxy.compiled() is not pure


def test_version_names_the_build() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "--version"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
        check=True,
    ).stdout
    want = "pure Python" if os.environ.get("EDGEPROXY_PURE") == "1" else "compiled (mypyc)"
    assert out.startswith(f"edgeproxy {proxy.__version__} (") and want in out, out
