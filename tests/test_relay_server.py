"""The relay server over real sockets: access, limits, resume, backpressure, opacity."""

from __future__ import annotations

import asyncio
import json

import pytest
import websockets

from streamllm.errors import RelayError, TokenRejected
from streamllm.relay.client import dial
from streamllm.relay.crypto import Opener, Sealer, new_key
from streamllm.relay.frames import Direction, FrameType
from streamllm.relay.server import RelayLimits, RelayServer
from streamllm.relay.tokens import mint

SECRET = b"relay-test-secret-32-bytes-long!"
NEEDLE = "violet-harbour-4410"  # appears in the answer; must never appear in what the relay sees


@pytest.fixture
async def relay():
    seen: list[bytes] = []
    server = await RelayServer(
        SECRET, RelayLimits(max_unsent_frames=8, retained_frames=64, idle_s=0.4),
        observer=seen.append,
    ).start()
    server.seen = seen  # type: ignore[attr-defined]
    server.url = f"ws://127.0.0.1:{server.port}"  # type: ignore[attr-defined]
    yield server
    await server.stop()


def tok(channel: str, role: str, ttl: float = 30) -> str:
    return mint(SECRET, channel, role, ttl)  # type: ignore[arg-type]


async def test_sealed_stream_passes_through_and_the_relay_sees_no_plaintext(relay):
    key = new_key()
    producer = await dial(relay.url, "c1", "producer", tok("c1", "producer"))
    consumer = await dial(relay.url, "c1", "consumer", tok("c1", "consumer"))
    sealer = Sealer(key, "c1", Direction.DOWN)
    words = ["alpha ", "beta ", NEEDLE]
    for w in words:
        await producer.send(sealer.seal(FrameType.DATA, json.dumps({"content": w}).encode()))
    await producer.send(sealer.final())
    opener, text = Opener(key, "c1", Direction.DOWN), ""
    async for frame in consumer.frames():
        ftype, payload = opener.open(frame)
        if ftype is FrameType.FINAL:
            break
        text += json.loads(payload)["content"]
    opener.end()
    assert text == "".join(words)
    assert len(relay.seen) == 4
    assert all(NEEDLE.encode() not in f and b"alpha" not in f for f in relay.seen)
    health = relay.health()
    assert health["frames_down"] == 4 and NEEDLE not in json.dumps(health)
    await producer.close()
    await consumer.close()


async def test_cancel_goes_up_to_the_producer(relay):
    key = new_key()
    producer = await dial(relay.url, "c2", "producer", tok("c2", "producer"))
    consumer = await dial(relay.url, "c2", "consumer", tok("c2", "consumer"))
    await consumer.send(Sealer(key, "c2", Direction.UP).seal(FrameType.CANCEL, b""))
    frame = await anext(producer.frames())
    assert Opener(key, "c2", Direction.UP).open(frame) == (FrameType.CANCEL, b"")
    await producer.close()
    await consumer.close()


async def test_cancel_sent_before_the_producer_connected_reaches_it_when_it_does(relay):
    # A job still queued on the cluster when its client left must not run for nobody.
    key = new_key()
    consumer = await dial(relay.url, "c9", "consumer", tok("c9", "consumer"))
    await consumer.send(Sealer(key, "c9", Direction.UP).seal(FrameType.CANCEL, b""))
    await consumer.close()
    producer = await dial(relay.url, "c9", "producer", tok("c9", "producer"))
    frames = producer.frames()
    ftype, _ = Opener(key, "c9", Direction.UP).open(await anext(frames))
    assert ftype is FrameType.CANCEL
    await producer.close()


@pytest.mark.parametrize("case", ["wrong secret", "other channel", "other role", "expired", "replayed"])
async def test_bad_tokens_are_refused(relay, case):
    good = tok("c3", "producer")
    if case == "replayed":
        first = await dial(relay.url, "c3", "producer", good)
        await first.close()
    token = {
        "wrong secret": mint(b"another-secret-another-secret-!!", "c3", "producer", 30),
        "other channel": tok("c4", "producer"),
        "other role": tok("c3", "consumer"),
        "expired": tok("c3", "producer", ttl=-1),
        "replayed": good,
    }[case]
    with pytest.raises(TokenRejected):
        await dial(relay.url, "c3", "producer", token)
    assert relay.health()["rejected_tokens"] >= 1


