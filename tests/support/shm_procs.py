"""Real processes around a shared-memory table, for the tests that stress it across
processes: a segment name of the test's own, and a Python child running a snippet."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

from shm import segment

ROOT = Path(__file__).resolve().parents[2]
_COUNTER = itertools.count()


def unique_segment(prefix: str) -> Iterator[str]:
    """For a fixture: a segment name no other test uses, unlinked afterwards."""
    n = f"/{prefix}-{os.getpid()}-{next(_COUNTER)}"
    yield n
    segment.unlink(n)


def spawn(code: str, *args: str) -> subprocess.Popen[str]:
    """`python -c code args...` with this checkout on its path, stdin and stdout piped."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
