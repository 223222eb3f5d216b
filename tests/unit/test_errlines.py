"""The worker's error lines as JSON: one object per report, the first line its message,
a traceback its detail; print's two writes make one report; partial writes of two
threads never mix."""

from __future__ import annotations

import os
import threading
import traceback
from collections.abc import Iterator

import orjson
import pytest

from proxy.worker.errlines import JsonLines


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    os.close(r)
    os.close(w)


def read_all(r: int) -> list[dict[str, object]]:
    os.set_blocking(r, False)
    data = b""
    try:
        while chunk := os.read(r, 65536):
            data += chunk
    except BlockingIOError:
        pass
    return [orjson.loads(ln) for ln in data.split(b"\n") if ln]


def test_reports_become_objects(pipe: tuple[int, int]) -> None:
    """A report with a traceback is one object (msg, detail, level error); a print-style
    message in two writes is one object (level warning); fields name the worker."""
    r, w = pipe
    out = JsonLines(w, "n1", 3, clock=lambda: 0.5)
    try:
        raise ValueError("boom")
    except ValueError as e:
        tb = "".join(traceback.format_exception(e))
    out.write("edgeproxy worker: internal error in callback: a read\n" + tb)
    print("edgeproxy worker: trace export failed", file=out)
    got = read_all(r)
    assert len(got) == 2, got
    err, warn = got
    assert err["msg"] == "internal error in callback: a read" and err["level"] == "error"
    assert isinstance(err["detail"], str) and "ValueError: boom" in err["detail"]
    assert (err["node"], err["worker"], err["pid"]) == ("n1", 3, os.getpid())
    assert err["ts"] == "1970-01-01T00:00:00.500Z"
    assert warn["msg"] == "trace export failed" and warn["level"] == "warning"
    assert "detail" not in warn


def test_threads_partial_writes_do_not_mix(pipe: tuple[int, int]) -> None:
    """Two threads writing their reports in pieces, interleaved, give two whole reports."""
    r, w = pipe
    out = JsonLines(w, "n1", 0)
    first_half = threading.Event()
    other_done = threading.Event()

    def other() -> None:
        first_half.wait(5)
        out.write("edgeproxy worker: from the other ")
        out.write("thread\n")
        other_done.set()

    t = threading.Thread(target=other)
    t.start()
    out.write("edgeproxy worker: from the ")
    first_half.set()
    other_done.wait(5)
    out.write("main thread\n")
    t.join(5)
    msgs = sorted(str(rec["msg"]) for rec in read_all(r))
    assert msgs == ["from the main thread", "from the other thread"]
