"""The README's architecture section names every module of the tree, so the map and the
tree cannot drift apart (each new module is placed there when it lands)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("proxy", "shm", "pinger")


def architecture_section() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^## Architecture\n(.*?)^## ", text, re.S | re.M)
    assert m is not None, "README.md has no '## Architecture' section"
    return m.group(1)


def test_every_module_is_named_in_the_architecture_section() -> None:
    """Every proxy/, shm/ and pinger/ module (not __init__ or __main__) is named, as a
    word, in the README's architecture section."""
    section = architecture_section()
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", section))
    missing = [
        str(p.relative_to(ROOT))
        for pkg in PACKAGES
        for p in sorted((ROOT / pkg).rglob("*.py"))
        if p.stem not in ("__init__", "__main__") and p.stem not in words
    ]
    assert not missing, f"not in README's Architecture section: {missing}"
