"""A hostile relay between the worker and the gateway: every lie is caught, nothing wrong reaches
the client, and the relay never handles a byte of the answer, the prompt, the key or a token.

The whole HPC path runs for real: the backend submits the job to a local control plane (a
process pool), the worker streams from the simulator (the cluster's vLLM) and dials the relay as
producer, the backend dials it as consumer. The relay is `tests.hostile_relay.HostileRelay`,
which rewrites the frames going down; the client must still get every token exactly once,
healed from the control-plane result, and the backend must name what it caught.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from streamllm.config import SimModelSettings, SimSettings
from streamllm.hpc.control import IdempotentSubmitter, JobsOnly, LocalControlPlane
from streamllm.relay.crypto import Sealer, new_key
from streamllm.relay.frames import HEADER_SIZE, Direction, FrameType, channel_tag
from streamllm.relay.server import RelayServer
from streamllm.serving import ServerThread
from streamllm.sim.app import Simulator
from streamllm.sim.content import answer_text
from streamllm.tiers.hpc import HPCDeadlines, HPCRelayBackend
from tests.hostile_relay import CUT, Channel, HostileRelay, faithful

pytestmark = pytest.mark.timeout(30)

SECRET = b"hostile-relay-secret-32-bytes-ok"
MODEL, TOKENS = "m", 40
# 100 tokens/s: the job is still generating for ~0.4 s after the relay's first lie, so the lie
# reaches the backend long before the control-plane result could make it moot.
VLLM_MODELS = {MODEL: SimModelSettings(answer_tokens=TOKENS, tokens_per_s=100)}

MESSAGES = [{"role": "user", "content": "Explain how the relay keeps answers private"}]
OTHER_MESSAGES = [{"role": "user", "content": "Explain how the control plane starts a job"}]
MARKER = "quokka-lantern-7319"  # in the prompt, which travels by the control plane only
SECRET_MESSAGES = [{"role": "user", "content": f"Summarise the findings of case {MARKER}"}]
WORD = "institution"  # in the simulator's answer to SECRET_MESSAGES
INJECTED = "INJECTED-BY-THE-RELAY"

# Down frames of one answer: 0 is the role chunk, 1..40 one token each, 41 the finish reason,
# 42 the usage, 43 FINAL. The relay starts lying at frame K, after two tokens went through.
K = 3


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vllm_url():
    with ServerThread(Simulator(SimSettings(models=VLLM_MODELS)).app) as server:
        yield f"{server.url}/v1"


@pytest.fixture(scope="module")
def plane():
    p = LocalControlPlane(max_workers=2)
    # Start both worker processes now (the pool forks one per submission while none is idle),
    # so two concurrent requests really run at once and no test pays for process start-up.
    for f in [p.submit(int, 0), p.submit(int, 0)]:
        f.result()
    yield p
    p.shutdown()


class RecordingPlane(JobsOnly):
    """A real control plane that keeps the jobs it carried: what the cluster, and only the
    cluster, is given (the key, the producer token, the prompt)."""

    def __init__(self, plane: LocalControlPlane):
        self.plane, self.name, self.jobs = plane, plane.name, []

    def submit(self, fn: Callable[..., Any], *args: Any):
        self.jobs.append(args[0])
        return self.plane.submit(fn, *args)

    def shutdown(self) -> None:
        pass


def hpc_backend(plane: Any, relay_url: str, vllm_url: str, encrypt: bool = True):
    # Tight deadlines: a backend that waits for something that never comes fails fast.
    deadlines = HPCDeadlines(producer_connect=10, first_token=10, between_tokens=10, total=20)
    return HPCRelayBackend("hpc", IdempotentSubmitter(plane), relay_url, SECRET, vllm_url,
                           deadlines=deadlines, encrypt=encrypt)


async def collect(stream: AsyncIterator[list[Any]]) -> tuple[str, str | None, dict | None]:
    """What an OpenAI client would assemble from the stream: text, finish reason, usage."""
    text, finish, usage = "", None, None
    async for batch in stream:
        for chunk in batch:
            for choice in chunk.data.get("choices") or ():
                text += (choice.get("delta") or {}).get("content") or ""
                finish = choice.get("finish_reason") or finish
            usage = chunk.data.get("usage") or usage
    return text, finish, usage


def request(messages: list[dict[str, Any]]) -> dict[str, Any]:
    return {"model": MODEL, "messages": messages}


# -- what the relay does to frame K ----------------------------------------------------------------
# An edit gets frame K (and the rest of the stream, to pull more from) and returns what the
# consumer gets in its place.
Edit = Callable[[HostileRelay, Channel, bytes, AsyncIterator[bytes]], Awaitable[list[Any]]]


def at_frame_k(edit: Edit):
    """A mutation that passes every down frame through except frame K, which `edit` replaces."""

    async def mutation(relay: HostileRelay, channel: Channel, frames: AsyncIterator[bytes]):
        index = 0
        async for frame in frames:
            out = await edit(relay, channel, frame, frames) if index == K else [frame]
            for item in out:
                yield item
                if item is CUT:
                    return
            index += 1

    return mutation


async def tamper(relay, channel, frame, frames):
    flipped = bytearray(frame)
    flipped[HEADER_SIZE + 2] ^= 0x01  # one bit of the ciphertext
    return [bytes(flipped)]


async def tamper_header(relay, channel, frame, frames):
    # Relabel a DATA frame as FINAL: an attempt to end the answer early.
    return [frame[:1] + bytes([FrameType.FINAL]) + frame[2:]]


async def replay(relay, channel, frame, frames):
    return [frame, frame]


async def reorder(relay, channel, frame, frames):
    return [await anext(frames), frame]


async def drop(relay, channel, frame, frames):
    return []


async def truncate(relay, channel, frame, frames):
    return [CUT]  # frames K.. and FINAL never arrive; the consumer's connection is closed


async def cut_frame(relay, channel, frame, frames):
    return [frame[:-5]]  # a frame shorter than its header says


def _data_frame(key: bytes | None, channel: str, seq: int, content: str) -> bytes:
    """A DATA frame built by the relay itself (it holds no key: None means plaintext)."""
    sealer = Sealer(key, channel, Direction.DOWN)
    sealer.seq = seq
    chunk = {"object": "chat.completion.chunk", "model": MODEL,
             "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]}
    return sealer.seal(FrameType.DATA, json.dumps(chunk).encode())


async def inject_plaintext(relay, channel, frame, frames):
    return [_data_frame(None, channel.id, K, INJECTED), frame]


async def inject_forged(relay, channel, frame, frames):
    # Sealed, but under a key of the relay's own making.
    return [_data_frame(new_key(), channel.id, K, INJECTED), frame]


HOSTILE = [
    # (mutation, what the backend must have rejected, how many streams it healed)
    # The control: an honest relay. A result that overtakes the relay's last frames waits for
    # them, so nothing is healed.
    pytest.param(faithful, {}, 0, id="faithful"),
    pytest.param(at_frame_k(tamper), {"RelayTampered": 1}, 1, id="tamper"),
    pytest.param(at_frame_k(tamper_header), {"RelayTampered": 1}, 1, id="tamper-header"),
    pytest.param(at_frame_k(replay), {"RelayReplayed": 1}, 1, id="replay"),
    pytest.param(at_frame_k(reorder), {"RelayReordered": 1}, 1, id="reorder"),
    pytest.param(at_frame_k(drop), {"RelayReordered": 1}, 1, id="drop"),
    # A connection that ends without FINAL is a truncation, healed from the result.
    pytest.param(at_frame_k(truncate), {"RelayTruncated": 1}, 1, id="truncate"),
    pytest.param(at_frame_k(cut_frame), {"RelayFrameInvalid": 1}, 1, id="cut-frame"),
    pytest.param(at_frame_k(inject_plaintext), {"RelayPlaintext": 1}, 1, id="inject-plaintext"),
    pytest.param(at_frame_k(inject_forged), {"RelayTampered": 1}, 1, id="inject-forged"),
]


@pytest.fixture
async def hostile(request):
    relay = await HostileRelay(request.param).start()
    yield relay
    await relay.stop()


@pytest.mark.parametrize(("hostile", "rejected", "healed"), HOSTILE, indirect=["hostile"])
async def test_a_lying_relay_is_caught_and_the_client_gets_the_exact_answer(
    plane, vllm_url, hostile, rejected, healed
):
    b = hpc_backend(plane, hostile.url, vllm_url)
    text, finish, usage = await collect(b.stream(request(MESSAGES)))
    assert text == answer_text(MODEL, MESSAGES, TOKENS), "every token exactly once, none forged"
    assert finish == "stop" and usage["completion_tokens"] == TOKENS
    assert b.rejected == rejected
    if healed is not None:
        assert b.healed == healed
    # The worker streamed its whole answer through the double: the lie was the relay's alone.
    (channel,) = hostile.channels.values()
    assert len(channel.received) == TOKENS + 4


# -- splicing: two channels at once ----------------------------------------------------------------
def splicing(victim: Callable[[], str], retag: bool):
    """On the victim's channel, frame K is replaced by frame K of the other channel; `retag`
    also rewrites the channel tag in its header, to get past the cheap check."""

    async def edit(relay, channel, frame, frames):
        if channel.id != victim():
            return [frame]
        other = await relay.frame_of_another_channel(channel, K)
        return [other[:4] + channel_tag(channel.id) + other[12:] if retag else other]

    return at_frame_k(edit)


@pytest.mark.parametrize(("retag", "rejected"), [
    pytest.param(False, {"RelaySpliced": 1}, id="splice"),
    pytest.param(True, {"RelayTampered": 1}, id="splice-retagged"),
])
async def test_a_frame_spliced_in_from_another_channel_is_caught(
    plane, vllm_url, retag, rejected
):
    # One backend per request, so each one's counters say what happened on its own channel.
    victim_plane, donor_plane = RecordingPlane(plane), RecordingPlane(plane)
    # The worker dials the relay only after its job was submitted, so the channel is known.
    relay = await HostileRelay(splicing(lambda: victim_plane.jobs[0]["channel"], retag)).start()
    try:
        victim = hpc_backend(victim_plane, relay.url, vllm_url)
        donor = hpc_backend(donor_plane, relay.url, vllm_url)
        (text, finish, _), (donor_text, donor_finish, _) = await asyncio.gather(
            collect(victim.stream(request(MESSAGES))),
            collect(donor.stream(request(OTHER_MESSAGES))),
        )
    finally:
        await relay.stop()
    assert text == answer_text(MODEL, MESSAGES, TOKENS)
    assert donor_text == answer_text(MODEL, OTHER_MESSAGES, TOKENS)
    assert finish == donor_finish == "stop"
    assert len(relay.producers) == 2, "both requests streamed through the relay at once"
    assert victim.rejected == rejected and victim.healed == 1
    assert donor.rejected == {}


# -- what the relay can read ----------------------------------------------------------------------
def secrets_of(job: dict[str, Any]) -> dict[str, bytes]:
    key = job["key"]
    return {
        "answer word": WORD.encode(),
        "prompt marker": MARKER.encode(),
        "key": key,
        "key (hex)": key.hex().encode(),
        "key (base64)": base64.b64encode(key),
        "key (base64url)": base64.urlsafe_b64encode(key).rstrip(b"="),
        "producer token signature": job["producer_token"].split(".")[1].encode(),
    }


async def test_the_relay_server_never_handles_the_answer_prompt_key_or_token(plane, vllm_url):
    assert WORD in answer_text(MODEL, SECRET_MESSAGES, TOKENS)
    seen: list[bytes] = []
    relay = await RelayServer(SECRET, observer=seen.append).start()
    try:
        spy = RecordingPlane(plane)
        b = hpc_backend(spy, f"ws://127.0.0.1:{relay.port}", vllm_url)
        text, _, _ = await collect(b.stream(request(SECRET_MESSAGES)))
    finally:
        await relay.stop()
    assert text == answer_text(MODEL, SECRET_MESSAGES, TOKENS) and WORD in text
    assert b.rejected == {} and len(seen) == TOKENS + 4  # every frame went through the relay
    handled = b"".join(seen)
    leaks = [name for name, needle in secrets_of(spy.jobs[0]).items() if needle in handled]
    assert leaks == []


async def test_the_hostile_relay_handles_no_secret_in_any_byte(plane, vllm_url):
    relay = await HostileRelay().start()
    try:
        spy = RecordingPlane(plane)
        b = hpc_backend(spy, relay.url, vllm_url)
        text, _, _ = await collect(b.stream(request(SECRET_MESSAGES)))
    finally:
        await relay.stop()
    assert text == answer_text(MODEL, SECRET_MESSAGES, TOKENS) and WORD in text
    (job,) = spy.jobs
    # Tokens travel in the Authorization header, so the relay does see them there, and only there.
    assert relay.tokens("producer") == [job["producer_token"]]
    (consumer_token,) = relay.tokens("consumer")
    needles = {**secrets_of(job),
               "consumer token signature": consumer_token.split(".")[1].encode()}
    handled = relay.handled()
    assert len(relay.frames) >= TOKENS + 4
    assert [name for name, needle in needles.items() if needle in handled] == []


async def test_an_unencrypted_channel_would_show_the_answer_to_the_relay(plane, vllm_url):
    """The control for the two tests above: the search finds the word when it is there."""
    seen: list[bytes] = []
    relay = await RelayServer(SECRET, observer=seen.append).start()
    try:
        b = hpc_backend(plane, f"ws://127.0.0.1:{relay.port}", vllm_url, encrypt=False)
        text, _, _ = await collect(b.stream(request(SECRET_MESSAGES)))
    finally:
        await relay.stop()
    assert text == answer_text(MODEL, SECRET_MESSAGES, TOKENS)
    assert WORD.encode() in b"".join(seen)
