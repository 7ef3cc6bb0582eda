"""A plain-HTTP transport for httpx2 that does its socket I/O with asyncio directly.

httpx2's default network layer goes through anyio, which sets up a cancel scope for every read
and write even when no timeout is asked for; on a relayed token stream that is a tenth of the
gateway's CPU (docs/BENCHMARKS.md). Backends reached over plain HTTP (a laptop's Ollama, a vLLM
on a cluster node) use this one; HTTPS backends keep httpx2's own transport and TLS handling.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterable, Iterator
from typing import Any

import httpcore2
import httpx2
from httpcore2 import AsyncNetworkBackend, AsyncNetworkStream


@contextlib.contextmanager
def _mapped(timeout_error: type[Exception], other: type[Exception]) -> Iterator[None]:
    try:
        yield
    except TimeoutError as e:
        raise timeout_error(str(e)) from e
    except (OSError, EOFError, ConnectionError) as e:
        raise other(str(e)) from e


class _AsyncioStream(AsyncNetworkStream):
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader = reader
        self._writer = writer

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        with _mapped(httpcore2.ReadTimeout, httpcore2.ReadError):
            if timeout is None:
                return await self._reader.read(max_bytes)
            async with asyncio.timeout(timeout):
                return await self._reader.read(max_bytes)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        with _mapped(httpcore2.WriteTimeout, httpcore2.WriteError):
            self._writer.write(buffer)
            if self._writer.transport.get_write_buffer_size() == 0:
                return  # the kernel took it all: no need to wait for the drain
            if timeout is None:
                await self._writer.drain()
            else:
                async with asyncio.timeout(timeout):
                    await self._writer.drain()

    async def aclose(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await self._writer.wait_closed()

    async def start_tls(self, *args: Any, **kwargs: Any) -> AsyncNetworkStream:
        raise httpcore2.ConnectError("TLS is handled by httpx2's own transport, not this one")

    def get_extra_info(self, info: str) -> Any:
        sock = self._writer.get_extra_info("socket")
        if info == "socket":
            return sock
        if info == "client_addr":
            return self._writer.get_extra_info("sockname")
        if info == "server_addr":
            return self._writer.get_extra_info("peername")
        if info == "is_readable":
            # A pooled idle connection is "readable" only if the server closed it (or sent
            # something unasked): then it must not be reused.
            return self._reader.at_eof() or len(getattr(self._reader, "_buffer", b"")) > 0
        return None


class _AsyncioBackend(AsyncNetworkBackend):
    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> AsyncNetworkStream:
        with _mapped(httpcore2.ConnectTimeout, httpcore2.ConnectError):
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    host, port, local_addr=(local_address, 0) if local_address else None,
                    limit=1 << 20,
                )
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for option in socket_options or ():
                sock.setsockopt(*option)
        return _AsyncioStream(reader, writer)

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[Any] | None = None
                                  ) -> AsyncNetworkStream:
        with _mapped(httpcore2.ConnectTimeout, httpcore2.ConnectError):
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(path, limit=1 << 20)
        return _AsyncioStream(reader, writer)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class PlainHTTPTransport(httpx2.AsyncHTTPTransport):
    """httpx2's transport with the asyncio network backend; for `http://` URLs only."""

    def __init__(self, limits: httpx2.Limits):
        super().__init__(limits=limits)
        self._pool = httpcore2.AsyncConnectionPool(
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_AsyncioBackend(),
        )
