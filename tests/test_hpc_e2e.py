"""The HPC tier end to end, with the `openai` SDK as the client:

gateway -> Parsl local engine -> worker process -> relay -> gateway -> client, the simulator as
the cluster's vLLM. Faults are caused for real: the relay process is killed, the worker process
is killed, the worker never gets to run, the client goes away.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from streamllm.config import Settings, SimModelSettings, SimSettings
from streamllm.gateway import create_app
from streamllm.hpc.worker import ping
from streamllm.serving import ServerThread
from streamllm.sim.app import Simulator
from streamllm.sim.content import answer_text
from tests.conftest import hpc_ready, start_relay

SECRET = "e2e-relay-secret-that-is-long-enough-0123456789"

CLUSTER_MODELS = {
    "m": SimModelSettings(answer_tokens=24),
    "slow": SimModelSettings(answer_tokens=60, tokens_per_s=80),
    "broken": SimModelSettings(error_rate=1.0),
    "stuck": SimModelSettings(answer_tokens=40, stall_after=3, stall_s=120),
    "sleepy": SimModelSettings(answer_tokens=8, ttft_ms=120_000),
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


def gateway_settings(
    tmp: Path, cluster_url: str, cloud_url: str, routing: dict | None = None, **hpc
) -> Settings:
    return Settings.model_validate({
        "server": {"detect_ollama": False, "data_dir": str(tmp)},
        "tiers": {
            "hpc": hpc_tier(cluster_url, **hpc),
            "cloud": {"kind": "vllm", "base_url": cloud_url, "models": ["cloud-m"]},
            "local": {"enabled": False},
        },
        # `auto` goes to the cluster first and falls back to the cloud before the first token.
        "routing": {"tier_for": {"LOW": "hpc", "MEDIUM": "hpc", "HIGH": "hpc"},
                    "fallback": {"LOW": ["cloud"], "MEDIUM": ["cloud"], "HIGH": ["cloud"]},
                    **(routing or {})},
    })


@pytest.fixture(scope="module")
def gateway(cluster, tmp_path_factory):
    _, cluster_url, cloud_url = cluster
    app = create_app(gateway_settings(tmp_path_factory.mktemp("gw"), cluster_url, cloud_url))
    with ServerThread(app) as server:
        hpc_ready(app)
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


def test_a_parsl_job_is_named_a_job_and_starts_one_task(gateway):
    """The dispatch header says how each request went, and finding that out starts nothing.
    It was read from the control plane's future, and a Parsl AppFuture answers any attribute it
    lacks with a new remote task: every request started a second task (which failed in Parsl's
    dataflow kernel) and the header read `<AppFuture at 0x... state=pending>`."""
    runtime, url = gateway
    plane = runtime.backends["hpc"].clusters[0].plane
    before = plane.tasks_started
    for n in range(3):
        messages = ask(f"how many nodes are free in partition {n}")
        raw = client(url).chat.completions.with_raw_response.create(
            model="hpc/m", messages=messages, stream=True
        )
        assert raw.headers["x-stream-dispatch"] == "job"
        assert read_stream(raw.parse())[0] == answer_text("m", messages, 24)
    assert plane.tasks_started - before == 3


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
    submitted = hpc_backend(runtime).submitter.submitted
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
    assert hpc_backend(runtime).submitter.submitted == submitted + 1
    assert len([r for r in list(vllm.log)[before:] if r.model == "slow"]) == 1, "one GPU job"


# -- faults, caused for real --------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_worker(cluster, tmp_path_factory):
    """A cluster with room for one job at a time, short deadlines, and fallback to the cloud
    even for an explicit hpc model (so a failure before the first token is visible)."""
    _, cluster_url, cloud_url = cluster
    settings = gateway_settings(
        tmp_path_factory.mktemp("one"), cluster_url, cloud_url,
        routing={"fallback_on_explicit": True},
        parsl={"max_workers": 1, "heartbeat_s": 1},
        deadlines={"producer_connect": 3, "first_token": 60, "between_tokens": 60, "total": 300},
    )
    app = create_app(settings)
    with ServerThread(app) as server:
        yield app.state.runtime, server.url


def worker_pid(runtime) -> int:
    """The pid of the only worker (it runs this no-op, so it is the one that runs the next job)."""
    return runtime.planes[0].submit(ping).result(timeout=120)["pid"]


def test_a_job_that_cannot_start_in_time_falls_back_within_the_deadline(one_worker):
    runtime, url = one_worker
    worker_pid(runtime)  # the worker is up, so only the queue can delay the next job
    c = client(url)
    busy = c.chat.completions.create(model="hpc/stuck", messages=ask("hog the node"),
                                     stream=True)
    next(iter(busy))  # the only worker is now streaming this one (and will stall)
    started = time.monotonic()
    messages = ask("a quick one")
    raw = c.chat.completions.with_raw_response.create(model="hpc/m", messages=messages,
                                                      stream=True)
    waited = time.monotonic() - started
    assert raw.headers["x-stream-tier"] == "cloud" and raw.headers["x-stream-fallbacks"] == "1"
    assert read_stream(raw.parse())[0] == answer_text("cloud-m", messages, 8)
    assert 3 <= waited < 20, "failed over at the producer-connect deadline (3 s)"
    busy.close()


def test_worker_killed_before_the_first_token_falls_back(one_worker, cluster):
    vllm, _, _ = cluster
    runtime, url = one_worker
    pid = worker_pid(runtime)
    before = len(vllm.log)
    messages = ask("the node will die before answering")
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(
            client(url).chat.completions.with_raw_response.create,
            model="hpc/sleepy", messages=messages, stream=True,
        )
        # The job is on the node (its backend request has arrived): now the node dies.
        assert vllm.wait_until(
            lambda log: any(r.model == "sleepy" for r in log[before:]), timeout=60
        )
        os.kill(pid, signal.SIGKILL)
        raw = pending.result(timeout=60)
    assert raw.headers["x-stream-tier"] == "cloud" and raw.headers["x-stream-fallbacks"] == "1"
    assert read_stream(raw.parse())[0] == answer_text("cloud-m", messages, 8)


def test_worker_killed_mid_stream_ends_the_stream_with_an_error(one_worker):
    runtime, url = one_worker
    pid = worker_pid(runtime)
    messages = ask("the node will die mid-answer")
    stream = client(url).chat.completions.create(model="hpc/stuck", messages=messages,
                                                stream=True)
    received = ""
    with pytest.raises(openai.APIError) as err:
        for chunk in stream:
            for c in chunk.choices:
                received += c.delta.content or ""
            if received and pid:
                os.kill(pid, signal.SIGKILL)
                pid = 0
    assert "control plane" in err.value.message
    assert received and answer_text("stuck", messages, 40).startswith(received)


def hpc_backend(runtime):
    """The single cluster's HPC backend behind the (federated) hpc tier."""
    return runtime.backends["hpc"].clusters[0].backend


