"""What the kernel holds on loopback TCP connections, read from /proc/net/tcp.

A test that checks a proxy stops reading a peer must not count what the kernel
buffered on its behalf: receive-buffer autotuning (net.ipv4.tcp_rmem, 32 MiB at most
on some machines) lets megabytes sit in a socket the proxy never read. Subtracting
what the kernel holds leaves what the proxy itself took in, whatever the sysctls.
"""

from __future__ import annotations

_ESTABLISHED = "01"


def kernel_queued(port: int) -> int:
    """Bytes in the kernel on every established IPv4 connection to `port`: the
    server side's send queue (written, not yet acknowledged) plus the client
    side's receive queue (arrived, not yet read by its process)."""
    total = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            local, remote, st, queues = parts[1], parts[2], parts[3], parts[4]
            if st != _ESTABLISHED:
                continue
            tx, rx = (int(q, 16) for q in queues.split(":"))
            if int(local.rsplit(":", 1)[1], 16) == port:
                total += tx
            if int(remote.rsplit(":", 1)[1], 16) == port:
                total += rx
    return total
