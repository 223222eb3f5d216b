"""The edge's HTTP/2 connection to a peer (proxy.worker.h2peer.PeerH2Connection) keeps
receiving after a GOAWAY, as RFC 9113 6.8 allows for the streams up to its last id: a
draining peer sends GOAWAY(2^31-1) and a PING, then the final GOAWAY, and serves what it
took. Bytes in, events out, against the h2 library's own server side."""

from __future__ import annotations

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    PingReceived,
    ResponseReceived,
    StreamEnded,
)
from hyperframe.frame import GoAwayFrame, PingFrame

from proxy.worker.h2peer import PeerH2Connection

GET = [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"), (b":authority", b"x")]


def goaway(last: int, code: int = 0) -> bytes:
    f = GoAwayFrame(0)
    f.last_stream_id = last
    f.error_code = code
    return bytes(f.serialize())


def pair() -> tuple[H2Connection, H2Connection]:
    """A client (the edge) with stream 1 sent, and the library's server side (the peer)."""
    c = PeerH2Connection(H2Configuration(client_side=True, header_encoding=None))
    s = H2Connection(H2Configuration(client_side=False, header_encoding=None))
    c.initiate_connection()
    s.initiate_connection()
    s.receive_data(c.data_to_send())
    c.receive_data(s.data_to_send())
    c.send_headers(1, GET, end_stream=True)
    s.receive_data(c.data_to_send())
    c.receive_data(s.data_to_send())
    return c, s


def test_a_stream_answered_after_both_goaways_arrives_whole() -> None:
    """GOAWAY(2^31-1) and a PING, then the final GOAWAY naming stream 1: the PING is
    answered and stream 1's response still arrives (h2's own client fails it)."""
    c, s = pair()
    ping = PingFrame(0)
    ping.opaque_data = b"drain123"
    events = c.receive_data(goaway(2**31 - 1) + bytes(ping.serialize()))
    assert [type(e) for e in events] == [ConnectionTerminated, PingReceived]
    assert events[0].last_stream_id == 2**31 - 1
    assert c.data_to_send().endswith(b"drain123")  # the PING's ACK went out
    events = c.receive_data(goaway(1))
    assert [type(e) for e in events] == [ConnectionTerminated]
    assert events[0].last_stream_id == 1
    s.send_headers(1, [(b":status", b"200")])
    s.send_data(1, b"whole", end_stream=True)
    events = c.receive_data(s.data_to_send())
    assert isinstance(events[0], ResponseReceived)
    assert isinstance(events[-1], StreamEnded)
    assert b"".join(getattr(e, "data", b"") or b"" for e in events) == b"whole"


def test_an_unknown_goaway_code_is_kept_as_its_number() -> None:
    """A GOAWAY with a code RFC 9113 does not define reports it as the number (section 7:
    unknown codes are not an error)."""
    c, _ = pair()
    events = c.receive_data(goaway(1, 0xABC))
    assert isinstance(events[0], ConnectionTerminated) and events[0].error_code == 0xABC
