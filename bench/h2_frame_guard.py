"""The cost of the HTTP/2 no-progress budgets per received frame: the h2 library's
connection with and without proxy.worker.h2frames' hook, same frames.

    python -m bench.h2_frame_guard [--frames 200] [--reps 60] [--rounds 4] [--out FILE]

A server-side connection with one open stream receives, in one receive_data call,
FRAMES frames: DATA of 100 bytes and a connection WINDOW_UPDATE, alternating (the
budgets never trip: rate and burst are huge). Per round and variant the best of REPS
calls, per frame; variants interleave by round. Pure Python (the h2 library is);
the machine may be shared: the best of many calls is what contention disturbs least.
Writes bench/results/h2-frame-guard-<date>.md (or --out).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import time
from pathlib import Path

from h2.config import H2Configuration
from h2.connection import H2Connection
from hpack import Encoder
from hyperframe.frame import DataFrame, HeadersFrame, SettingsFrame, WindowUpdateFrame

from proxy.core.h2_guard import FrameGuard
from proxy.worker.h2frames import GuardedConnection

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def connection(guarded: bool) -> H2Connection:
    cfg = H2Configuration(client_side=False, header_encoding=None)
    if guarded:
        c: H2Connection = GuardedConnection(cfg, FrameGuard(1e9, 10**9), time.monotonic)
    else:
        c = H2Connection(cfg)
    c.initiate_connection()
    c.update_settings({4: 2**31 - 1})
    c.increment_flow_control_window(2**31 - 1 - 65535)
    c.data_to_send()
    h = HeadersFrame(1)
    fields = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/")]
    h.data = Encoder().encode(fields)
    h.flags.add("END_HEADERS")
    c.receive_data(PREFACE + SettingsFrame(0).serialize() + h.serialize())
    return c


def frames(n: int) -> bytes:
    d = DataFrame(1)
    d.data = b"x" * 100
    w = WindowUpdateFrame(0)
    w.window_increment = 1
    return (d.serialize() + w.serialize()) * (n // 2)


def best_per_frame(guarded: bool, buf: bytes, n: int, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        c = connection(guarded)
        t = time.perf_counter()
        c.receive_data(buf)
        best = min(best, time.perf_counter() - t)
    return best / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    buf = frames(a.frames)
    got: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(a.rounds):
        for guarded in (False, True):
            got[guarded].append(best_per_frame(guarded, buf, a.frames, a.reps))
    plain, guarded = statistics.median(got[False]), statistics.median(got[True])
    now = dt.datetime.now()
    lines = [
        f"# HTTP/2 frame guard cost, {now.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"machine: {platform.machine()}, {os.cpu_count()} cores (shared with other agents),"
        f" load average {os.getloadavg()[0]:.1f}; Python {platform.python_version()}",
        f"command: python -m bench.h2_frame_guard --frames {a.frames} --reps {a.reps}"
        f" --rounds {a.rounds}",
        "",
        "| variant | per frame, median of rounds (best of reps each) | rounds |",
        "|---|---|---|",
        f"| library alone | {plain:.2f} us | {', '.join(f'{v:.2f}' for v in got[False])} |",
        f"| with the hook | {guarded:.2f} us | {', '.join(f'{v:.2f}' for v in got[True])} |",
        "",
        f"hook cost: {guarded - plain:.2f} us per frame (DATA and WINDOW_UPDATE alternating)",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = a.out or Path(__file__).parent / "results" / f"h2-frame-guard-{now:%Y%m%d-%H%M}.md"
    out.write_text(text)


if __name__ == "__main__":
    main()
