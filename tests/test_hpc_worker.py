"""The remote worker against a real relay and the simulator standing in for the node's vLLM."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest

from streamllm.hpc.worker import run_completion
from streamllm.relay.client import dial
from streamllm.relay.crypto import Opener, Sealer, new_key
from streamllm.relay.frames import Direction, FrameType
from streamllm.relay.server import RelayServer
from streamllm.relay.tokens import mint
from streamllm.sim.content import answer_text
from tests.conftest import closed_port

SECRET = b"worker-test-secret-32-bytes-long"
MESSAGES = [{"role": "user", "content": "summarise the cluster queue"}]


@pytest.fixture
def vllm(start_sim):
    running = start_sim({
        "m": {"answer_tokens": 40},
        "slow": {"answer_tokens": 400, "tokens_per_s": 40},
        "broken": {"error_rate": 1.0},
    })
    return running.sim, running.url


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


def test_a_job_that_starts_after_its_client_gave_up_does_not_run(vllm):
    sim, backend = vllm
    before = len(sim.log)
    job = job_for(f"ws://127.0.0.1:{closed_port()}", backend, "w5", new_key())
    job["start_by"] = time.time() - 1  # the gateway stopped waiting a second ago
    result = run_completion(job)
    assert result["error"]["status"] == 408 and result["cancelled"]
    assert result["choices"] == [] and len(sim.log) == before, "the backend was never called"


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


def _batch_job(backend: str) -> dict:
    """A job whose relay is unreachable: its answer comes back only as the returned result."""
    return {
        "relay_url": f"ws://127.0.0.1:{closed_port()}", "channel": "fresh",
        "producer_token": "unused", "key": None, "backend_url": backend,
        "body": {"model": "m", "messages": MESSAGES}, "relay_connect_s": 2.0,
    }


def test_worker_survives_globus_compute_serializer_in_another_interpreter(vllm):
    from globus_compute_sdk.serialize import ComputeSerializer

    _, backend = vllm
    ser = ComputeSerializer()
    packed = json.dumps({"fn": ser.serialize(run_completion), "args": ser.serialize((_batch_job(backend),))})
    runner = (
        "import json, sys\n"
        "from globus_compute_sdk.serialize import ComputeSerializer\n"
        "ser = ComputeSerializer()\n"
        "packed = json.loads(sys.stdin.read())\n"
        "fn, args = ser.deserialize(packed['fn']), ser.deserialize(packed['args'])\n"
        "print(ser.serialize(fn(*args)))\n"
    )
    out = subprocess.run([sys.executable, "-c", runner], input=packed, capture_output=True,
                         text=True, check=True, timeout=120).stdout.strip()
    result = ser.deserialize(out)
    assert result["choices"][0]["content"] == answer_text("m", MESSAGES, 40)


def test_worker_runs_with_only_its_declared_dependencies(vllm, tmp_path):
    """A fresh interpreter without site-packages, given only cryptography, cffi, websockets and
    the worker's own modules, runs a job."""
    import pathlib
    import shutil

    import cffi
    import cryptography
    import websockets

    import streamllm

    _, backend = vllm
    site = tmp_path / "site"
    (site / "streamllm" / "relay").mkdir(parents=True)
    (site / "streamllm" / "hpc").mkdir(parents=True)
    src = pathlib.Path(streamllm.__file__).parent
    for rel in ("__init__.py", "errors.py", "relay/__init__.py", "relay/frames.py",
                "relay/crypto.py", "hpc/__init__.py", "hpc/worker.py"):
        shutil.copy(src / rel, site / "streamllm" / rel)
    packages = pathlib.Path(cryptography.__file__).parent.parent
    for name in ("cryptography", "cffi", "websockets"):
        (site / name).symlink_to(packages / name)
    for backend_so in packages.glob("_cffi_backend*.so"):
        (site / backend_so.name).symlink_to(backend_so)
    assert cffi and websockets  # imported above only to locate them
    runner = (
        "import json, sys\n"
        "from streamllm.hpc.worker import run_completion\n"
        "print(json.dumps(run_completion(json.loads(sys.stdin.read()))))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-S", "-c", runner], input=json.dumps(_batch_job(backend)),
        capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(site)}, check=False
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["choices"][0]["content"] == answer_text("m", MESSAGES, 40)


async def test_an_agent_channel_moves_to_its_next_epoch_and_resends_what_was_not_confirmed():
    """The agent's end of its channel across a relay restart: it dials its next epoch's channel
    (own key, own token), says hello there naming every request it holds, and sends again the
    results the gateway's beats had not confirmed, and only those."""
    from streamllm.hpc.agent import _Channel, epoch_channel, epoch_key

    relay = await RelayServer(SECRET).start()
    port, url, base, key = relay.port, f"ws://127.0.0.1:{relay.port}", "agent-t", new_key()
    spec = {"relay_url": url, "channel": base, "key": key, "reconnect_s": 10,
            "producer_token": mint(SECRET, base, "producer", 60),
            "reconnect_tokens": [mint(SECRET, epoch_channel(base, n), "producer", 60)
                                 for n in (1, 2)]}
    agent = await asyncio.to_thread(_Channel, spec)
    gateway = await dial(url, base, "consumer", mint(SECRET, base, "consumer", 60))
    opener, up = Opener(key, base, Direction.DOWN), Sealer(key, base, Direction.UP)
    frames = gateway.frames()

    async def read() -> dict:  # the next message from the agent, on the current channel
        return json.loads(opener.open(await asyncio.wait_for(anext(frames), 10))[1])

    # Result "a" is read and confirmed by a beat; result "b" is sent but never read.
    await asyncio.to_thread(agent.send, {"t": "done", "channel": "a", "result": {}}, keep=True)
    assert (await read())["channel"] == "a"
    await gateway.send(up.seal(FrameType.DATA, json.dumps({"t": "beat", "got": 1}).encode()))
    assert await asyncio.to_thread(agent.receive, 5.0) is None  # a beat is for the channel
    await asyncio.to_thread(agent.send, {"t": "done", "channel": "b", "result": {}}, keep=True)

    await gateway.close()
    await relay.stop()
    relay = await RelayServer(SECRET).start(port=port)
    try:
        assert await asyncio.to_thread(agent.reconnect, {"t": "hello", "phase": "ready"}, ["c"])
        assert agent.epoch == 1
        name = epoch_channel(base, 1)
        gateway = await dial(url, name, "consumer", mint(SECRET, name, "consumer", 60))
        opener = Opener(epoch_key(key, base, 1), name, Direction.DOWN)
        assert epoch_key(key, base, 1) != key
        frames = gateway.frames()
        hello = await read()
        assert hello == {"t": "hello", "phase": "ready", "resync": True, "serving": ["b", "c"]}
        again = await read()
        assert again == {"t": "done", "channel": "b", "result": {}}
        # Nothing else was waiting: the next frame is the one sent now.
        await asyncio.to_thread(agent.send, {"t": "beat", "inflight": 0})
        assert (await read())["t"] == "beat"
        await gateway.close()
    finally:
        await asyncio.to_thread(agent.close)  # its close handshake needs this loop's relay
        await relay.stop()
