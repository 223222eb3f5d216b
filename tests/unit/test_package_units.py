"""The systemd units and the deb's static parts, checked without building or booting anything.

`systemd-analyze verify` on both units must print nothing on stderr (it exits 0
on some errors, so its exit status alone proves little). The units name
/usr/bin/edgeproxy and /opt/edgeproxy/venv/bin/python, which exist only where
the deb is installed: they are verified as copies whose only change is those
two paths, pointing at a stub. scripts/test-package verifies the installed
units, unchanged, inside a booted container.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from ci_policy import needs

from proxy.config import load

REPO = Path(__file__).resolve().parents[2]
UNITS = ("edgeproxy.service", "edgeproxy-pinger.service")
INSTALL_PATHS = ("/opt/edgeproxy/venv/bin/python", "/usr/bin/edgeproxy")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_analyze = needs(
    SYSTEMD_ANALYZE is not None, "systemd-analyze not installed (Debian package: systemd)"
)


def _stubbed_units(tmp_path: Path, extra: dict[str, str] | None = None) -> list[Path]:
    stub = tmp_path / "edgeproxy-stub"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    out = []
    for name in UNITS:
        text = (REPO / "systemd" / name).read_text()
        for path in INSTALL_PATHS:
            text = text.replace(path, str(stub))
        text += (extra or {}).get(name, "")
        dst = tmp_path / name
        dst.write_text(text)
        out.append(dst)
    return out


def _verify(units: list[Path], cwd: Path) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, "verify", *map(str, units)],
        check=False,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""},
    )


@needs_analyze
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    r = _verify(_stubbed_units(tmp_path), tmp_path)
    assert r.stderr == "", r.stderr
    assert r.returncode == 0


@needs_analyze
def test_verify_check_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above is not vacuous: a typo in a unit shows up on stderr."""
    units = _stubbed_units(tmp_path, {"edgeproxy.service": "\n[Service]\nRestartt=always\n"})
    r = _verify(units, tmp_path)
    assert "Restartt" in r.stderr


def _unit(name: str) -> configparser.RawConfigParser:
    cp = configparser.RawConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read(REPO / "systemd" / name)
    return cp


