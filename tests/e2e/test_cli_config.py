"""The CLI against a running master: a file mid-edit, and which file a reload loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from proxyctl import REPO, Proxy, env

pytestmark = [pytest.mark.timeout(60), pytest.mark.request_path]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m proxy.cli ARGS` from the repository, as an operator would run it."""
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", *args],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_status_and_table_find_the_master_while_the_file_does_not_parse(
    proxy_factory: Callable[..., Proxy],
) -> None:
    """With a TOML syntax error in the file (even inside [listen]), `status` and `table`
    still reach the running master through the file's `control` and show its state."""
    p = proxy_factory()
    text = p.path.read_text()
    broken = text.replace('admin = "', 'admin = "127.0.0.1:9\nhttp2 = [1,\n', 1)
    assert broken != text
    p.path.write_text(broken)
    r = cli("status", "--json", "-c", str(p.path))
    assert r.returncode == 0, r
    assert json.loads(r.stdout)["master"]["pid"] == p.proc.pid
    r = cli("table", "--json", "-c", str(p.path))
    assert r.returncode == 0, r
    dump = json.loads(r.stdout)
    assert f"edgeproxy-test-{p.cfg.uid}" in dump["segment"], dump
    assert {i["id"] for i in dump["instances"]} == {"hello-1"}, dump
    assert "running master" in r.stderr, r.stderr


def test_reload_refuses_a_file_that_is_not_the_masters(
    proxy_factory: Callable[..., Proxy], tmp_path: Path
) -> None:
    """`reload -c OTHER` (even a copy of the same text) exits 1 naming both files and reloads
    nothing; `reload -c` through a symlink to the master's file reloads it and names it."""
    p = proxy_factory()
    gen = p.status()["master"]["generation"]
    other = tmp_path / "copy.toml"
    other.write_text(p.path.read_text())
    r = cli("reload", "-c", str(other))
    assert r.returncode == 1, r
    assert str(other) in r.stderr and str(p.path.resolve()) in r.stderr, r.stderr
    assert p.status()["master"]["generation"] == gen
    link = tmp_path / "link.toml"
    os.symlink(p.path, link)
    r = cli("reload", "-c", str(link))
    assert r.returncode == 0, r
    assert f"reloaded {p.path.resolve()}" in r.stdout, r.stdout
    assert p.status()["master"]["generation"] == gen + 1
