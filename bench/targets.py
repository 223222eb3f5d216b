"""The processes of the wrk comparison: the upstream and each proxy under test.

Each target renders its config from a template in bench/ (or, for edgeproxy,
the TOML contract below) into its own temporary directory, listens only on
127.0.0.1 on a port picked free, and knows how to reload itself:

- HAProxy: master-worker (`-W`), `-x` the stats socket (`expose-fd
  listeners`), SIGUSR2 to the master.
- nginx: SIGHUP to the master (what `nginx -s reload` sends).
- edgeproxy: SIGHUP to the master.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

from bench.procs import Managed, StartError, free_port, port_accepts

HOST = "127.0.0.1"
BENCH_DIR = Path(__file__).resolve().parent
SMALL_BODY = b"hello world!\n"
LARGE_SIZE = 65536
EDGEPROXY_HOSTNAME = "bench.test"


def render(template: str, **values: object) -> str:
    """Fill `@@NAME@@` placeholders of bench/<template>; every one must be given."""
    text = (BENCH_DIR / template).read_text()
    for key, value in values.items():
        text = text.replace(f"@@{key}@@", str(value))
    if "@@" in text:
        raise ValueError(f"{template}: unfilled placeholder near {text[text.index('@@') :][:40]!r}")
    return text


def default_edgeproxy_cmd() -> str:
    """This checkout's edgeproxy: `env PYTHONPATH=<checkout> <this python> -m proxy.cli`.

    Not the venv's `edgeproxy` script: an editable install imports the checkout it
    was installed from, which is another one when git worktrees share a venv. The
    master starts its workers with the same interpreter and environment, so they
    run this checkout too."""
    root = str(BENCH_DIR.parent)
    return shlex.join(["env", f"PYTHONPATH={root}", sys.executable, "-m", "proxy.cli"])


def _workdir(root: Path, name: str) -> Path:
    d = root / name
    d.mkdir(mode=0o755)
    # nginx workers run as `nobody` when started by root: they must read www/.
    d.chmod(0o755)
    return d


class Target:
    """A proxy (or the upstream) the harness starts, measures and stops."""

    name = "?"
    reload_signal: int | None = None

    def __init__(self, root: Path) -> None:
        self.dir = _workdir(root, self.name)
        self.port = free_port(HOST)
        self.proc: Managed | None = None

    @property
    def measured(self) -> bool:
        """Whether this target has its own processes whose CPU is measured."""
        return self.proc is not None

    def start(self) -> None:
        raise NotImplementedError

    def cpu_seconds(self) -> float:
        return self.proc.cpu_seconds() if self.proc is not None else 0.0

    def cpu_split(self) -> tuple[float, float]:
        """(user, system) CPU seconds of this target's process tree."""
        return self.proc.cpu_split() if self.proc is not None else (0.0, 0.0)

    def check_alive(self) -> None:
        if self.proc is not None and not self.proc.alive():
            raise StartError(f"{self.name} died; see {self.proc.log_path}")

    def reload(self) -> None:
        """Send one reload; returns at once (the proxy reloads in the background)."""
        if self.proc is None or self.reload_signal is None:
            raise NotImplementedError(f"{self.name} has no reload")
        self.proc.signal(self.reload_signal)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def log_tail(self, lines: int = 20) -> str:
        if self.proc is None or not os.path.exists(self.proc.log_path):
            return ""
        with open(self.proc.log_path, "rb") as f:
            return b"\n".join(f.read().splitlines()[-lines:]).decode("utf-8", "replace")


class _NginxBase(Target):
    template = ""
    reload_signal = signal.SIGHUP

    def config_values(self) -> dict[str, object]:
        return {"DIR": self.dir, "PORT": self.port}

    def start(self) -> None:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        for sub in ("client_body", "proxy_temp"):
            (self.dir / sub).mkdir(exist_ok=True)
        conf = self.dir / "nginx.conf"
        conf.write_text(render(self.template, **self.config_values()))
        argv = [nginx, "-p", f"{self.dir}/", "-e", str(self.dir / "error.log"), "-c", str(conf)]
        self.proc = Managed(self.name, argv, str(self.dir / "stderr.log"), signal.SIGTERM)
        self.proc.start()
        self.proc.wait_port(HOST, self.port)


class Upstream(_NginxBase):
    """nginx, one worker, serving /small (13 bytes) and /64k (65536 bytes)."""

    name = "upstream"
    template = "upstream.nginx.conf.tmpl"
    _status_calls = 0

    def start(self) -> None:
        www = self.dir / "www"
        www.mkdir(mode=0o755, exist_ok=True)
        www.chmod(0o755)
        (www / "small").write_bytes(SMALL_BODY)
        (www / "64k").write_bytes(bytes(i % 251 for i in range(LARGE_SIZE)))
        for f in www.iterdir():
            f.chmod(0o644)
        super().start()

    def accepted(self) -> int | None:
        """Connections the upstream accepted so far (nginx stub_status), or None."""
        self._status_calls += 1
        request = b"GET /_status HTTP/1.1\r\nHost: upstream\r\nConnection: close\r\n\r\n"
        try:
            with socket.create_connection((HOST, self.port), timeout=2.0) as s:
                s.sendall(request)
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
        except OSError:
            return None
        m = re.search(rb"\n\s*(\d+)\s+\d+\s+\d+\s*\n", data)
        # Minus the connections that asked for the status.
        return int(m.group(1)) - self._status_calls if m else None