def test_proxy_unit_matches_the_program() -> None:
    s = _unit("edgeproxy.service")["Service"]
    assert s["Type"] == "notify"  # READY=1 / RELOADING=1; notify-reload needs systemd >= 253
    assert s["ExecStart"] == "/usr/bin/edgeproxy run -c /etc/edgeproxy/edgeproxy.toml"
    assert s["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert s["KillMode"] == "mixed"  # SIGTERM to the master only; it drains its workers
    assert s["User"] == "edgeproxy" and s["RuntimeDirectory"] == "edgeproxy"
    # Nothing that would give the units separate /dev/shm or IPC objects.
    for key in ("PrivateIPC", "RemoveIPC", "DynamicUser"):
        assert key not in s, key


def test_stop_timeout_covers_the_default_drain() -> None:
    s = _unit("edgeproxy.service")["Service"]
    config = load(str(REPO / "packaging" / "edgeproxy.toml"))
    assert int(s["TimeoutStopSec"]) >= config.workers.drain_timeout + 15


def test_nofile_limit_fits_this_host() -> None:
    """A LimitNOFILE above the hard limit systemd may raise to fails the unit at start."""
    import resource

    want = int(_unit("edgeproxy.service")["Service"]["LimitNOFILE"])
    nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    assert want <= nr_open
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard == resource.RLIM_INFINITY or want <= max(hard, 16384)


def test_pinger_is_ordered_after_the_proxy_and_never_required() -> None:
    proxy = _unit("edgeproxy.service")
    pinger = _unit("edgeproxy-pinger.service")
    assert "edgeproxy-pinger.service" in proxy["Unit"].get("Wants", "")
    for key in ("Requires", "Requisite", "BindsTo", "After"):
        assert "edgeproxy-pinger" not in proxy["Unit"].get(key, ""), key
    assert "edgeproxy.service" in pinger["Unit"]["After"].split()
    assert "RuntimeDirectory" not in pinger["Service"]  # /run/edgeproxy is the proxy's
    assert (
        pinger["Service"]["ExecStart"]
        == "/usr/bin/edgeproxy pinger -c /etc/edgeproxy/edgeproxy.toml"
    )


def test_pinger_condition_follows_the_table_writer(tmp_path: Path) -> None:
    """ExecCondition runs the pinger only when the config gives it the table."""
    cond = _unit("edgeproxy-pinger.service")["Service"]["ExecCondition"]
    m = re.fullmatch(r'/opt/edgeproxy/venv/bin/python -c "([^"]+)" (\S+)', cond)
    assert m, cond
    code, config_path = m.groups()
    assert config_path == "/etc/edgeproxy/edgeproxy.toml"
    default = (REPO / "packaging" / "edgeproxy.toml").read_text()
    for writer, status in (("master", 1), ("pinger", 0)):
        cfg = tmp_path / f"{writer}.toml"
        cfg.write_text(default.replace('writer = "master"', f'writer = "{writer}"'))
        r = subprocess.run(
            [sys.executable, "-c", code, str(cfg)],
            check=False,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert r.returncode == status, (writer, r.stderr)


def test_packaged_default_config_is_valid_and_local() -> None:
    config = load(str(REPO / "packaging" / "edgeproxy.toml"))
    assert all(a.host == "127.0.0.1" for a in config.listen.http)
    assert config.listen.admin is not None and config.listen.admin.host == "127.0.0.1"
    assert config.listen.control.startswith("/run/edgeproxy/")  # the unit's RuntimeDirectory
    assert config.table.writer == "master"
    assert [a.name for a in config.apps] == ["hello"]


def test_maintainer_scripts_parse() -> None:
    for name in ("postinst", "prerm", "postrm"):
        path = REPO / "packaging" / "debian" / name
        assert os.access(path, os.X_OK), name
        subprocess.run(["sh", "-n", str(path)], check=True, timeout=10)


def _ci_package_paths() -> list[str]:
    """The PKG_PATHS array of .ci/run (the paths whose change re-runs the package test)."""
    text = (REPO / ".ci" / "run").read_text()
    m = re.search(r"^PKG_PATHS=\(([^)]*)\)", text, re.M)
    assert m is not None, "no PKG_PATHS=(...) in .ci/run"
    return m.group(1).split()


def _build_deb_reads() -> set[str]:
    """Every repository path that scripts/build-deb names outside its comments (a path
    with a variable in it counts up to the variable: packaging/debian/$s -> packaging/debian)."""
    code = "\n".join(
        line
        for line in (REPO / "scripts" / "build-deb").read_text().splitlines()
        if not line.lstrip().startswith("#")
    )
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    # What git tracks is the repository; a build's own output (build/, gitignored) is not.
    tops = {t for f in tracked for t in _prefixes(f)}
    found = set()
    for tok in re.findall(r"[A-Za-z0-9_./$-]+", code):
        path = tok.split("$", 1)[0].rstrip("/")
        if path and not path.startswith(("-", "/", ".")) and path in tops:
            found.add(path)
    return found


def _prefixes(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def test_ci_reruns_the_package_test_for_everything_the_deb_holds() -> None:
    """Every path scripts/build-deb puts into the deb is under .ci/run's PKG_PATHS, so a
    change to it (code included) re-runs the package test."""
    pkg = _ci_package_paths()
    reads = _build_deb_reads()
    assert {"proxy", "shm", "pinger", "systemd/edgeproxy.service"} <= reads, reads
    uncovered = sorted(p for p in reads if not any(p == k or p.startswith(k + "/") for k in pkg))
    assert not uncovered, f"build-deb reads {uncovered}, which .ci/run's PKG_PATHS leaves out"
    for own in ("scripts/build-deb", "scripts/test-package", ".ci/run"):
        assert own in pkg, own
