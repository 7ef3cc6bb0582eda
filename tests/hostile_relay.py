"""A hostile relay for tests: it speaks the relay's protocol to both sides and records every byte.

It accepts a producer and a consumer on `/v1/channels/{id}` with the real relay's headers, passes
frames going up (cancel) through unchanged, and lets a test's *mutation* rewrite what goes down:
tamper, replay, reorder, drop, cut, splice channels, inject. It checks no token: a relay that
lies is exactly what end-to-end sealing must survive, so the double gets no help from our code.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from streamllm.relay.frames import HEADER_SIZE, MAX_PAYLOAD

_PATH = re.compile(r"^/v1/channels/([A-Za-z0-9_-]{1,128})$")

CUT: Any = object()  # yielded by a mutation: close the consumer's connection at this point


@dataclass
class Channel:
    id: str
    producer: ServerConnection | None = None
    received: list[bytes] = field(default_factory=list)  # down frames as the producer sent them
    # What goes to the consumer (frames or CUT), queued so either side may connect first.
    down: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)


# A mutation turns the frames the producer sends on one channel into what its consumer gets.
Mutation = Callable[["HostileRelay", Channel, AsyncIterator[bytes]], AsyncIterator[Any]]


async def faithful(relay: HostileRelay, channel: Channel, frames: AsyncIterator[bytes]):
    async for frame in frames:
        yield frame


class HostileRelay:
    def __init__(self, mutation: Mutation = faithful):
        self.mutation = mutation
        self.channels: dict[str, Channel] = {}
        self.producers: list[str] = []  # channel ids, in the order their producers connected
        self.requests: list[Request] = []  # every opening handshake: path and headers
        self.frames: list[bytes] = []  # every WebSocket message, either direction, as received
        self._arrived = asyncio.Condition()  # notified whenever a producer's frame is recorded
        self._server: Any = None

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> HostileRelay:
        self._server = await serve(
            self._handle, "127.0.0.1", 0, process_request=self._admit,
            max_size=MAX_PAYLOAD + HEADER_SIZE, compression=None,
        )
        return self

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        self._server.close()
        await self._server.wait_closed()

    def handled(self) -> bytes:
        """Everything the relay could read that is not the Authorization header, which must
        carry the tokens: URLs, the other headers and every frame, in one blob to search."""
        parts: list[bytes] = []
        for request in self.requests:
            parts.append(request.path.encode())
            parts += [f"{k}: {v}".encode() for k, v in request.headers.raw_items()
                      if k.lower() != "authorization"]
        return b"\n".join(parts + self.frames)

    def tokens(self, role: str) -> list[str]:
        return [r.headers["authorization"].removeprefix("Bearer ") for r in self.requests
                if r.headers.get("x-stream-role") == role]

    # -- what a mutation may ask for -------------------------------------------------------------
    async def frame_of_another_channel(self, channel: Channel, index: int) -> bytes:
        """Down frame number `index` of some other channel, once one has sent that many."""
        def ready() -> list[Channel]:
            return [c for c in self.channels.values()
                    if c is not channel and len(c.received) > index]

        async with self._arrived:
            await self._arrived.wait_for(ready)
            return ready()[0].received[index]

    # -- connections -----------------------------------------------------------------------------
    def _admit(self, conn: ServerConnection, request: Request) -> Response | None:
        self.requests.append(request)
        match = _PATH.match(request.path)
        role = request.headers.get("x-stream-role")
        if not match or role not in ("producer", "consumer"):
            return conn.respond(404, "no such channel or role\n")
        return None

    async def _handle(self, conn: ServerConnection) -> None:
        assert conn.request is not None
        channel_id = _PATH.match(conn.request.path).group(1)  # type: ignore[union-attr]
        channel = self.channels.setdefault(channel_id, Channel(channel_id))
        if conn.request.headers["x-stream-role"] == "producer":
            await self._producer(conn, channel)
        else:
            await self._consumer(conn, channel)

    async def _producer(self, conn: ServerConnection, channel: Channel) -> None:
        channel.producer = conn
        self.producers.append(channel.id)
        frames = self._frames_from(conn, channel)
        with contextlib.suppress(ConnectionClosed):
            async for out in self.mutation(self, channel, frames):
                channel.down.put_nowait(out)
            # A mutation may stop early (a cut): keep reading, so the worker ends as it would
            # with any relay and returns its result through the control plane.
            async for _ in frames:
                pass

    async def _frames_from(self, conn: ServerConnection, channel: Channel) -> AsyncIterator[bytes]:
        async for message in conn:
            data = message if isinstance(message, bytes) else message.encode()
            self.frames.append(data)
            channel.received.append(data)
            async with self._arrived:
                self._arrived.notify_all()
            yield data

    async def _consumer(self, conn: ServerConnection, channel: Channel) -> None:
        sender = asyncio.create_task(self._send_down(conn, channel))
        try:
            async for message in conn:  # going up (cancel): recorded, passed on unchanged
                data = message if isinstance(message, bytes) else message.encode()
                self.frames.append(data)
                if channel.producer is not None:
                    with contextlib.suppress(ConnectionClosed):
                        await channel.producer.send(data)
        except ConnectionClosed:
            pass
        finally:
            sender.cancel()

    async def _send_down(self, conn: ServerConnection, channel: Channel) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                item = await channel.down.get()
                if item is CUT:
                    await conn.close()
                    return
                await conn.send(item)
