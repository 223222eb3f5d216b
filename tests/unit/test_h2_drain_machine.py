"""proxy.core.h2_drain.Drain: the two-step GOAWAY of RFC 9113 6.8 as events in (the
drain, the PING's ACK, streams ending, time) and action bits out."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy.core.h2_drain import (
    ANNOUNCE,
    CLOSE,
    FINAL,
    MAX_STREAM_ID,
    NOTHING,
    PING_DATA,
    Drain,
)


def test_announce_then_final_on_the_ack_then_close_when_streams_end() -> None:
    """Drain: GOAWAY(2^31-1)+PING; streams opened before the ACK are admitted; the ACK
    gives the final GOAWAY with the highest stream id; later streams are refused; the
    close comes with the last stream's end."""
    d = Drain(ack_wait=1.0, timeout=300.0)
    assert d.start(100.0) == ANNOUNCE
    assert d.last_stream_id == MAX_STREAM_ID
    assert d.admits(9)  # opened between the two GOAWAYs: served
    assert d.ping_ack(PING_DATA, highest=9, streams=2) == FINAL
    assert d.last_stream_id == 9
    assert d.admits(7) and d.admits(9)
    assert not d.admits(11)
    assert d.stream_done(1) == NOTHING
    assert d.stream_done(0) == CLOSE
    assert d.tick(1000.0, 9, 0) == NOTHING  # done: nothing more


def test_an_idle_connection_closes_with_the_final_goaway() -> None:
    """No stream open at the ACK: FINAL and CLOSE together."""
    d = Drain(1.0, 300.0)
    d.start(0.0)
    assert d.ping_ack(PING_DATA, highest=0, streams=0) == FINAL | CLOSE
    assert d.last_stream_id == 0


def test_no_ack_within_the_wait_gives_the_final_goaway() -> None:
    """A client that never acknowledges the PING: at ack_wait, the final GOAWAY anyway;
    a late ACK then changes nothing."""
    d = Drain(1.0, 300.0)
    d.start(10.0)
    assert d.next_check() == 11.0
    assert d.tick(10.5, 3, 1) == NOTHING
    assert d.tick(11.0, 5, 1) == FINAL
    assert d.last_stream_id == 5
    assert d.ping_ack(PING_DATA, 7, 1) == NOTHING
    assert d.next_check() == 310.0


def test_another_ping_ack_is_not_ours() -> None:
    """An ACK with other data (the client's own PING) does not end the wait."""
    d = Drain(1.0, 300.0)
    d.start(0.0)
    assert d.ping_ack(b"12345678", 3, 1) == NOTHING
    assert d.admits(5)


def test_drain_timeout_ends_it_with_goaway_and_close() -> None:
    """Streams still open at drain_timeout: FINAL (again) and CLOSE."""
    d = Drain(1.0, 30.0)
    d.start(0.0)
    d.ping_ack(PING_DATA, 1, 1)
    assert d.tick(29.9, 1, 1) == NOTHING
    assert d.tick(30.0, 1, 1) == FINAL | CLOSE
    assert d.last_stream_id == 1


def test_start_is_once() -> None:
    """A second drain (SIGTERM after SIGHUP) announces nothing again."""
    d = Drain(1.0, 30.0)
    assert d.start(0.0) == ANNOUNCE
    assert d.start(1.0) == NOTHING
    assert Drain(1.0, 30.0).tick(5.0, 1, 1) == NOTHING  # not draining: nothing


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["open", "end", "ack", "tick"]),
            st.floats(min_value=0.0, max_value=5.0),
        ),
        max_size=60,
    ),
    st.floats(min_value=0.1, max_value=3.0),
)
def test_goaways_never_raise_the_last_id_and_served_streams_are_never_refused(
    steps: list[tuple[str, float]], ack_wait: float
) -> None:
    """Any order of events: the last stream id only goes down, FINAL comes at most once
    before CLOSE (plus once at the deadline), a stream admitted before the final GOAWAY
    is covered by it, and CLOSE never comes while streams are open before the deadline."""
    d = Drain(ack_wait, 20.0)
    now = 0.0
    assert d.start(now) == ANNOUNCE
    highest = 0
    open_ids: set[int] = set()
    last = MAX_STREAM_ID
    closed = False
    for what, gap in steps:
        if closed:
            break
        now += gap
        act = NOTHING
        if what == "open":
            sid = highest + 1 if highest % 2 == 0 else highest + 2
            highest = sid
            if d.admits(sid):
                open_ids.add(sid)
        elif what == "end" and open_ids:
            open_ids.discard(min(open_ids))
            act = d.stream_done(len(open_ids))
        elif what == "ack":
            act = d.ping_ack(PING_DATA, highest, len(open_ids))
        elif what == "tick":
            act = d.tick(now, highest, len(open_ids))
        assert d.last_stream_id <= last
        last = d.last_stream_id
        assert all(sid <= d.last_stream_id for sid in open_ids)
        if act & CLOSE:
            closed = True
            assert not open_ids or now >= 20.0
