"""The relay server: both sides dial out to it; it moves sealed frames and reads only headers.

    wss://relay/v1/channels/{channel}
    headers: authorization: Bearer <capability token>, x-stream-role: producer | consumer,
             x-stream-resume-from: N (consumer, optional)

Per channel: one producer (the HPC worker) and one consumer (the gateway). Frames going down
(producer to consumer) are kept in a bounded window so that a consumer that reconnects resumes
from the sequence number it asks for; a producer that runs ahead of its consumer by more than
the buffer limit is not read from (backpressure through TCP). Frames going up (cancel) are
passed straight to the producer. Channels idle for too long are reaped. The relay keeps no
durable state: losing it loses no answer, because the gateway holds the backstop result.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from streamllm.errors import RelayFrameInvalid, TokenRejected
from streamllm.relay.frames import HEADER_SIZE, Direction, FrameType, decode_header
from streamllm.relay.tokens import TokenVerifier

log = logging.getLogger("streamllm.relay")

MAX_HELD_UP = 8  # UP frames kept for a producer that has not connected yet

_PATH = re.compile(r"^/v1/channels/([A-Za-z0-9_-]{1,128})$")


@dataclass
class RelayLimits:
    max_payload_bytes: int = 1 << 20
    max_channels: int = 10_000
    max_unsent_frames: int = 1024  # producer is paused beyond this many undelivered frames
    retained_frames: int = 8192  # how far back a reconnecting consumer can resume
    idle_s: float = 300.0  # a channel with no traffic for this long is closed
    auth_s: float = 10.0  # time allowed for the opening handshake (token included)


@dataclass
class Counters:
    """Operational counters: sizes and counts only, never payload bytes."""

    channels_opened: int = 0
    channels_reaped: int = 0
    frames_down: int = 0
    frames_up: int = 0
    frame_bytes: int = 0
    rejected_tokens: int = 0
    rejected_frames: int = 0
    producer_pauses: int = 0
    resumes: int = 0


@dataclass
class Channel:
    id: str
    producer: ServerConnection | None = None
    consumer: ServerConnection | None = None
    frames: list[bytes] = field(default_factory=list)  # DOWN frames, oldest first
    base_seq: int = 0  # sequence number of frames[0]
    delivered: int = 0  # next sequence number to send to the consumer
    finished: bool = False  # the producer sent FINAL or ERROR
    # UP frames (cancel) sent before the producer connected: a job still queued on the cluster
    # must learn, once it starts, that nobody wants its answer any more.
    held_up: list[bytes] = field(default_factory=list)
    last_activity: float = field(default_factory=time.monotonic)
    # Two events, each cleared only by the one side that waits on it, so no wake-up is lost.
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # producer -> consumer
    drained: asyncio.Event = field(default_factory=asyncio.Event)  # consumer -> producer

    @property
    def next_seq(self) -> int:
        return self.base_seq + len(self.frames)

    def touch(self) -> None:
        self.last_activity = time.monotonic()


class RelayServer:
    def __init__(
        self,
        secret: bytes,
        limits: RelayLimits | None = None,
        observer: Callable[[bytes], None] | None = None,
    ):
        self.verifier = TokenVerifier(secret)
        self.limits = limits or RelayLimits()
        self.counters = Counters()
        self.channels: dict[str, Channel] = {}
        self._observer = observer  # tests use it to prove what the relay could read
        self._server: Any = None
        self._reaper: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 0, *, sock: Any = None,
                    ssl: Any = None) -> RelayServer:
        kw: dict[str, Any] = {"sock": sock} if sock is not None else {"host": host, "port": port}
        self._server = await serve(
            self._handle,
            process_request=self._admit,
            max_size=self.limits.max_payload_bytes + HEADER_SIZE,
            open_timeout=self.limits.auth_s,
            compression=None,  # sealed payloads do not compress; and no CRIME-style leaks
            ssl=ssl,
            **kw,
        )
        self._reaper = asyncio.create_task(self._reap(), name="relay-reaper")
        return self

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._reaper:
            self._reaper.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "channels": len(self.channels), **self.counters.__dict__}

    # -- admission (before the WebSocket upgrade) ----------------------------------------------
    def _admit(self, conn: ServerConnection, request: Request) -> Response | None:
        if request.path == "/health":
            return _json(200, self.health())
        match = _PATH.match(request.path.split("?", 1)[0])
        if not match or "?" in request.path:
            return _json(404, {"error": "unknown path; tokens never go in the URL"})
        channel_id = match.group(1)
        role = request.headers.get("x-stream-role", "")
        auth = request.headers.get("authorization", "")
        if role not in ("producer", "consumer") or not auth.startswith("Bearer "):
            return _json(400, {"error": "x-stream-role and a Bearer token are required"})
        try:
            self.verifier.verify(auth[len("Bearer "):], channel_id, role)  # type: ignore[arg-type]
        except TokenRejected as e:
            self.counters.rejected_tokens += 1
            return _json(401, {"error": e.message})
        channel = self.channels.get(channel_id)
        if channel is None:
            if len(self.channels) >= self.limits.max_channels:
                return _json(503, {"error": "relay is at its channel limit"})
            channel = self.channels[channel_id] = Channel(channel_id)
            self.counters.channels_opened += 1
        if getattr(channel, role) is not None:
            return _json(409, {"error": f"channel already has a {role}"})
        setattr(channel, role, conn)  # claimed now, so a racing second one is refused
        conn.stream_channel = channel  # type: ignore[attr-defined]
        conn.stream_role = role  # type: ignore[attr-defined]
        return None

    # -- connections ---------------------------------------------------------------------------
    async def _handle(self, conn: ServerConnection) -> None:
        channel: Channel = conn.stream_channel  # type: ignore[attr-defined]
        role: str = conn.stream_role  # type: ignore[attr-defined]
        try:
            if role == "producer":
                await self._producer(conn, channel)
            else:
                await self._consumer(conn, channel)
        except ConnectionClosed:
            pass
        finally:
            if getattr(channel, role) is conn:
                setattr(channel, role, None)
            channel.touch()
            channel.arrived.set()
            channel.drained.set()
            if channel.producer is None and channel.consumer is None and (
                channel.finished and channel.delivered >= channel.next_seq
            ):
                self.channels.pop(channel.id, None)

    def _check(self, message: Any, direction: Direction) -> FrameType:
        if not isinstance(message, bytes):
            raise RelayFrameInvalid("text message on a binary channel")
        header = decode_header(message, self.limits.max_payload_bytes)
        if header.direction != direction:
            raise RelayFrameInvalid("frame sent in the wrong direction")
        return header.type

    async def _producer(self, conn: ServerConnection, channel: Channel) -> None:
        while channel.held_up:
            await conn.send(channel.held_up.pop(0))
        async for message in conn:
            try:
                ftype = self._check(message, Direction.DOWN)
            except RelayFrameInvalid as e:
                self.counters.rejected_frames += 1
                await conn.close(1008, str(e)[:120])
                return
            if self._observer:
                self._observer(message)
            while channel.next_seq - channel.delivered >= self.limits.max_unsent_frames:
                # Backpressure: stop reading this producer until the consumer catches up.
                self.counters.producer_pauses += 1
                channel.drained.clear()
                await channel.drained.wait()
            channel.frames.append(message)
            if len(channel.frames) > self.limits.retained_frames:
                drop = len(channel.frames) - self.limits.retained_frames
                drop = min(drop, max(channel.delivered - channel.base_seq, 0))
                del channel.frames[:drop]
                channel.base_seq += drop
            self.counters.frames_down += 1
            self.counters.frame_bytes += len(message)
            if ftype in (FrameType.FINAL, FrameType.ERROR):
                channel.finished = True
            channel.touch()
            channel.arrived.set()

    async def _consumer(self, conn: ServerConnection, channel: Channel) -> None:
        resume = conn.request.headers.get("x-stream-resume-from") if conn.request else None
        start = int(resume) if resume and resume.isdigit() else 0
        if start < channel.base_seq:
            await conn.close(1011, "cannot resume: those frames are no longer held")
            return
        if resume:
            self.counters.resumes += 1
        channel.delivered = start
        upstream = asyncio.create_task(self._upstream(conn, channel))
        try:
            while True:
                while channel.delivered < channel.next_seq:
                    frame = channel.frames[channel.delivered - channel.base_seq]
                    await conn.send(frame)
                    channel.delivered += 1
                    channel.touch()
                    channel.drained.set()
                if channel.finished and channel.delivered >= channel.next_seq:
                    await upstream  # the consumer closes once it has the final frame
                    return
                if upstream.done():
                    return
                channel.arrived.clear()
                if channel.delivered < channel.next_seq:
                    continue
                await channel.arrived.wait()  # set by a new frame or by `upstream` ending
        finally:
            upstream.cancel()

    async def _upstream(self, conn: ServerConnection, channel: Channel) -> None:
        try:
            await self._forward_up(conn, channel)
        finally:
            channel.arrived.set()  # wakes the consumer's sender to notice its client left

    async def _forward_up(self, conn: ServerConnection, channel: Channel) -> None:
        async for message in conn:
            try:
                self._check(message, Direction.UP)
            except RelayFrameInvalid:
                self.counters.rejected_frames += 1
                await conn.close(1008, "invalid frame")
                return
            self.counters.frames_up += 1
            channel.touch()
            if channel.producer is not None:
                try:
                    await channel.producer.send(message)
                except ConnectionClosed:
                    pass
            elif len(channel.held_up) < MAX_HELD_UP:
                channel.held_up.append(message)

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(min(self.limits.idle_s / 4, 5.0))
            now = time.monotonic()
            for channel in list(self.channels.values()):
                if now - channel.last_activity > self.limits.idle_s:
                    self.counters.channels_reaped += 1
                    self.channels.pop(channel.id, None)
                    for conn in (channel.producer, channel.consumer):
                        if conn is not None:
                            await conn.close(1001, "channel idle")


def _json(status: int, body: dict[str, Any]) -> Response:
    data = json.dumps(body).encode()
    headers = Headers([("content-type", "application/json"), ("content-length", str(len(data)))])
    return Response(status, _REASONS.get(status, "Error"), headers, data)


_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            409: "Conflict", 503: "Service Unavailable"}
