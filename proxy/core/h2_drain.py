"""The graceful end of a client's HTTP/2 connection when its worker drains: the
two-step GOAWAY of RFC 9113 6.8.

Owns the decisions: at the drain, a first GOAWAY naming the largest stream id
(2^31-1, "no stream refused yet") and a PING; the streams the client opens until that
PING's ACK (it may have sent them before it saw the GOAWAY) are still served; on the
ACK, or `ack_wait` seconds without one, the final GOAWAY names the last stream served
and any later stream is refused (the client may retry it, on another connection); the
connection closes once its streams are done, or at the drain deadline (one more GOAWAY,
then the close). Sans-io: the caller passes the time, the client's highest stream id
and how many streams are open; the answer is a set of action bits. It must not know
frames, sockets or the h2 library.
"""

from __future__ import annotations

from typing import Final

MAX_STREAM_ID: Final = 2**31 - 1
PING_DATA: Final = b"edgeGOAW"  # the opaque data of our PING (8 bytes, RFC 9113 6.7)

# Actions, as bits (several may come at once; CLOSE comes last).
NOTHING: Final = 0
ANNOUNCE: Final = 1  # send GOAWAY(MAX_STREAM_ID, NO_ERROR), then a PING with PING_DATA
FINAL: Final = 2  # send GOAWAY(last_stream_id, NO_ERROR)
CLOSE: Final = 4  # close the connection (its open streams, if any, are cut)

# States.
SERVING: Final = 0
ANNOUNCED: Final = 1  # the first GOAWAY and the PING are out; waiting for the ACK
LAST_SENT: Final = 2  # the final GOAWAY is out; the streams it covers finish
DONE: Final = 3


class Drain:
    """The two-step GOAWAY of one connection."""

    __slots__ = ("ack_by", "ack_wait", "deadline", "last_stream_id", "state", "timeout")

    def __init__(self, ack_wait: float, timeout: float) -> None:
        self.ack_wait = ack_wait  # seconds to wait for the PING's ACK
        self.timeout = timeout  # seconds the streams may take (drain_timeout)
        self.state = SERVING
        self.ack_by = 0.0
        self.deadline = 0.0
        self.last_stream_id = MAX_STREAM_ID  # what the GOAWAYs sent so far said

    def start(self, now: float) -> int:
        """The worker drains: ANNOUNCE (once)."""
        if self.state != SERVING:
            return NOTHING
        self.state = ANNOUNCED
        self.ack_by = now + self.ack_wait
        self.deadline = now + self.timeout
        return ANNOUNCE

    def admits(self, stream_id: int) -> bool:
        """May a stream the client opens now be served? Until the final GOAWAY, any;
        after it, only those it covered (none: the client had opened them already)."""
        return self.state < LAST_SENT or stream_id <= self.last_stream_id

    def ping_ack(self, data: bytes, highest: int, streams: int) -> int:
        """A PING ACK came with `data`: ours ends the wait (FINAL, and CLOSE if no stream
        is open); any other (a client's own PING) changes nothing."""
        if self.state != ANNOUNCED or data != PING_DATA:
            return NOTHING
        return self._final(highest, streams)

    def stream_done(self, streams: int) -> int:
        """A stream ended and `streams` are left: CLOSE once the final GOAWAY is out and
        none is left."""
        if self.state == LAST_SENT and streams <= 0:
            self.state = DONE
            return CLOSE
        return NOTHING

    def tick(self, now: float, highest: int, streams: int) -> int:
        """Time passed: past the drain deadline, FINAL and CLOSE; past the ACK's wait,
        as if it had come."""
        if self.state in (SERVING, DONE):
            return NOTHING
        if now >= self.deadline:
            if self.state == ANNOUNCED:
                self.last_stream_id = min(highest, MAX_STREAM_ID)
            self.state = DONE
            return FINAL | CLOSE
        if self.state == ANNOUNCED and now >= self.ack_by:
            return self._final(highest, streams)
        return NOTHING

    def next_check(self) -> float:
        """When `tick` may next have something to do (0.0: never)."""
        if self.state == ANNOUNCED:
            return min(self.ack_by, self.deadline)
        if self.state == LAST_SENT:
            return self.deadline
        return 0.0

    def _final(self, highest: int, streams: int) -> int:
        # The streams the client opened until now are the ones served: a later one was
        # sent after the client saw the first GOAWAY (it may not open any then) or after
        # the wait, and is refused, safe to retry (RFC 9113 6.8, 8.7).
        self.last_stream_id = min(highest, MAX_STREAM_ID)
        if streams <= 0:
            self.state = DONE
            return FINAL | CLOSE
        self.state = LAST_SENT
        return FINAL
