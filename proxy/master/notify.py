"""systemd's notify protocol (sd_notify), written to NOTIFY_SOCKET if set.

Owns the datagram format only. It must never raise: a missing or broken
notify socket is not a reason to stop serving.
"""

from __future__ import annotations

import os
import socket


def sd_notify(state: bytes) -> bool:
    """Send `state` (e.g. b"READY=1") to systemd; False when there is no socket."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(state, path)
    except OSError:
        return False
    return True