def test_relay_process_killed_mid_stream_the_client_still_gets_every_token_once(
    cluster, tmp_path
):
    _, cluster_url, cloud_url = cluster
    secret = tmp_path / "relay.secret"
    secret.write_text(SECRET)
    relay, port = start_relay("--secret-file", str(secret))
    try:
        settings = gateway_settings(
            tmp_path, cluster_url, cloud_url, control_plane="local",
            relay_url=f"ws://127.0.0.1:{port}", relay_secret_file=str(secret),
        )
        app = create_app(settings)
        with ServerThread(app) as server:
            hpc_ready(app)
            messages = ask("stream this while the relay dies")
            raw = client(server.url).chat.completions.with_raw_response.create(
                model="hpc/slow", messages=messages, stream=True
            )
            assert raw.headers["x-stream-transport"] == "relay"
            text, finish, chunks = "", None, 0
            for chunk in raw.parse():
                for c in chunk.choices:
                    text += c.delta.content or ""
                    finish = c.finish_reason or finish
                chunks += 1
                if chunks == 5:
                    relay.kill()
            assert text == answer_text("slow", messages, 60) and finish == "stop"
            assert hpc_backend(app.state.runtime).healed == 1
    finally:
        relay.kill()
        relay.wait()


def test_batch_transport_answers_from_the_control_plane_result_alone(cluster, tmp_path):
    _vllm, cluster_url, cloud_url = cluster
    settings = gateway_settings(tmp_path, cluster_url, cloud_url, control_plane="local",
                                transport="batch")
    app = create_app(settings)
    assert app.state.runtime.relay is None
    with ServerThread(app) as server:
        hpc_ready(app)
        c = client(server.url)
        for stream in (True, False):
            messages = ask(f"no relay at this site (stream={stream})")
            raw = c.chat.completions.with_raw_response.create(
                model="hpc/m", messages=messages, stream=stream
            )
            assert raw.headers["x-stream-transport"] == "batch"
            if stream:
                text = read_stream(raw.parse())[0]
            else:
                text = raw.parse().choices[0].message.content
            assert text == answer_text("m", messages, 24)
        assert app.state.runtime.relay is None  # nothing was relayed: there is no relay


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that only this test trusts (as a campus CA would be)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "relay.pem", tmp_path / "relay.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))
    return cert_path, key_path


def test_relay_over_tls_with_the_secret_in_the_environment(cluster, tmp_path, monkeypatch):
    """The deployment in docs/hpc-as-api.md: `streamllm relay --tls-cert --tls-key`, wss:// on
    both sides, the campus CA given by SSL_CERT_FILE, the secret in STREAMLLM_RELAY_SECRET."""
    _, cluster_url, cloud_url = cluster
    cert, key = self_signed(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trusted by the gateway and the workers
    monkeypatch.setenv("STREAMLLM_RELAY_SECRET", SECRET)
    relay, port = start_relay("--tls-cert", str(cert), "--tls-key", str(key))
    try:
        settings = gateway_settings(tmp_path, cluster_url, cloud_url, control_plane="local",
                                    relay_url=f"wss://127.0.0.1:{port}")
        app = create_app(settings)
        with ServerThread(app) as server:
            hpc_ready(app)
            messages = ask("over TLS please")
            raw = client(server.url).chat.completions.with_raw_response.create(
                model="hpc/m", messages=messages, stream=True
            )
            assert raw.headers["x-stream-transport"] == "relay"
            assert read_stream(raw.parse())[0] == answer_text("m", messages, 24)
            backend = hpc_backend(app.state.runtime)
            assert backend.healed == 0 and backend.rejected == {}, (
                f"it really came by the relay, not: {backend.last_heal_reason}")
    finally:
        relay.kill()
        relay.wait()
