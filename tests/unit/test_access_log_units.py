"""The access log's pieces in one process: the [log] section's rules, a line's fields,
stderr batches cut at line ends under PIPE_BUF, and a file that cannot be opened dropping
and counting its lines instead of raising."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from proxy.config import ConfigError, loads
from proxy.config_log import LogConfig
from proxy.worker.accesslog import (
    BUFFER_FULL,
    CHUNK,
    WRITE_FAILED,
    WRITTEN,
    AccessLog,
    Writer,
    _batches,
    line,
)

BASE = '[node]\nid = "n"\n'


def test_log_section() -> None:
    """[log] is off by default; stderr or an absolute path turn it on; anything else fails."""
    c = loads(BASE)
    assert not c.log.enabled and c.log.format == "text" and c.log.sample_rate == 1.0
    c = loads(BASE + '[log]\naccess = "/var/log/edgeproxy/access.log"\nformat = "json"\n')
    assert c.log.enabled and c.log.format == "json"
    assert loads(BASE + '[log]\naccess = "stderr"\n').log.access == "stderr"
    for bad in (
        'access = "relative.log"',
        'access = "/var/log/"',
        "sample_rate = 1.5",
        'format = "xml"',
        "buffer = 0",
        "flush_ms = 0",
        "colour = true",
    ):
        with pytest.raises(ConfigError):
            loads(BASE + "[log]\n" + bad + "\n")


def test_line_fields() -> None:
    """A line is one JSON object ending in a newline, with the request's values."""
    raw = (1764806400.25, "hello", "hello-1", "n2", True, 503, b"GET", "HTTP/1.0", b"10.0.0.1",
           b"https", False, 120, 300, 0.0125, 3)  # fmt: skip
    data = line(raw, "n1")
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    rec = orjson.loads(data)
    assert rec == {
        "ts": "2025-12-04T00:00:00.250Z",
        "node": "n1",
        "app": "hello",
        "instance": "hello-1",
        "instance_node": "n2",
        "backhaul": True,
        "status": 503,
        "method": "GET",
        "protocol": "HTTP/1.0",
        "scheme": "https",
        "client": "10.0.0.1",
        "from_peer": False,
        "bytes_in": 120,
        "bytes_out": 300,
        "duration_ms": 12.5,
        "retries": 2,
    }


def test_batches_cut_at_line_ends() -> None:
    """Batches for stderr stay under PIPE_BUF and keep every line whole and in order."""
    lines = [b"x" * n + b"\n" for n in (1000, 3000, 100, 4095, 7000, 10)]
    out = _batches(lines, CHUNK)
    assert [ln for b in out for ln in b] == lines
    assert all(sum(map(len, b)) <= CHUNK or len(b) == 1 for b in out)


def test_unopenable_file_drops_and_counts(tmp_path: Path) -> None:
    """A path in a directory that does not exist: lines are dropped and counted as
    write_failed, nothing raises; a full buffer counts buffer_full before that."""
    counts = [0, 0, 0]
    cfg = LogConfig(access=str(tmp_path / "missing" / "access.log"), buffer=2)
    log = AccessLog(cfg, counts, lambda: 0.0, lambda: 1.0)
    raw = (0.0, "a", "", "", False, 200, b"GET", "HTTP/1.1", b"", b"http", False, 1, 2, 0.1, 1)
    log.buffer.extend([raw, raw])
    w = Writer(cfg, "n1", log)
    w.flush()
    assert counts[WRITE_FAILED] == 2 and counts[WRITTEN] == 0 and not log.buffer
    (tmp_path / "missing").mkdir()
    log.buffer.append(raw)
    w.checked = 0.0
    w.flush()
    assert counts[WRITTEN] == 1
    assert counts[BUFFER_FULL] == 0
