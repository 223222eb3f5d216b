"""A minimal HTTP/1.1 client over asyncio streams, for the store backends' JSON APIs.

Owns endpoint failover, keep-alive reuse and streamed (newline-delimited) responses.
It knows nothing of records or sessions: the backends build paths and bodies.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson

from pinger.store.errors import StoreError


class HttpProtocolError(StoreError):
    pass


_UNAVAILABLE = frozenset((408, 500, 502, 503, 504))
_NET_ERRORS = (
    OSError,
    TimeoutError,
    asyncio.IncompleteReadError,
    asyncio.LimitOverrunError,
    HttpProtocolError,
)


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: Mapping[str, str]
    body: bytes


@dataclass(slots=True, eq=False)
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def close(self) -> None:
        self.writer.close()


class Http:
    """Requests to the first endpoint that answers, in turn; idle connections are reused."""

    def __init__(self, endpoints: Sequence[str], timeout: float) -> None:
        self.targets: list[tuple[str, int, bool]] = []
        for url in endpoints:
            u = urlsplit(url)
            tls = u.scheme == "https"
            self.targets.append((u.hostname or "127.0.0.1", u.port or (443 if tls else 80), tls))
        if not self.targets:
            raise ValueError("no store endpoints")
        self.timeout = timeout
        self.current = 0
        self._idle: dict[int, list[_Conn]] = {}
        self._streams: set[_Conn] = set()
        self._busy: set[_Conn] = set()

    async def _connect(self, i: int) -> _Conn:
        host, port, tls = self.targets[i]
        ctx = ssl.create_default_context() if tls else None
        r, w = await asyncio.open_connection(host, port, ssl=ctx, limit=1 << 22)
        return _Conn(r, w)

    def _head(self, i: int, method: str, path: str, body: bytes | None) -> bytes:
        host, port, _ = self.targets[i]
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Accept: application/json"]
        if body is not None:
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")

    async def request(
        self, method: str, path: str, body: bytes | None = None, timeout: float | None = None
    ) -> Response:
        """One exchange; network failures move on to the next endpoint, then raise StoreError."""
        errors = []
        for step in range(len(self.targets)):
            i = (self.current + step) % len(self.targets)
            for reuse in (True, False):
                conn = self._take_idle(i) if reuse else None
                if reuse and conn is None:
                    continue
                try:
                    async with asyncio.timeout(timeout or self.timeout):
                        if conn is None:
                            conn = await self._connect(i)
                        self._busy.add(conn)
                        conn.writer.write(self._head(i, method, path, body))
                        status, headers = await _read_head(conn.reader)
                        data = await _read_body(conn.reader, headers)
                except _NET_ERRORS as e:
                    if conn is not None:
                        conn.close()
                    errors.append(f"{self.targets[i][0]}:{self.targets[i][1]}: {e!r}")
                    if reuse and not isinstance(e, TimeoutError):
                        continue  # a stale keep-alive connection: retry once on a new one
                    break  # a silent endpoint (timeout): the next one, not a second wait
                except BaseException:  # cancelled: the connection is in an unknown state
                    if conn is not None:
                        conn.close()
                    raise
                finally:
                    if conn is not None:
                        self._busy.discard(conn)
                if headers.get("connection", "").lower() == "close":
                    conn.close()
                else:
                    self._idle.setdefault(i, []).append(conn)
                if status in _UNAVAILABLE and step + 1 < len(self.targets):
                    # e.g. a member shutting down or without a leader: another may answer
                    errors.append(f"{self.targets[i][0]}:{self.targets[i][1]}: HTTP {status}")
                    break
                self.current = i
                return Response(status, headers, data)
        raise StoreError("no store endpoint answered: " + "; ".join(errors))

    def _take_idle(self, i: int) -> _Conn | None:
        pool = self._idle.get(i)
        while pool:
            conn = pool.pop()
            if not conn.reader.at_eof():
                return conn
            conn.close()
        return None

    async def stream(
        self, path: str, body: bytes, on_line: Callable[[bytes], Awaitable[None]]
    ) -> None:
        """POST and feed each newline-delimited line of the response body to `on_line`.

        Returns when the server ends the stream; raises StoreError when no endpoint answers.
        """
        errors = []
        for step in range(len(self.targets)):
            i = (self.current + step) % len(self.targets)
            try:
                async with asyncio.timeout(self.timeout):
                    conn = await self._connect(i)
            except (OSError, TimeoutError) as e:
                errors.append(f"{self.targets[i][0]}:{self.targets[i][1]}: {e!r}")
                continue
            self.current = i
            self._streams.add(conn)
            try:
                conn.writer.write(self._head(i, "POST", path, body))
                async with asyncio.timeout(self.timeout):
                    status, headers = await _read_head(conn.reader)
                if status != 200:
                    raise StoreError(f"stream {path}: HTTP {status}")
                buf = b""
                async for chunk in _iter_body(conn.reader, headers):
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        if line.strip():
                            await on_line(line)
                return
            except _NET_ERRORS as e:
                raise StoreError(f"stream {path} lost: {e!r}") from None
            finally:
                self._streams.discard(conn)
                conn.close()
        raise StoreError("no store endpoint answered: " + "; ".join(errors))

    def close(self) -> None:
        for pool in self._idle.values():
            for conn in pool:
                conn.close()
        self._idle.clear()
        for conn in [*self._streams, *self._busy]:
            conn.close()


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError as e:
        raise HttpProtocolError("response head too long") from e
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise HttpProtocolError(f"bad status line {lines[0]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def _read_body(reader: asyncio.StreamReader, headers: Mapping[str, str]) -> bytes:
    return b"".join([c async for c in _iter_body(reader, headers)])


async def _iter_body(
    reader: asyncio.StreamReader, headers: Mapping[str, str]
) -> AsyncIterator[bytes]:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = await reader.readuntil(b"\r\n")
            try:
                size = int(size_line.split(b";")[0].strip(), 16)
            except ValueError:
                raise HttpProtocolError(f"bad chunk size {size_line[:40]!r}") from None
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass  # trailers
                return
            data = await reader.readexactly(size + 2)
            yield data[:-2]
    elif "content-length" in headers:
        try:
            length = int(headers["content-length"])
        except ValueError:
            raise HttpProtocolError("bad Content-Length") from None
        if length:
            yield await reader.readexactly(length)
    else:
        yield await reader.read()  # until the server closes


def json_body(resp: Response, what: str) -> Any:
    """The decoded JSON of a 2xx response, else StoreError naming `what`."""
    if not 200 <= resp.status < 300:
        raise StoreError(f"{what}: HTTP {resp.status}: {resp.body[:200]!r}")
    try:
        return orjson.loads(resp.body)
    except orjson.JSONDecodeError as e:
        raise StoreError(f"{what}: bad JSON: {e}") from None
