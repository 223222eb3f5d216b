"""The admin listener over real sockets on 127.0.0.1, on uvloop and the stdlib loop."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest
import uvloop

from proxy.master.admin import start_admin

pytestmark = pytest.mark.timeout(30)
HOST = "127.0.0.1"
METRICS = "# HELP edgeproxy_x X.\n# TYPE edgeproxy_x gauge\nedgeproxy_x 1\n"
Response = tuple[int, dict[str, str], bytes]


class Client:
    """An asyncio stream client with a tiny HTTP/1.1 response reader."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, head: bool = False) -> Response:
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")[:-2]
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        n = 0 if head else int(headers["content-length"])
        return status, headers, await self.reader.readexactly(n)

    async def at_eof(self) -> bool:
        return await self.reader.read(1) == b""

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


Scenario = Callable[[int, Callable[[], Awaitable[Client]]], Coroutine[Any, Any, None]]


def run(
    scenario: Scenario,
    loop_kind: str,
    health: Callable[[], tuple[int, str]] = lambda: (200, ""),
    metrics: Callable[[], str] = lambda: METRICS,
    header_timeout: float = 5.0,
) -> None:
    """Start the admin server on a free port, run `scenario`, close everything."""

    async def main() -> None:
        server = await start_admin(HOST, 0, metrics, health, header_timeout=header_timeout)
        port = server.sockets[0].getsockname()[1]
        clients: list[Client] = []

        async def connect() -> Client:
            clients.append(Client(*await asyncio.open_connection(HOST, port)))
            return clients[-1]

        try:
            await scenario(port, connect)
        finally:
            for c in clients:
                await c.close()
            server.close()
            await server.wait_closed()

    factory = uvloop.new_event_loop if loop_kind == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())


LOOPS = pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])


@LOOPS
def test_healthz_ok(loop_kind: str) -> None:
    """GET /healthz answers 200 "ok" while health says so."""

    async def scenario(port: int, connect: Callable[[], Awaitable[Client]]) -> None:
        c = await connect()
        await c.send(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (await c.response())[::2] == (200, b"ok\n")

    run(scenario, loop_kind)


@LOOPS
def test_healthz_unhealthy_gives_reason(loop_kind: str) -> None:
    """GET /healthz answers the health callable's status and reason."""

    async def scenario(port: int, connect: Callable[[], Awaitable[Client]]) -> None:
        c = await connect()
        await c.send(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (await c.response())[::2] == (503, b"no worker serving\n")

    run(scenario, loop_kind, health=lambda: (503, "no worker serving"))


@LOOPS
def test_metrics_text_and_content_type(loop_kind: str) -> None:
    """GET /metrics answers the callable's text as text/plain version 0.0.4."""

    async def scenario(port: int, connect: Callable[[], Awaitable[Client]]) -> None:
        c = await connect()
        await c.send(b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n")
        status, headers, body = await c.response()
        assert (status, body.decode()) == (200, METRICS)
        assert headers["content-type"].startswith("text/plain; version=0.0.4")

    run(scenario, loop_kind)


@LOOPS
def test_keep_alive_pipelining_and_head(loop_kind: str) -> None:
    """Pipelined requests on one connection (split byte by byte too) answer in order."""

    async def scenario(port: int, connect: Callable[[], Awaitable[Client]]) -> None:
        c = await connect()
        batch = (
            b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n"
            b"HEAD /metrics HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /nope HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /healthz?x=1 HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        for pieces in ([batch], [batch[i : i + 1] for i in range(len(batch))]):
            for p in pieces:
                await c.send(p)
            assert (await c.response())[0] == 200
            status, headers, _ = await c.response(head=True)
            assert (status, int(headers["content-length"])) == (200, len(METRICS))
            assert (await c.response())[::2] == (404, b"not found\n")
            assert (await c.response())[::2] == (200, b"ok\n")

    run(scenario, loop_kind)


@LOOPS
def test_wrong_method_is_405(loop_kind: str) -> None:
    """POST /metrics is refused with 405 and the connection stays usable."""

    async def scenario(port: int, connect: Callable[[], Awaitable[Client]]) -> None:
        c = await connect()
        await c.send(b"POST /metrics HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi")
        status, headers, _ = await c.response()
        assert (status, headers["allow"]) == (405, "GET")
        await c.send(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (await c.response())[0] == 200

    run(scenario, loop_kind)


@LOOPS
def test_bad_request_is_400_and_closed(loop_kind: str) -> None:
    """A malformed request gets 400 with Connection: close, then EOF."""

    async def scenario(port: int, connect: Callable[[], Awaitable[Client]]) -> None:
        c = await connect()
        await c.send(b"GET /metrics HTTP/1.1\r\nHost a\r\n\r\n")
        status, headers, _ = await c.response()
        assert (status, headers["connection"]) == (400, "close")
        assert await c.at_eof()

    run(scenario, loop_kind)


@LOOPS
def test_huge_head_is_431(loop_kind: str) -> None:
    """A request head over the admin limit gets 431 and is closed."""

    async def scenario(port: int, connect: Callable[[], Awaitable[Client]]) -> None:
        c = await connect()
        await c.send(b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n")
        assert (await c.response())[0] == 431
        assert await c.at_eof()

    run(scenario, loop_kind)


@LOOPS
def test_http10_closes(loop_kind: str) -> None:
    """An HTTP/1.0 request is answered and the connection closed."""

    async def scenario(port: int, connect: Callable[[], Awaitable[Client]]) -> None:
        c = await connect()
        await c.send(b"GET /healthz HTTP/1.0\r\n\r\n")
        assert (await c.response())[0] == 200
        assert await c.at_eof()

    run(scenario, loop_kind)


@LOOPS
def test_slow_client_gets_408(loop_kind: str) -> None:
    """A client that never finishes its request head gets 408 and is closed."""

    async def scenario(port: int, connect: Callable[[], Awaitable[Client]]) -> None:
        c = await connect()
        await c.send(b"GET /metrics HTTP/1.1\r\nHost: a\r\n")
        status, headers, _ = await c.response()
        assert (status, headers["connection"]) == (408, "close")
        assert await c.at_eof()
        idle = await connect()
        assert await idle.at_eof()  # an idle connection is closed quietly

    run(scenario, loop_kind, header_timeout=0.2)


@LOOPS
def test_failing_metrics_callable_is_500(loop_kind: str) -> None:
    """A metrics callable that raises gives 500, not a dropped connection."""

    def broken() -> str:
        raise RuntimeError("boom")

    async def scenario(port: int, connect: Callable[[], Awaitable[Client]]) -> None:
        c = await connect()
        await c.send(b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (await c.response())[0] == 500

    run(scenario, loop_kind, metrics=broken)


@LOOPS
def test_oversized_body_is_413(loop_kind: str) -> None:
    """A request body over the admin limit gets 413 and is closed."""

    async def scenario(port: int, connect: Callable[[], Awaitable[Client]]) -> None:
        c = await connect()
        n = 200_000
        await c.send(b"POST /metrics HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % n)
        await c.send(b"x" * n)  # the server discards what follows its 413 until EOF
        assert (await c.response())[0] == 413
        assert await c.at_eof()

    run(scenario, loop_kind)
