"""What a test does when something it needs is missing here: skip on a developer's
machine, fail in CI.

CI (.ci/run: Debian 12, as root, CI=true, with the Debian packages it installs) has every
tool and kernel behaviour these tests need, so a skip there would hide a test CI claims
to run. A reason that holds on every CI machine would have to be a plain skip instead.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def in_ci() -> bool:
    """Whether this run is CI's (.ci/run exports CI=true; CI services set it too)."""
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def skip_or_fail(reason: str, *, allow_module_level: bool = False) -> NoReturn:
    """Skip with `reason`, or fail with it under CI=true."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: CI must run this test, not skip it)", pytrace=False)
    pytest.skip(reason, allow_module_level=allow_module_level)


def needs(present: bool, reason: str) -> pytest.MarkDecorator:
    """A mark for a test that needs something (a tool) that `present` says is here;
    tests/conftest.py skips or fails the test before it runs when it is not."""
    return pytest.mark.needs(present=present, reason=reason)