class NginxProxy(_NginxBase):
    """nginx as a reverse proxy: 2 workers, upstream keepalive 64."""

    name = "nginx"
    template = "proxy.nginx.conf.tmpl"

    def __init__(self, root: Path, upstream_port: int) -> None:
        super().__init__(root)
        self.upstream_port = upstream_port

    def config_values(self) -> dict[str, object]:
        return {**super().config_values(), "UPSTREAM_PORT": self.upstream_port}


class HAProxy(Target):
    """HAProxy 2.6, master-worker, nbthread 2, http-reuse always, no logs."""

    name = "haproxy"
    reload_signal = signal.SIGUSR2

    def __init__(self, root: Path, upstream_port: int) -> None:
        super().__init__(root)
        self.upstream_port = upstream_port

    def start(self) -> None:
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        cfg = self.dir / "haproxy.cfg"
        values = {"DIR": self.dir, "PORT": self.port, "UPSTREAM_PORT": self.upstream_port}
        cfg.write_text(render("haproxy.cfg.tmpl", **values))
        # -x: on a reload the new process takes the listeners from the old one
        # over the stats socket. (On the first start there is no old process:
        # HAProxy says so on stderr and binds itself.)
        argv = [haproxy, "-W", "-db", "-f", str(cfg), "-x", str(self.dir / "haproxy.sock")]
        self.proc = Managed(self.name, argv, str(self.dir / "stderr.log"), signal.SIGTERM)
        self.proc.start()
        self.proc.wait_port(HOST, self.port)


class Direct(Target):
    """wrk straight at the upstream: the ceiling, no proxy."""

    name = "direct"

    def __init__(self, root: Path, upstream_port: int) -> None:
        super().__init__(root)
        self.port = upstream_port

    def start(self) -> None:
        if not port_accepts(HOST, self.port):
            raise StartError(f"upstream not accepting on {HOST}:{self.port}")


EDGEPROXY_TOML = """\
[node]
id = "bench"

[listen]
http = ["{host}:{port}"]
admin = "{host}:{admin_port}"
control = "{control}"

[workers]
count = 2

[[app]]
name = "bench"
hosts = ["{hostname}"]
soft_limit = 1000
hard_limit = 2000

[[instance]]
app = "bench"
id = "bench-1"
address = "{host}:{upstream_port}"
"""


class EdgeProxy(Target):
    """`edgeproxy run -c <toml>`, 2 workers, ready at its READY line."""

    name = "edgeproxy"
    reload_signal = signal.SIGHUP

    def __init__(self, root: Path, upstream_port: int, cmd: str) -> None:
        super().__init__(root)
        self.upstream_port = upstream_port
        self.cmd = shlex.split(cmd)
        self.admin_port = free_port(HOST)
        # A unix socket path must stay short (108 bytes): not under self.dir.
        self.control = f"/tmp/edgeproxy-bench-{os.getpid()}-{self.port}.sock"

    def config_text(self) -> str:
        return EDGEPROXY_TOML.format(
            host=HOST,
            port=self.port,
            admin_port=self.admin_port,
            control=self.control,
            hostname=EDGEPROXY_HOSTNAME,
            upstream_port=self.upstream_port,
        )

    def start(self) -> None:
        if not self.cmd or not (shutil.which(self.cmd[0]) or os.access(self.cmd[0], os.X_OK)):
            raise StartError(
                f"edgeproxy command not found: {shlex.join(self.cmd)!r} "
                "(pip install -e . in this venv, or pass --edgeproxy-cmd)"
            )
        toml = self.dir / "edgeproxy.toml"
        toml.write_text(self.config_text())
        argv = [*self.cmd, "run", "-c", str(toml)]
        self.proc = Managed(self.name, argv, str(self.dir / "output.log"), signal.SIGTERM)
        self.proc.start(capture_stdout=True)
        self.proc.wait_ready_line("READY")
        self.proc.wait_port(HOST, self.port, timeout=5.0)

    def probe_reload(self, settle: float = 3.0) -> str | None:
        """Try one reload before a measured run: None when it worked, else why not."""
        assert self.proc is not None
        try:
            self.reload()
        except OSError as exc:
            return f"SIGHUP failed: {exc}"
        deadline = time.monotonic() + settle
        while time.monotonic() < deadline:
            if not self.proc.alive():
                return f"master exited after SIGHUP (rc={self.proc.proc and self.proc.proc.poll()})"
            time.sleep(0.1)
        if not port_accepts(HOST, self.port):
            return "listener stopped accepting after SIGHUP"
        return None

    def stop(self) -> None:
        super().stop()
        if os.path.exists(self.control):
            os.unlink(self.control)
