"""The HPC tier end to end, with the `openai` SDK as the client:

gateway -> Parsl local engine -> worker process -> relay -> gateway -> client, the simulator as
the cluster's vLLM. Faults are caused for real: the relay process is killed, the worker process
is killed, the worker never gets to run, the client goes away.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import openai
import pytest

from streamllm.config import Settings, SimModelSettings, SimSettings
from streamllm.gateway import create_app
from streamllm.serving import ServerThread
from streamllm.sim.app import Simulator
from streamllm.sim.content import answer_text
from tests.conftest import closed_port

STREAMLLM = str(Path(sys.executable).with_name("streamllm"))
SECRET = "e2e-relay-secret-that-is-long-enough-0123456789"

CLUSTER_MODELS = {
    "m": SimModelSettings(answer_tokens=24),
    "slow": SimModelSettings(answer_tokens=60, tokens_per_s=80),
    "broken": SimModelSettings(error_rate=1.0),
    "stuck": SimModelSettings(answer_tokens=40, stall_after=3, stall_s=120),
}


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def hpc_tier(cluster_url: str, **hpc) -> dict:
    return {
        "kind": "hpc",
        "base_url": cluster_url,
        "models": list(CLUSTER_MODELS),
        "hpc": {"control_plane": "parsl", "parsl": {"max_workers": 8}, **hpc},
    }


@pytest.fixture(scope="module")
def cluster():
    """The simulator playing the cluster's vLLM, and one playing the cloud (for fallback)."""
    vllm = Simulator(SimSettings(models=CLUSTER_MODELS))
    cloud = Simulator(SimSettings(models={"cloud-m": SimModelSettings(answer_tokens=8)}))
    with ServerThread(vllm.app) as v, ServerThread(cloud.app) as c:
        yield vllm, f"{v.url}/v1", f"{c.url}/v1"


def gateway_settings(tmp: Path, cluster_url: str, cloud_url: str, **hpc) -> Settings:
    return Settings.model_validate({
        "server": {"detect_ollama": False, "data_dir": str(tmp)},
        "tiers": {
            "hpc": hpc_tier(cluster_url, **hpc),
            "cloud": {"kind": "vllm", "base_url": cloud_url, "models": ["cloud-m"]},
            "local": {"enabled": False},
        },
        # `auto` goes to the cluster first and falls back to the cloud before the first token.
        "routing": {"tier_for": {"LOW": "hpc", "MEDIUM": "hpc", "HIGH": "hpc"},
                    "fallback": {"LOW": ["cloud"], "MEDIUM": ["cloud"], "HIGH": ["cloud"]}},
    })


@pytest.fixture(scope="module")
def gateway(cluster, tmp_path_factory):
    _, cluster_url, cloud_url = cluster
    app = create_app(gateway_settings(tmp_path_factory.mktemp("gw"), cluster_url, cloud_url))
    with ServerThread(app) as server:
        yield app.state.runtime, server.url


def client(url: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, **kw)


def read_stream(stream) -> tuple[str, str | None]:
    text, finish = "", None
    for chunk in stream:
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    return text, finish


def test_streams_through_parsl_and_the_relay(gateway):
    runtime, url = gateway
    messages = ask("summarise the scheduler logs")
    raw = client(url).chat.completions.with_raw_response.create(
        model="hpc/m", messages=messages, stream=True
    )
    assert raw.headers["x-stream-transport"] == "relay"
    assert raw.headers["x-stream-tier"] == "hpc"
    text, finish = read_stream(raw.parse())
    assert text == answer_text("m", messages, 24) and finish == "stop"
    assert runtime.relay.health()["frames_down"] >= 24  # it really went through the relay


def test_non_streaming_request_through_the_relay(gateway):
    _, url = gateway
    messages = ask("what is a partition")
    raw = client(url).chat.completions.with_raw_response.create(model="hpc/m", messages=messages)
    done = raw.parse()
    assert raw.headers["x-stream-transport"] == "relay"
    assert done.choices[0].message.content == answer_text("m", messages, 24)
    assert done.usage.completion_tokens == 24 and done.choices[0].finish_reason == "stop"


def test_fifty_concurrent_streams_each_get_exactly_their_own_text(gateway):
    _, url = gateway
    aclient = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                                 timeout=120)

    async def one(i: int) -> tuple[str, str]:
        messages = ask(f"question number {i} about job arrays")
        stream = await aclient.chat.completions.create(
            model="hpc/slow", messages=messages, stream=True
        )
        text = ""
        async for chunk in stream:
            for c in chunk.choices:
                text += c.delta.content or ""
        return text, answer_text("slow", messages, 60)

    async def all_of_them():
        try:
            return await asyncio.gather(*(one(i) for i in range(50)))
        finally:
            await aclient.close()

    results = asyncio.run(all_of_them())
    assert len(results) == 50
    for got, expected in results:
        assert got == expected


def test_client_cancel_reaches_the_cluster_backend(gateway, cluster):
    vllm, _, _ = cluster
    _, url = gateway
    before = len(vllm.log)
    messages = ask("a long answer I will not wait for")
    stream = client(url).chat.completions.create(model="hpc/slow", messages=messages,
                                                stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    # The cancel travels gateway -> relay -> worker, which closes its request to "vLLM".
    assert vllm.wait_until(
        lambda log: any(r.outcome == "cancelled" for r in log[before:]), timeout=30
    ), [r.outcome for r in list(vllm.log)[before:]]


def test_cluster_backend_error_reaches_the_client_as_an_error(gateway):
    _, url = gateway
    with pytest.raises(openai.InternalServerError) as err:  # tier_unavailable, saying why
        client(url).chat.completions.create(model="hpc/broken", messages=ask("x"), stream=True)
    assert err.value.status_code == 503 and "answered 500" in err.value.message


def test_a_retry_with_the_same_idempotency_key_joins_the_running_job(gateway, cluster):
    vllm, _, _ = cluster
    runtime, url = gateway
    messages = ask("an expensive question asked twice")
    before = len(vllm.log)
    submitted = runtime.backends["hpc"].submitter.submitted
    headers = {"Idempotency-Key": "retry-me-1"}

    async def both():
        c = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="u", max_retries=0)
        try:
            async def read():
                stream = await c.chat.completions.create(
                    model="hpc/slow", messages=messages, stream=True, extra_headers=headers
                )
                return "".join([c.delta.content or "" async for ch in stream
                                for c in ch.choices])
            return await asyncio.gather(read(), read())
        finally:
            await c.close()

    first, second = asyncio.run(both())
    expected = answer_text("slow", messages, 60)
    assert first == expected and second == expected
    assert runtime.backends["hpc"].submitter.submitted == submitted + 1
    assert len([r for r in list(vllm.log)[before:] if r.model == "slow"]) == 1, "one GPU job"