async def test_token_in_the_url_is_not_accepted(relay):
    with pytest.raises(websockets.exceptions.InvalidStatus) as exc:
        await websockets.connect(f"{relay.url}/v1/channels/c5?token={tok('c5', 'producer')}")
    assert exc.value.response.status_code == 404


async def test_second_producer_is_refused(relay):
    first = await dial(relay.url, "c6", "producer", tok("c6", "producer"))
    with pytest.raises(RelayError, match="409"):
        await dial(relay.url, "c6", "producer", tok("c6", "producer"))
    await first.close()


async def test_oversize_and_wrong_direction_frames_close_the_connection(relay):
    producer = await dial(relay.url, "c7", "producer", tok("c7", "producer"))
    up_frame = Sealer(new_key(), "c7", Direction.UP).seal(FrameType.CANCEL, b"")
    await producer.send(up_frame)  # producers may only send DOWN frames
    with pytest.raises(RelayError):
        async for _ in producer.frames():
            pass
    assert relay.health()["rejected_frames"] == 1
    big = await dial(relay.url, "c8", "producer", tok("c8", "producer"))
    await big.send(b"\x01" * (relay.limits.max_payload_bytes + 1024))
    with pytest.raises(RelayError):
        async for _ in big.frames():
            pass


async def test_consumer_reconnects_and_resumes_from_its_sequence_number(relay):
    key = new_key()
    producer = await dial(relay.url, "c9", "producer", tok("c9", "producer"))
    sealer = Sealer(key, "c9", Direction.DOWN)
    consumer = await dial(relay.url, "c9", "consumer", tok("c9", "consumer"))
    opener = Opener(key, "c9", Direction.DOWN)
    for i in range(3):
        await producer.send(sealer.seal(FrameType.DATA, str(i).encode()))
    got = []
    frames = consumer.frames()
    for _ in range(2):
        got.append(opener.open(await anext(frames))[1])
    await consumer.close()  # the gateway's link drops after two frames
    for i in range(3, 5):
        await producer.send(sealer.seal(FrameType.DATA, str(i).encode()))
    await producer.send(sealer.final())
    again = await dial(relay.url, "c9", "consumer", tok("c9", "consumer"),
                       resume_from=opener.next_seq)
    async for frame in again.frames():
        ftype, payload = opener.open(frame)
        if ftype is FrameType.FINAL:
            break
        got.append(payload)
    opener.end()
    assert got == [b"0", b"1", b"2", b"3", b"4"]
    assert relay.health()["resumes"] == 1
    await again.close()
    await producer.close()


async def test_fast_producer_is_paused_until_the_consumer_reads(relay):
    key = new_key()
    producer = await dial(relay.url, "c10", "producer", tok("c10", "producer"))
    sealer = Sealer(key, "c10", Direction.DOWN)
    for i in range(30):  # far more than max_unsent_frames=8, with nobody reading
        await producer.send(sealer.seal(FrameType.DATA, str(i).encode()))
    await producer.send(sealer.final())
    consumer = await dial(relay.url, "c10", "consumer", tok("c10", "consumer"))
    opener, got = Opener(key, "c10", Direction.DOWN), []
    async for frame in consumer.frames():
        ftype, payload = opener.open(frame)
        if ftype is FrameType.FINAL:
            break
        got.append(int(payload))
    assert got == list(range(30))
    assert relay.health()["producer_pauses"] >= 1
    await consumer.close()
    await producer.close()


async def test_idle_channel_is_reaped(relay):
    producer = await dial(relay.url, "c11", "producer", tok("c11", "producer"))
    received = [frame async for frame in producer.frames()]  # ends when the relay closes it
    assert received == []
    assert relay.health()["channels_reaped"] == 1
    assert "c11" not in relay.channels


async def test_health_endpoint_over_http(relay):
    import httpx2

    async with httpx2.AsyncClient() as client:
        resp = await client.get(f"http://127.0.0.1:{relay.port}/health")
    assert resp.status_code == 200 and resp.json()["status"] == "ok"


async def test_a_relay_that_drops_the_connection_before_the_handshake_is_unreachable_not_a_crash():
    """A relay that is stopping or starting can accept a connection and close it at once. To
    the dialler that is a RelayError (retry later), not the WebSocket library's own error."""

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(RelayError, match="handshake"):
            await dial(f"ws://127.0.0.1:{port}", "c", "consumer", "token")
    finally:
        server.close()
        await server.wait_closed()
