"""Control socket trust: a private default directory, and peer credentials checked."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from proxyctl import REPO, Proxy, ProxyConfig, Upstream, env

from proxy.config import default_control_dir

pytestmark = [pytest.mark.timeout(30), pytest.mark.request_path]

NOBODY = 65534


def as_other_uid(path: str, cmd: str, uid: int = NOBODY) -> dict[str, Any]:
    """Fork, drop to `uid` in the child, send `cmd` on the control socket; its JSON reply."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only syscalls, then _exit
        out = b""
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(10)
                s.connect(path)
                s.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
                while not out.endswith(b"\n"):
                    data = s.recv(65536)
                    if not data:
                        break
                    out += data
        except BaseException as e:  # reported to the parent, never raised in a fork
            out = json.dumps({"child_error": repr(e)}).encode()
        finally:
            os.write(w, out or b'{"child_error": "EOF without a reply"}')
            os._exit(0)
    os.close(w)
    chunks = []
    with os.fdopen(r, "rb") as f:
        chunks.append(f.read())
    os.waitpid(pid, 0)
    reply: dict[str, Any] = json.loads(b"".join(chunks))
    return reply


@pytest.mark.request_path
@pytest.mark.parametrize("cmd", ["reload", "takeover", "status"])
def test_other_uid_is_refused_and_nothing_happens(
    proxy_factory: Callable[..., Proxy], cmd: str
) -> None:
    """A client of another uid (SO_PEERCRED) gets a JSON error naming its uid, even when the
    socket file is widened to 0666, and the master neither reloads nor hands over."""
    p = proxy_factory()
    before = p.status()
    os.chmod(p.cfg.control, 0o666)  # a widened socket: only the peer check stands
    reply = as_other_uid(p.cfg.control, cmd)
    assert reply.get("ok") is False, reply
    assert f"uid {NOBODY}" in reply.get("error", ""), reply
    after = p.status()
    assert after["master"]["generation"] == before["master"]["generation"]
    assert [w["pid"] for w in after["workers"]] == [w["pid"] for w in before["workers"]]
    assert p.get("/").status == 200


class EnvProxy(Proxy):
    """A proxy whose config text and environment the test writes itself."""

    def __init__(self, cfg: ProxyConfig, workdir: Path, text: str, environ: dict[str, str]):
        self.cfg = cfg
        self.port = cfg.port
        self.admin_port = cfg.admin_port
        self.path = workdir / f"edgeproxy-{cfg.uid}.toml"
        self.path.write_text(text)
        self.stderr_path = workdir / f"proxy-{cfg.uid}.stderr"
        self.environ = environ
        self._spawn([sys.executable, "-m", "proxy.cli", "run", "-c", str(self.path)], REPO, environ)

    def cli(self, *args: str, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "proxy.cli", *args, "-c", str(self.path)],
            cwd=REPO,
            env=self.environ,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def without_control(cfg: ProxyConfig) -> str:
    """The rendered config with no `[listen] control`: the default path applies."""
    return "".join(line for line in cfg.render().splitlines(True) if not line.startswith("control"))


def test_default_control_dir_is_created_private_and_serves(
    tmp_path: Path, upstream: Upstream
) -> None:
    """Without `[listen] control`, the master creates $RUNTIME_DIRECTORY with mode 0700,
    binds its socket there, and `status` finds it."""
    rt = tmp_path / "rt" / "edgeproxy"
    environ = env() | {"RUNTIME_DIRECTORY": str(rt)}
    cfg = ProxyConfig(upstream=upstream.address)
    p = EnvProxy(cfg, tmp_path, without_control(cfg), environ)
    try:
        st = rt.stat()
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
        assert (rt / f"edgeproxy-t{cfg.uid}.sock").is_socket()
        assert p.status()["master"]["pid"] == p.proc.pid
    finally:
        p.stop()


@pytest.mark.parametrize(("uid", "mode"), [(0, 0o755), (0, 0o770), (NOBODY, 0o700)])
def test_master_refuses_a_default_dir_not_private_to_it(
    tmp_path: Path, upstream: Upstream, uid: int, mode: int
) -> None:
    """A default control directory that is group/other-accessible or owned by another uid
    stops the master before it binds anything, with the directory, owner and mode named."""
    rt = tmp_path / "rt"
    rt.mkdir()
    os.chown(rt, uid, -1)
    os.chmod(rt, mode)
    cfg = ProxyConfig(upstream=upstream.address)
    path = tmp_path / "c.toml"
    path.write_text(without_control(cfg))
    r = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "run", "-c", str(path)],
        cwd=REPO,
        env=env() | {"RUNTIME_DIRECTORY": str(rt)},
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert r.returncode == 1, r
    assert str(rt) in r.stderr and f"uid {uid}" in r.stderr and f"{mode:04o}" in r.stderr, r
    assert list(rt.iterdir()) == []


def test_default_control_dir_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """$RUNTIME_DIRECTORY (its first entry) wins; root without it gets /run/edgeproxy."""
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/a:/run/b")
    assert default_control_dir() == "/run/a"
    monkeypatch.delenv("RUNTIME_DIRECTORY")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1")
    want = "/run/edgeproxy" if os.geteuid() == 0 else "/run/user/1/edgeproxy"
    assert default_control_dir() == want
