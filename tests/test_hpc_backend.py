"""The HPC backend: control plane + relay + backstop, with faults caused for real."""

from __future__ import annotations

import concurrent.futures

import pytest

from streamllm.config import SimModelSettings, SimSettings
from streamllm.errors import BackendFailed
from streamllm.hpc.control import IdempotentSubmitter, JobsOnly, LocalControlPlane
from streamllm.relay.server import RelayServer
from streamllm.serving import ServerThread
from streamllm.sim.app import Simulator
from streamllm.sim.content import answer_text
from streamllm.tiers.hpc import HPCDeadlines, HPCRelayBackend
from tests.conftest import closed_port

SECRET = b"hpc-backend-secret-32-bytes-long"
MESSAGES = [{"role": "user", "content": "fit this model on the cluster"}]


@pytest.fixture(scope="module")
def vllm():
    sim = Simulator(SimSettings(models={
        "m": SimModelSettings(answer_tokens=30),
        "slow": SimModelSettings(answer_tokens=60, tokens_per_s=60),
        "broken": SimModelSettings(error_rate=1.0),
    }))
    with ServerThread(sim.app) as server:
        yield sim, f"{server.url}/v1"


@pytest.fixture(scope="module")
def plane():
    p = LocalControlPlane(max_workers=2)
    yield p
    p.shutdown()


@pytest.fixture
async def relay():
    server = await RelayServer(SECRET).start()
    yield server
    await server.stop()


def backend(plane, relay_url, vllm_url, **deadlines):
    return HPCRelayBackend(
        "hpc", IdempotentSubmitter(plane), relay_url, SECRET, vllm_url,
        deadlines=HPCDeadlines(**deadlines) if deadlines else None,
    )


async def collect(stream, stop_after=None, on_stop=None):
    text, finish, usage, batches = "", None, None, 0
    async for batch in stream:
        batches += 1
        for chunk in batch:
            for c in chunk.data.get("choices") or ():
                text += (c.get("delta") or {}).get("content") or ""
                finish = c.get("finish_reason") or finish
            usage = chunk.data.get("usage") or usage
        if stop_after is not None and batches == stop_after:
            await on_stop()
    return text, finish, usage


async def test_streams_through_the_relay(plane, relay, vllm):
    _, url = vllm
    b = backend(plane, f"ws://127.0.0.1:{relay.port}", url)
    text, finish, usage = await collect(b.stream({"model": "m", "messages": MESSAGES}))
    assert text == answer_text("m", MESSAGES, 30) and finish == "stop"
    assert usage["completion_tokens"] == 30
    assert b.healed == 0 and relay.health()["frames_down"] >= 30


async def test_relay_killed_mid_stream_loses_and_repeats_nothing(plane, relay, vllm):
    _, url = vllm
    b = backend(plane, f"ws://127.0.0.1:{relay.port}", url)
    text, finish, usage = await collect(
        b.stream({"model": "slow", "messages": MESSAGES}), stop_after=5, on_stop=relay.stop
    )
    assert text == answer_text("slow", MESSAGES, 60), "every token exactly once"
    assert finish == "stop" and usage["completion_tokens"] == 60
    assert b.healed == 1


async def test_no_relay_at_all_serves_from_the_control_plane_result(plane, vllm):
    _, url = vllm
    b = backend(plane, f"ws://127.0.0.1:{closed_port()}", url)
    text, finish, _ = await collect(b.stream({"model": "m", "messages": MESSAGES}))
    assert text == answer_text("m", MESSAGES, 30) and finish == "stop"


async def test_job_failure_before_the_first_token_is_a_backend_failure(plane, relay, vllm):
    _, url = vllm
    b = backend(plane, f"ws://127.0.0.1:{relay.port}", url)
    with pytest.raises(BackendFailed, match="answered 500"):
        await collect(b.stream({"model": "broken", "messages": MESSAGES}))


class NeverRuns(JobsOnly):
    """A control plane whose jobs stay queued forever (a cluster with a full queue)."""

    name = "never"

    def submit(self, fn, *args):
        return concurrent.futures.Future()

    def shutdown(self):
        pass


async def test_producer_that_never_connects_fails_within_the_deadline(relay, vllm):
    import time

    _, url = vllm
    b = backend(NeverRuns(), f"ws://127.0.0.1:{relay.port}", url, producer_connect=0.5)
    started = time.monotonic()
    with pytest.raises(BackendFailed, match="before the worker connected"):
        await collect(b.stream({"model": "m", "messages": MESSAGES}))
    assert time.monotonic() - started < 5


class Refuses(JobsOnly):
    """A control plane that is down: every submission raises (an endpoint that is offline)."""

    name = "down"

    def submit(self, fn, *args):
        raise ConnectionError("endpoint offline")

    def shutdown(self):
        pass


async def test_a_control_plane_that_refuses_the_job_is_a_backend_failure(relay, vllm):
    _, url = vllm
    b = backend(Refuses(), f"ws://127.0.0.1:{relay.port}", url)
    with pytest.raises(BackendFailed, match="refused the job: ConnectionError: endpoint offline"):
        await collect(b.stream({"model": "m", "messages": MESSAGES}))
    assert relay.health()["channels_opened"] == 0, "no channel is opened for a job never sent"
