"""Which modules setup.py compiles, and whether the compiled copies are current."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def compiled_sources() -> list[str]:
    """setup.py's COMPILED list, read without running setup.py."""
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "COMPILED" for t in node.targets
        ):
            value = ast.literal_eval(node.value)
            assert isinstance(value, list)
            return [str(v) for v in value]
    raise AssertionError("setup.py has no COMPILED list")


def shared_library() -> Path | None:
    libs = sorted((REPO / "proxy").glob("native__mypyc*.so"))
    return libs[0] if libs else None


def stale_compiled() -> list[str]:
    """Sources newer than the compiled library built in place (empty: none, or current)."""
    lib = shared_library()
    if lib is None:
        return []
    built = lib.stat().st_mtime
    return [src for src in compiled_sources() if (REPO / src).stat().st_mtime > built]
