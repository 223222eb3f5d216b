"""HTTP/2 floods of frames that carry no progress, each tried with real frames over a
real socket against a real proxy (h2c, 2 workers) and a real HTTP/1.1 upstream: empty
DATA frames (CVE-2019-9518), empty HEADERS and CONTINUATION frames, unknown extension
frames, WINDOW_UPDATE floods, PRIORITY and PRIORITY_UPDATE floods (CVE-2019-9513 class),
RST_STREAM on a closed stream. Each ends in GOAWAY ENHANCE_YOUR_CALM, is counted under
its own event, and a normal client on another connection is served meanwhile.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator

import pytest
from h2client import H2Client
from h2raw import ENHANCE_YOUR_CALM, RawH2, request_fields
from hyperframe.frame import DataFrame, GoAwayFrame, HeadersFrame, PriorityFrame, RstStreamFrame
from proxyctl import Proxy, ProxyConfig, Upstream, stop_proxies

pytestmark = pytest.mark.request_path

BURST = 40
FLOOD = 400  # frames sent: ten times the burst, in a few writes (the rate is 5/s)


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Iterator[Proxy]:
    """h2c on the plaintext listener, small flood budgets."""
    cfg = ProxyConfig(
        upstream=upstream.address,
        listen_extra={"h2c": True},
        http2={"flood_burst": BURST, "flood_rate": 5.0, "reset_burst": BURST, "reset_rate": 5.0},
    )
    p = Proxy(cfg, tmp_path_factory.mktemp("h2floods"))
    yield p
    stop_proxies([p])


def series(event: str) -> str:
    return f'edgeproxy_http2_events_total{{event="{event}"}}'


def extension(kind: int, sid: int, payload: bytes) -> bytes:
    """A frame of a type hyperframe does not build (RFC 9113 4.1 layout)."""
    return struct.pack(">I", len(payload))[1:] + bytes((kind, 0)) + struct.pack(">I", sid) + payload


def priority(sid: int) -> bytes:
    f = PriorityFrame(sid)
    f.depends_on = 0
    f.stream_weight = 15
    return f.serialize()


def empty_data(c: RawH2) -> bytes:
    c.send(c.headers(1, request_fields("/echo", method="POST"), end_stream=False))
    return c.data(1, b"") * FLOOD


def padded_data(c: RawH2) -> bytes:
    """DATA frames of padding alone (flow-controlled, no payload)."""
    c.send(c.headers(1, request_fields("/echo", method="POST"), end_stream=False))
    f = DataFrame(1)
    f.data = b""
    f.flags.add("PADDED")
    f.pad_length = 8
    return f.serialize() * FLOOD


def empty_continuation(c: RawH2) -> bytes:
    """Header blocks of an empty HEADERS and empty CONTINUATION frames (the library
    joins a block's frames, 64 at most, before any of it is handled)."""
    out = b""
    for i in range(FLOOD // 4):
        f = HeadersFrame(1 + 2 * i)
        f.data = b""
        f.flags.add("END_STREAM")
        out += f.serialize() + c.continuation(1 + 2 * i, b"") * 8
        out += c.continuation(1 + 2 * i, b"", end_headers=True)
    return out


def empty_headers(c: RawH2) -> bytes:
    out = b""
    for i in range(FLOOD):
        f = HeadersFrame(1 + 2 * i)
        f.data = b""
        f.flags.add("END_HEADERS")
        f.flags.add("END_STREAM")
        out += f.serialize()
    return out


def unknown_frames(c: RawH2) -> bytes:
    return extension(0xEE, 0, b"x" * 8) * FLOOD


def window_updates(c: RawH2) -> bytes:
    return c.window_update(0, 1) * FLOOD


def priorities(c: RawH2) -> bytes:
    return b"".join(priority(1001 + 2 * i) for i in range(FLOOD))


def priority_updates(c: RawH2) -> bytes:
    # RFC 9218 7.1: on stream 0, the prioritized stream id, then a Priority field value.
    return extension(0x10, 0, struct.pack(">I", 1) + b"u=3") * FLOOD


def closed_resets(c: RawH2) -> bytes:
    c.send(c.headers(1, request_fields("/echo")))
    assert c.stream_end(1)[0] == 200  # closed both ways now
    return c.rst(1) * FLOOD


@pytest.mark.parametrize(
    ("attack", "event"),
    [
        (empty_data, "empty_frames"),
        (padded_data, "empty_frames"),
        (empty_continuation, "empty_frames"),
        (empty_headers, "empty_frames"),
        (unknown_frames, "empty_frames"),
        (window_updates, "window_update_flood"),
        (priorities, "priority_flood"),
        (priority_updates, "priority_flood"),
        (closed_resets, "closed_reset_flood"),
    ],
    ids=lambda v: v.__name__ if callable(v) else v,
)
def test_a_flood_ends_in_enhance_your_calm_and_others_are_served(
    proxy: Proxy, attack: object, event: str
) -> None:
    """Frames that carry no progress, ten times the budget at once: GOAWAY
    ENHANCE_YOUR_CALM, counted under its event; another connection is served."""
    before = proxy.metric(series(event))
    with RawH2(proxy.cfg.port) as c:
        out = attack(c)  # type: ignore[operator]
        try:
            for i in range(0, len(out), 16384):
                c.send(out[i : i + 16384])
        except OSError:
            pass  # closed by the proxy mid-flood: what we are after
        g = c.goaway()
    assert g is not None and g.error_code == ENHANCE_YOUR_CALM, g
    assert proxy.wait_metric(series(event), before + 1) >= before + 1
    with H2Client(proxy.cfg.port, None) as ok:
        r = ok.request("/echo")
    assert r.status == 200 and b'"HTTP/1.1"' in r.body


def bad_length(c: RawH2, sid: int) -> bytes:
    """A request that starts well, then sends more DATA than its content-length."""
    fields = [*request_fields("/echo", method="POST"), (b"content-length", b"1")]
    return c.headers(sid, fields, end_stream=False) + c.data(sid, b"zz", end_stream=True)


def bad_field(c: RawH2, sid: int) -> bytes:
    """A request with a connection-specific field (RFC 9113 8.2.2)."""
    return c.headers(sid, [*request_fields("/echo"), (b"connection", b"close")])


@pytest.mark.parametrize("stream", [bad_length, bad_field])
def test_streams_that_make_the_proxy_reset_them_spend_the_reset_budget(
    proxy: Proxy, stream: object
) -> None:
    """Streams the proxy must reset (PROTOCOL_ERROR) opened in a loop (CVE-2025-8671,
    "MadeYouReset"): past the rapid reset budget, GOAWAY ENHANCE_YOUR_CALM, counted as a
    rapid reset; another connection is served."""
    before = proxy.metric(series("rapid_reset"))
    with RawH2(proxy.cfg.port) as c:
        try:
            # Batches of 40 streams, each batch's resets awaited: never more streams open
            # than max_concurrent_streams (a read of 200 would meet the library's own
            # bound first, a PROTOCOL_ERROR).
            for i in range(0, FLOOD, 40):
                c.send(b"".join(stream(c, 1 + 2 * j) for j in range(i, i + 40)))  # type: ignore[operator]
                last = 1 + 2 * (i + 39)
                c.read_until(lambda: c.find(RstStreamFrame, last) or c.find(GoAwayFrame))  # noqa: B023
                if c.find(GoAwayFrame):
                    break
        except OSError:
            pass
        g = c.goaway()
    assert g is not None and g.error_code == ENHANCE_YOUR_CALM, g
    assert proxy.wait_metric(series("rapid_reset"), before + 1) >= before + 1
    with H2Client(proxy.cfg.port, None) as ok:
        assert ok.request("/echo").status == 200


def test_frames_under_their_budgets_are_served(proxy: Proxy) -> None:
    """A client that sends a few of each (fewer than the burst) with a request body in
    between is served on the same connection."""
    with RawH2(proxy.cfg.port) as c:
        few = BURST // 4
        c.send(c.headers(1, request_fields("/echo", method="POST"), end_stream=False))
        c.send(c.data(1, b"") * few + c.window_update(0, 1) * few + priority(99) * few)
        c.send(c.data(1, b"abc", end_stream=True))
        assert c.stream_end(1)[0] == 200
        c.send(c.rst(1) * few + c.headers(3, request_fields("/echo")))
        assert c.stream_end(3)[0] == 200
        assert not c.closed


def test_empty_data_frames_do_not_end_a_chunked_body_upstream(proxy: Proxy) -> None:
    """A body without content-length crosses chunked; empty DATA frames between its
    pieces are nothing to relay (an empty chunk would end the body there, and what
    follows would reach the instance as another request)."""
    with RawH2(proxy.cfg.port) as c:
        c.send(c.headers(1, request_fields("/echo", method="POST"), end_stream=False))
        c.send(c.data(1, b"abc") + c.data(1, b"") + c.data(1, b"def"))
        c.send(c.data(1, b"", end_stream=True))
        status, code = c.stream_end(1)
        body = b"".join(f.data for f in c.frames if isinstance(f, DataFrame) and f.stream_id == 1)
    assert status == 200 and code is None
    got = json.loads(body)
    assert got["body_len"] == 6
    assert got["body_sha256"] == hashlib.sha256(b"abcdef").hexdigest()
