"""`edgeproxy demo` as a user runs it: the HTTPS line it prints works with curl.

A real demo (master, worker, pinger, one demo instance) in its own session, and the
real curl against it, with the throwaway CA and --resolve the demo printed.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from ci_policy import needs
from ports import free_port
from proxyctl import REPO, LineReader, env

pytestmark = pytest.mark.request_path


@needs(shutil.which("curl") is not None, "curl is not installed (./dev test installs it)")
def test_the_demos_https_curl_line_gets_an_instances_answer(tmp_path: Path) -> None:
    """The demo's printed `curl --cacert ... --resolve ... https://hello.test:PORT/` verifies
    the demo's certificate and gets a demo instance's answer."""
    ports = [free_port() for _ in range(3)]
    argv = [sys.executable, "-m", "proxy.cli", "demo", "--instances", "1", "--workers", "1"]
    argv += ["--port", str(ports[0]), "--https-port", str(ports[1]), "--admin-port", str(ports[2])]
    err = (tmp_path / "demo.stderr").open("wb")
    proc = subprocess.Popen(
        argv, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=err, start_new_session=True
    )  # fmt: skip
    assert proc.stdout is not None
    reader = LineReader(proc.stdout)
    try:
        started = reader.wait_for("Ctrl-C stops everything", 60)
        assert started, (reader.all, (tmp_path / "demo.stderr").read_text())
        lines = [ln.strip() for ln in reader.all if "curl --cacert" in ln]
        assert len(lines) == 1, reader.all
        words = shlex.split(lines[0])
        curl = words[words.index("curl") :]
        out = subprocess.run(
            [*curl, "--silent", "--show-error", "--max-time", "10"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        assert "hello-1" in out.stdout, out.stdout
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.thread.join(10)
        proc.stdout.close()
        err.close()
