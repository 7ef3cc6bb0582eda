"""The two streaming clients (lean HTTP/1.1 and httpx2) behave the same, over real sockets."""

from __future__ import annotations

import asyncio
import json

import httpx2 as httpx
import openai
import pytest

from streamllm.sim.content import answer_text
from streamllm.tiers.h1stream import H1StreamClient, StreamFailed

HELLO = [{"role": "user", "content": "hello there"}]


@pytest.fixture(params=["auto", "httpx"])
def stream_client(request):
    return request.param


def sdk(t) -> openai.OpenAI:
    return openai.OpenAI(base_url=t.gateway.v1, api_key="unused", max_retries=0)


def test_streams_full_answer_with_usage(three_tiers, stream_client):
    t = three_tiers(
        sims={"local": {"answer_tokens": 300}}, tiers={"local": {"stream_client": stream_client}}
    )
    for _ in range(3):  # also reuses the kept-alive connection
        chunks = list(sdk(t).chat.completions.create(
            model="local", messages=HELLO, stream=True, stream_options={"include_usage": True}
        ))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == answer_text("local-m", HELLO, 300)
        assert chunks[-1].usage.completion_tokens == 300


def test_mid_stream_death_and_client_cancel(three_tiers, stream_client):
    t = three_tiers(
        sims={"local": {"disconnect_after": 5},
              "hpc": {"tokens_per_s": 40, "answer_tokens": 400}},
        tiers={"local": {"stream_client": stream_client}, "hpc": {"stream_client": stream_client}},
    )
    seen = ""
    with pytest.raises(openai.APIError):
        for chunk in sdk(t).chat.completions.create(model="local", messages=HELLO, stream=True):
            seen += chunk.choices[0].delta.content or ""
    assert seen == answer_text("local-m", HELLO, 5)
    with httpx.stream("POST", f"{t.gateway.v1}/chat/completions", timeout=10,
                      json={"model": "hpc", "messages": HELLO, "stream": True}) as resp:
        next(resp.iter_lines())
    assert t.hpc.sim.wait_until(lambda log: log and log[0].outcome == "cancelled", timeout=5)


def test_backend_error_status_falls_back(three_tiers, stream_client):
    t = three_tiers(
        sims={"local": {"error_rate": 1.0}}, tiers={"local": {"stream_client": stream_client}}
    )
    raw = sdk(t).chat.completions.with_raw_response.create(
        model="auto", messages=HELLO, stream=True
    )
    assert raw.headers["x-stream-tier"] == "hpc" and raw.headers["x-stream-fallbacks"] == "1"


# -- the lean client on its own, against small servers written for each case --------------------


async def serve(handler) -> tuple[asyncio.AbstractServer, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    return head + await reader.readexactly(length)


async def test_lean_client_retries_once_when_a_kept_alive_connection_was_closed():
    connections = 0

    async def answer_once_then_close(reader, writer):
        nonlocal connections
        connections += 1
        await read_request(reader)
        body = b'data: {"n": %d}\n\n' % connections
        # keep-alive response, but the server closes the connection right after it
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    server, port = await serve(answer_once_then_close)
    client = H1StreamClient(f"http://127.0.0.1:{port}/v1", {})
    try:
        for expected in (1, 2):
            resp = await client.post("/chat/completions", b"{}", connect_timeout=2)
            assert resp.status == 200
            assert await resp.read() == b'data: {"n": %d}\n\n' % expected
            resp.close()
    finally:
        client.close()
        server.close()
    assert connections == 2


async def test_lean_client_reuses_connections_and_decodes_chunked_bodies():
    connections = 0

    async def chunked(reader, writer):
        nonlocal connections
        connections += 1
        while True:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                break
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                          b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
            await writer.drain()
        writer.close()

    server, port = await serve(chunked)
    client = H1StreamClient(f"http://127.0.0.1:{port}", {"authorization": "Bearer k"})
    try:
        for _ in range(5):
            resp = await client.post("/x", json.dumps({"a": 1}).encode(), connect_timeout=2)
            assert await resp.read() == b"hello world"
            resp.close()
    finally:
        client.close()
        server.close()
    assert connections == 1


async def test_lean_client_reports_refused_and_garbage_as_stream_failed():
    from tests.conftest import closed_port

    client = H1StreamClient(f"http://127.0.0.1:{closed_port()}", {})
    with pytest.raises(StreamFailed, match="could not connect"):
        await client.post("/x", b"{}", connect_timeout=2)

    async def garbage(reader, writer):
        await read_request(reader)
        writer.write(b"this is not http\r\n\r\n")
        await writer.drain()
        writer.close()

    server, port = await serve(garbage)
    client = H1StreamClient(f"http://127.0.0.1:{port}", {})
    try:
        with pytest.raises(StreamFailed):
            await client.post("/x", b"{}", connect_timeout=2)
    finally:
        server.close()


async def test_lean_client_applies_backpressure_and_loses_nothing():
    total = 8 << 20  # 8 MiB, several times the client's buffer limit

    async def big(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % total)
        block = bytes(range(256)) * 4096  # 1 MiB
        for _ in range(8):
            writer.write(block)
            await writer.drain()
        writer.close()

    server, port = await serve(big)
    client = H1StreamClient(f"http://127.0.0.1:{port}", {})
    try:
        resp = await client.post("/x", b"{}", connect_timeout=2)
        received, largest = 0, 0
        while data := await resp.take():
            received += len(data)
            largest = max(largest, len(data))
            await asyncio.sleep(0)  # a slow reader: let the server run ahead
        assert received == total
        assert largest < 3 << 20, "reading pauses near the limit instead of buffering it all"
        resp.close()
    finally:
        client.close()
        server.close()


class RecordingTransport:
    """Stands in for the socket under the client's protocol, recording flow-control calls."""

    def __init__(self):
        self.calls: list[str] = []
        self.written = b""

    def write(self, data):
        self.written += data

    def pause_reading(self):
        self.calls.append("pause")

    def resume_reading(self):
        self.calls.append("resume")

    def abort(self):
        self.calls.append("abort")


async def test_lean_client_pauses_the_backend_when_its_buffer_is_full_and_resumes_on_read():
    from streamllm.tiers.h1stream import _Connection

    conn = _Connection(on_idle=lambda c: None)
    transport = RecordingTransport()
    conn.connection_made(transport)
    conn.start(b"POST /x HTTP/1.1\r\n\r\n")
    body = b"x" * (3 << 19)  # 1.5 MiB, over the 1 MiB limit
    conn.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body))
    await conn.response_started()
    for i in range(0, len(body), 1 << 16):
        conn.data_received(body[i:i + (1 << 16)])
    assert transport.calls == ["pause"]
    assert len(await conn.take()) == len(body)
    assert transport.calls == ["pause", "resume"]
    assert await conn.take() == b""
