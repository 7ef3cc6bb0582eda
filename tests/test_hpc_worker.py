"""The remote worker against a real relay and the simulator standing in for the node's vLLM."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from streamllm.config import SimModelSettings, SimSettings
from streamllm.hpc.worker import run_completion
from streamllm.relay.client import dial
from streamllm.relay.crypto import Opener, Sealer, new_key
from streamllm.relay.frames import Direction, FrameType
from streamllm.relay.server import RelayServer
from streamllm.relay.tokens import mint
from streamllm.serving import ServerThread
from streamllm.sim.app import Simulator
from streamllm.sim.content import answer_text
from tests.conftest import closed_port

SECRET = b"worker-test-secret-32-bytes-long"
MESSAGES = [{"role": "user", "content": "summarise the cluster queue"}]


@pytest.fixture
def vllm():
    sim = Simulator(SimSettings(models={
        "m": SimModelSettings(answer_tokens=40),
        "slow": SimModelSettings(answer_tokens=400, tokens_per_s=40),
        "broken": SimModelSettings(error_rate=1.0),
    }))
    with ServerThread(sim.app) as server:
        yield sim, f"{server.url}/v1"


@pytest.fixture
async def relay():
    server = await RelayServer(SECRET).start()
    yield server, f"ws://127.0.0.1:{server.port}"
    await server.stop()


def job_for(relay_url, backend_url, channel, key, model="m"):
    return {
        "relay_url": relay_url,
        "channel": channel,
        "producer_token": mint(SECRET, channel, "producer", 60),
        "key": key,
        "backend_url": backend_url,
        "body": {"model": model, "messages": MESSAGES},
    }


async def consume(relay_url, channel, key, cancel_after=None):
    link = await dial(relay_url, channel, "consumer", mint(SECRET, channel, "consumer", 60))
    opener, text, kinds = Opener(key, channel, Direction.DOWN), "", []
    up = Sealer(key, channel, Direction.UP)
    async for frame in link.frames():
        ftype, payload = opener.open(frame)
        kinds.append(ftype)
        if ftype is FrameType.DATA:
            chunk = json.loads(payload)
            text += "".join(c["delta"].get("content") or "" for c in chunk["choices"])
            if cancel_after is not None and len(kinds) == cancel_after:
                await link.send(up.seal(FrameType.CANCEL, b""))
        else:
            break
    await link.close()
    return text, kinds


async def test_worker_streams_sealed_chunks_and_returns_the_backstop(vllm, relay):
    sim, backend = vllm
    _, relay_url = relay
    key = new_key()
    job = job_for(relay_url, backend, "w1", key)
    consumer = asyncio.create_task(consume(relay_url, "w1", key))
    result = await asyncio.to_thread(run_completion, job)
    text, kinds = await consumer
    expected = answer_text("m", MESSAGES, 40)
    assert text == expected
    assert kinds[-1] is FrameType.FINAL
    assert result["choices"][0]["content"] == expected
    assert result["choices"][0]["finish_reason"] == "stop"
    assert result["usage"]["completion_tokens"] == 40
    assert result["error"] is None and result["relay_error"] is None
    assert sim.log[0].body["stream_options"] == {"include_usage": True}


async def test_consumer_cancel_stops_the_backend(vllm, relay):
    sim, backend = vllm
    _, relay_url = relay
    key = new_key()
    consumer = asyncio.create_task(consume(relay_url, "w2", key, cancel_after=4))
    result = await asyncio.to_thread(run_completion, job_for(relay_url, backend, "w2", key, "slow"))
    await consumer
    assert result["cancelled"] is True and result["error"] is None
    assert await asyncio.to_thread(
        sim.wait_until, lambda log: log and log[0].outcome == "cancelled", 5
    )
    assert sim.log[0].tokens_sent < 400


async def test_backend_error_becomes_an_error_frame(vllm, relay):
    _, backend = vllm
    _, relay_url = relay
    key = new_key()
    consumer = asyncio.create_task(consume(relay_url, "w3", key))
    result = await asyncio.to_thread(run_completion, job_for(relay_url, backend, "w3", key, "broken"))
    _, kinds = await consumer
    assert kinds == [FrameType.ERROR]
    assert result["error"]["status"] == 500


async def test_unreachable_relay_still_returns_the_whole_answer(vllm):
    _, backend = vllm
    job = job_for(f"ws://127.0.0.1:{closed_port()}", backend, "w4", new_key())
    result = await asyncio.to_thread(run_completion, job)
    assert result["relay_error"].startswith("relay unreachable")
    assert result["choices"][0]["content"] == answer_text("m", MESSAGES, 40)


def test_worker_imports_nothing_heavy():
    probe = (
        "import sys, streamllm.hpc.worker\n"
        "heavy = {'fastapi', 'starlette', 'pydantic', 'uvicorn', 'httpx2', 'httpcore2', "
        "'sqlalchemy', 'typer', 'yaml', 'anyio'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    out = subprocess.run([sys.executable, "-I", "-c", probe], capture_output=True, text=True,
                         check=True, timeout=60).stdout.strip()
    assert out == "[]"
