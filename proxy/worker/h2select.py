"""Which protocol a client connection speaks: HTTP/1.1 or HTTP/2.

Owns the two ways a connection becomes HTTP/2: the ALPN protocol the TLS handshake
chose (RFC 7301; `h2` when the client offered it), and on a plaintext listener with
`[listen] h2c = true` the connection preface sent with prior knowledge (RFC 9113 3.3,
3.4). Once known, the connection's transport is handed to the protocol that speaks it
(proxy.worker.client or proxy.worker.h2conn) and this object is gone. It must not
parse HTTP.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Final, cast

from proxy.worker.client import ClientConnection
from proxy.worker.h2conn import PREFACE, H2Front

if TYPE_CHECKING:
    from proxy.worker.context import WorkerContext

ALPN_H2: Final = "h2"


class AlpnChoice:
    """An HTTPS connection, made once its handshake is done: HTTP/2 if ALPN chose h2."""

    def __init__(self, ctx: WorkerContext, sni_app: str | None) -> None:
        self.ctx = ctx
        self.sni_app = sni_app

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t = cast("asyncio.Transport", transport)
        ssl_object = t.get_extra_info("ssl_object")
        chosen = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        proto: Any
        if chosen == ALPN_H2:
            proto = H2Front(self.ctx, self.sni_app, True)
        else:
            proto = ClientConnection(self.ctx, False, self.sni_app, True)
        t.set_protocol(proto)
        proto.connection_made(t)

    def connection_lost(self, exc: Exception | None) -> None:
        pass


class PrefaceSniff:
    """A plaintext connection with h2c on (or a plaintext backhaul's, `[backhaul]
    insecure`): HTTP/2 if it opens with the preface, else HTTP/1.1. At most len(PREFACE)
    bytes are held, for at most [timeouts] client_header."""

    def __init__(self, ctx: WorkerContext, backhaul: bool = False) -> None:
        self.ctx = ctx
        self.backhaul = backhaul
        self.transport: asyncio.Transport | None = None
        self.held = b""
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)
        self.timer = self.ctx.loop.call_later(self.ctx.timeouts.client_header, self.expired)

    def data_received(self, data: bytes) -> None:
        held = self.held + data if self.held else data
        if len(held) < len(PREFACE) and PREFACE.startswith(held):
            self.held = held  # a prefix of the preface (or of "PRI..."): wait for more
            return
        self.handoff(held, held.startswith(PREFACE))

    def handoff(self, held: bytes, h2: bool) -> None:
        t = self.transport
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.held = b""
        if t is None or t.is_closing():
            return
        ctx = self.ctx
        bh = self.backhaul
        proto: Any = H2Front(ctx, None, False, bh) if h2 else ClientConnection(ctx, bh)
        t.set_protocol(proto)
        proto.connection_made(t)
        if held:
            proto.data_received(held)

    def expired(self) -> None:
        """Not even the start of a request in time: closed (as a slow head would be)."""
        self.timer = None
        if self.transport is not None:
            self.transport.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.transport = None

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass
