"""A small HTTP/1.1 client for one job: POST a JSON body and stream the answer back, fast.

Used for streamed completions from backends reached over plain HTTP (a laptop's Ollama, vLLM on
a cluster node). httpx2's request path is pure Python down to the HTTP parser and costs about
half a millisecond per request before the first byte of the answer; this one writes the request
in one piece and parses the response with httptools (which uvicorn already uses), and its
protocol buffers body bytes itself, so a reader takes everything that arrived since its last
read in one call. Connections are kept alive and reused. HTTPS, proxies and everything else stay
with httpx2.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from urllib.parse import urlsplit

import httptools

_BUFFER_LIMIT = 1 << 20  # stop reading from the backend when this much is waiting


class StreamFailed(Exception):
    """The connection could not be made, or broke, or the answer was not valid HTTP."""


class _Connection(asyncio.Protocol):
    def __init__(self, on_idle):
        self._on_idle = on_idle
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._headers_done = asyncio.get_running_loop().create_future()
        self._arrived = asyncio.Event()
        self._body = bytearray()
        self._complete = False
        self._error: Exception | None = None
        self._paused = False
        self.status = 0
        self.reusable = False
        self.closed = False

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(StreamFailed(f"invalid HTTP from the backend: {e}"))
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self._complete:
            self._fail(StreamFailed(f"connection lost: {exc or 'closed by the backend'}"))

    def eof_received(self) -> bool | None:
        try:
            self._parser.feed_data(b"")  # lets the parser finish a close-delimited body
        except httptools.HttpParserError:
            pass
        return None

    # -- httptools callbacks ------------------------------------------------------------------
    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        if not self._headers_done.done():
            self._headers_done.set_result(None)

    def on_body(self, body: bytes) -> None:
        self._body += body
        self._arrived.set()
        if len(self._body) >= _BUFFER_LIMIT and not self._paused and self.transport:
            self._paused = True
            self.transport.pause_reading()  # backpressure until the reader catches up

    def on_message_complete(self) -> None:
        self._complete = True
        self.reusable = self._parser.should_keep_alive()
        self._arrived.set()

    # -- for the client -----------------------------------------------------------------------
    def _fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        if not self._headers_done.done():
            self._headers_done.set_exception(error)
        self._arrived.set()

    def start(self, request: bytes) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._headers_done = asyncio.get_running_loop().create_future()
        self._arrived = asyncio.Event()
        self._body = bytearray()
        self._complete = False
        self._error = None
        self.status, self.reusable = 0, False
        assert self.transport is not None
        self.transport.write(request)

    async def response_started(self) -> None:
        await self._headers_done

    async def take(self) -> bytes:
        """Body bytes received since the last call; b"" at the end of the response."""
        while not self._body:
            if self._complete:
                return b""
            if self._error is not None:
                raise self._error
            self._arrived.clear()
            await self._arrived.wait()
        data = bytes(self._body)
        self._body.clear()
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    def finish(self) -> None:
        """The caller is done with this response: reuse the connection if it is clean."""
        if self._complete and self.reusable and not self.closed and self._error is None:
            self._on_idle(self)
        else:
            self.abort()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()  # a half-read answer: the backend sees its client go away


class StreamResponse:
    def __init__(self, conn: _Connection):
        self._conn = conn
        self.status = conn.status

    async def take(self) -> bytes:
        return await self._conn.take()

    async def read(self) -> bytes:
        parts = []
        while chunk := await self._conn.take():
            parts.append(chunk)
        return b"".join(parts)

    def close(self) -> None:
        self._conn.finish()


class H1StreamClient:
    """Keeps up to `max_idle` idle keep-alive connections to one `http://host:port`."""

    def __init__(self, base_url: str, headers: dict[str, str], max_idle: int = 64):
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"H1StreamClient is for plain http:// URLs, not {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.path = parts.path.rstrip("/")
        host_header = parts.netloc
        fixed = {"host": host_header, "content-type": "application/json",
                 "accept": "text/event-stream", **{k.lower(): v for k, v in headers.items()}}
        self._head = "".join(f"{k}: {v}\r\n" for k, v in fixed.items()).encode("latin-1")
        self._idle: deque[_Connection] = deque()
        self._max_idle = max_idle

    def _release(self, conn: _Connection) -> None:
        if len(self._idle) < self._max_idle:
            self._idle.append(conn)
        else:
            conn.abort()

    async def _connection(self, connect_timeout: float) -> tuple[_Connection, bool]:
        """A connection and whether it is a reused one."""
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn, True
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self._release), self.host, self.port
                )
        except TimeoutError:
            raise StreamFailed(f"no connection within {connect_timeout:g}s") from None
        except OSError as e:
            raise StreamFailed(f"could not connect: {e}") from None
        sock = conn.transport.get_extra_info("socket") if conn.transport else None
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn, False

    async def post(self, path: str, body: bytes, connect_timeout: float) -> StreamResponse:
        """Send the request; return once the response's status and headers have arrived.

        A reused connection the backend closed meanwhile is retried once on a new one: that
        failure is only ever seen before the backend has read anything.
        """
        request = (
            f"POST {self.path}{path} HTTP/1.1\r\ncontent-length: {len(body)}\r\n".encode()
            + self._head + b"\r\n" + body
        )
        for attempt in (1, 2):
            conn, reused = await self._connection(connect_timeout)
            try:
                conn.start(request)
                await conn.response_started()
                return StreamResponse(conn)
            except StreamFailed:
                conn.abort()
                if not (reused and attempt == 1):
                    raise
            except BaseException:
                conn.abort()
                raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        while self._idle:
            self._idle.pop().abort()
