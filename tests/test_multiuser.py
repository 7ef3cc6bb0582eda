"""The multi-user server through the `openai` SDK and the `streamllm keys` CLI, on SQLite and
on PostgreSQL: keys, limits, budgets, revocation, the usage ledger, metrics, capacity."""

from __future__ import annotations

import asyncio
import json
import subprocess

import httpx2 as httpx
import openai
import pytest

from streamllm.sim.content import answer_text
from tests.conftest import tier_config
from tests.test_cli import STREAMLLM, clean_env

HELLO = [{"role": "user", "content": "hello, how are you today"}]
HARD = [{"role": "user", "content": "Design a fault-tolerant checkpointing scheme for our "
         "2000-node MPI code, weighing I/O cost against lost work, and justify it."}]


def keys_cli(config, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([STREAMLLM, "keys", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=60, env=clean_env(), check=False)


@pytest.fixture
def server(database_url, start_sim, start_gateway, tmp_path):
    """Three simulated tiers behind a gateway whose store is `database_url`; keys are made
    with the real CLI against the same database."""
    sims = {t: start_sim({f"{t}-m": {"answer_tokens": 16}}) for t in ("local", "hpc", "cloud")}
    config = tmp_path / "stream.yaml"
    settings = {
        "server": {"database_url": database_url, "key_cache_s": 0, "data_dir": str(tmp_path)},
        "tiers": {t: tier_config(s.url, f"{t}-m", prices={"*": {"output_per_mtok": 1e6 / 16}}
                                 if t == "cloud" else {}) for t, s in sims.items()},
    }
    config.write_text(json.dumps(settings))

    class Server:
        def __init__(self):
            self.sims, self.config, self.gateway = sims, config, None

        def start(self, **server):
            merged = {**settings, "server": {**settings["server"], **server}}
            self.gateway = start_gateway(merged)
            return self

        def key(self, *args: str) -> str:
            made = keys_cli(config, "create", *args)
            assert made.returncode == 0, made.stderr
            return made.stdout.strip()

        def sdk(self, key: str) -> openai.OpenAI:
            return openai.OpenAI(base_url=self.gateway.v1, api_key=key, max_retries=0)

        def get(self, path: str, key: str) -> httpx.Response:
            return httpx.get(f"{self.gateway.url}{path}", timeout=10,
                             headers={"authorization": f"Bearer {key}"})

    return Server()


def test_keys_are_made_listed_used_and_revoked(server):
    key = server.key("--name", "alice")
    assert key.startswith("sk-stream-") and len(key) > 40
    listed = keys_cli(server.config, "list", "--json")
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [r["name"] for r in rows] == ["alice"]
    assert key not in listed.stdout and rows[0]["prefix"].endswith("…")
    server.start()
    reply = server.sdk(key).chat.completions.create(model="local", messages=HELLO)
    assert reply.choices[0].message.content == answer_text("local-m", HELLO, 16)
    for bad in ("sk-stream-not-a-real-key", "unused"):
        with pytest.raises(openai.AuthenticationError):
            server.sdk(bad).chat.completions.create(model="local", messages=HELLO)
    revoked = keys_cli(server.config, "revoke", "alice")
    assert revoked.returncode == 0 and "revoked 1" in revoked.stdout
    with pytest.raises(openai.AuthenticationError):
        server.sdk(key).chat.completions.create(model="local", messages=HELLO)
    assert len(server.sims["local"].sim.log) == 1


def test_a_keys_rate_limit_answers_429_with_retry_after(server):
    key = server.key("--name", "bob", "--rpm", "2")
    server.start()
    client = server.sdk(key)
    for _ in range(2):
        client.chat.completions.create(model="local", messages=HELLO)
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model="local", messages=HELLO)
    assert err.value.body["code"] == "rate_limit_exceeded"
    assert 1 <= int(err.value.response.headers["retry-after"]) <= 60
    assert len(server.sims["local"].sim.log) == 2


def test_a_keys_concurrency_limit_holds_while_a_stream_runs(server):
    server.sims["hpc"].model("hpc-m").tokens_per_s = 20  # a stream that takes a while
    key = server.key("--name", "carol", "--concurrency", "1")
    server.start()
    client = server.sdk(key)
    stream = client.chat.completions.create(model="hpc", messages=HELLO, stream=True)
    first = next(iter(stream))  # the first stream is now in progress
    assert first
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="local", messages=HELLO)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    # Finished: the slot is free again.
    client.chat.completions.create(model="local", messages=HELLO)


def test_allowed_tiers_and_the_monthly_budget(server):
    key = server.key("--name", "dana", "--allow-tiers", "local,hpc")
    rich = server.key("--name", "erin", "--budget-usd", "1.5")
    server.start()
    with pytest.raises(openai.PermissionDeniedError) as err:
        server.sdk(key).chat.completions.create(model="cloud", messages=HELLO)
    assert err.value.body["code"] == "tier_not_allowed"
    raw = server.sdk(key).chat.completions.with_raw_response.create(model="auto", messages=HARD)
    assert raw.headers["x-stream-tier"] == "hpc"
    # Each cloud answer costs $1 (16 tokens at this price); the reservation is the same.
    server.sdk(rich).chat.completions.create(model="cloud", messages=HELLO, max_tokens=16)
    with pytest.raises(openai.RateLimitError) as err:
        server.sdk(rich).chat.completions.create(model="cloud", messages=HELLO, max_tokens=16)
    assert err.value.body["code"] == "insufficient_quota"
    assert len(server.sims["cloud"].sim.log) == 1, "the refused request reached no backend"


def test_the_ledger_holds_exactly_what_the_backends_reported(server):
    key = server.key("--name", "frank")
    admin = server.key("--name", "root", "--admin")
    server.start()
    client = server.sdk(key)
    reported = {"prompt": 0, "completion": 0}
    for model, stream in (("local", False), ("hpc", True), ("cloud", False), ("local", True)):
        if stream:
            chunks = list(client.chat.completions.create(
                model=model, messages=HELLO, stream=True,
                stream_options={"include_usage": True}))
            usage = chunks[-1].usage
        else:
            usage = client.chat.completions.create(model=model, messages=HELLO).usage
        reported["prompt"] += usage.prompt_tokens
        reported["completion"] += usage.completion_tokens
    # A stream without usage requested: the gateway asked the backend for it anyway.
    raw = client.chat.completions.with_raw_response.create(model="hpc", messages=HELLO,
                                                           stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    last = server.get(f"/v1/usage/requests/{raw.headers['x-request-id']}", key).json()
    assert last["completion_tokens"] == 16 and last["outcome"] == "completed"
    assert last["tier"] == "hpc" and last["route_reason"] == "explicit"
    assert last["ttft_ms"] > 0 and "prompt_text" not in last
    reported["prompt"] += last["prompt_tokens"]
    reported["completion"] += 16

    mine = server.get("/v1/usage?days=1", key).json()
    assert mine["totals"]["requests"] == 5
    assert mine["totals"]["prompt_tokens"] == reported["prompt"]
    assert mine["totals"]["completion_tokens"] == reported["completion"]
    assert mine["per_tier"]["cloud"]["cost_usd"] == pytest.approx(1.0)
    assert mine["per_day"][-1]["per_tier"] == {"local": 2, "hpc": 2, "cloud": 1}
    forbidden = server.get("/v1/usage/all", key)
    assert forbidden.status_code == 403
    everyone = server.get("/v1/usage/all", admin).json()
    assert [c["caller"] for c in everyone["callers"]] == ["frank"]
    other = server.get(f"/v1/usage/requests/{raw.headers['x-request-id']}", admin)
    assert other.status_code == 404, "a request is visible to its own caller only"


def test_a_cancelled_stream_is_recorded_as_cancelled(server):
    server.sims["local"].model("local-m").tokens_per_s = 10
    server.sims["local"].model("local-m").answer_tokens = 200
    key = server.key("--name", "gina")
    server.start()
    with httpx.stream("POST", f"{server.gateway.v1}/chat/completions", timeout=30,
                      headers={"authorization": f"Bearer {key}"},
                      json={"model": "local", "messages": HELLO, "stream": True}) as resp:
        request_id = resp.headers["x-request-id"]
        next(resp.iter_lines())
    assert server.sims["local"].sim.wait_until(
        lambda log: log and log[0].outcome == "cancelled", timeout=10)

    def recorded() -> dict | None:
        got = server.get(f"/v1/usage/requests/{request_id}", key)
        return got.json() if got.status_code == 200 else None

    row = recorded()
    assert row is not None and row["outcome"] == "cancelled"
    # No usage came back from a stream cut short: what was sent is counted instead.
    assert row["prompt_tokens"] > 0 and row["completion_tokens"] >= 1


def test_prompts_are_kept_only_when_configured(server, database_url):
    key = server.key("--name", "hank")
    server.start(log_prompts=True)
    server.sdk(key).chat.completions.create(model="local", messages=HELLO)

    async def texts() -> list:
        from sqlalchemy import select

        from streamllm.store import Store
        from streamllm.store.tables import usage

        store = await Store.open(database_url)
        try:
            async with store.engine.connect() as c:
                return list(await c.execute(select(usage.c.prompt_text, usage.c.answer_text)))
        finally:
            await store.close()

    # The ledger writer batches rows; flush them, as the gateway does on shutdown.
    asyncio.run_coroutine_threadsafe(server.gateway.app.state.runtime.accounts.flush(),
                                     server.gateway.server.loop).result(10)
    rows = asyncio.run(texts())
    assert rows == [(HELLO[0]["content"], answer_text("local-m", HELLO, 16))]


def test_metrics_count_requests_tokens_and_latency(server):
    key = server.key("--name", "ivy")
    server.start()
    client = server.sdk(key)
    for _ in range(3):
        list(client.chat.completions.create(model="local", messages=HELLO, stream=True))
    text = httpx.get(f"{server.gateway.url}/metrics", timeout=10).text
    assert 'stream_requests_total{outcome="completed",tier="local"} 3.0' in text
    assert 'stream_time_to_first_token_seconds_count{tier="local"} 3.0' in text
    assert 'stream_tokens_total{direction="completion",tier="local"} 48.0' in text
    assert "stream_inflight_requests 0.0" in text
    assert HELLO[0]["content"] not in text and key not in text


def test_two_hundred_concurrent_streams_with_keys_and_the_ledger(server):
    for sim in server.sims.values():
        for spec in sim.sim.settings.models.values():
            spec.tokens_per_s = 40
    key = server.key("--name", "load")
    server.start()

    async def one(client: httpx.AsyncClient, i: int) -> str:
        messages = [{"role": "user", "content": f"question number {i}"}]
        parts = []
        async with client.stream("POST", "/v1/chat/completions", json={
                "model": "local", "messages": messages, "stream": True}) as resp:
            assert resp.status_code == 200, await resp.aread()
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    for choice in json.loads(line[6:])["choices"]:
                        parts.append(choice["delta"].get("content") or "")
        assert "".join(parts) == answer_text("local-m", messages, 16), i
        return "ok"

    async def run() -> list[str]:
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=250)
        async with httpx.AsyncClient(base_url=server.gateway.url, timeout=120, limits=limits,
                                     headers={"authorization": f"Bearer {key}"}) as client:
            return await asyncio.gather(*(one(client, i) for i in range(200)))

    assert asyncio.run(run()) == ["ok"] * 200
    usage = server.get("/v1/usage?days=1", key).json()
    assert usage["totals"]["requests"] == 200
    assert usage["totals"]["completion_tokens"] == 200 * 16


def test_serving_beyond_loopback_needs_a_key_and_starts_with_a_stored_one(server, tmp_path):
    from tests.test_cli import Running

    refused = subprocess.run(
        [STREAMLLM, "serve", "--host", "0.0.0.0", "--port", "0", "--config",
         str(server.config)], capture_output=True, text=True, timeout=60, env=clean_env(), check=False)
    assert refused.returncode == 2 and "keys create" in refused.stderr
    server.key("--name", "ops")
    running = Running(["serve", "--host", "0.0.0.0", "--port", "0", "--config",
                       str(server.config)], clean_env(), "Uvicorn running on")
    assert "refusing" not in running.stop()


def test_institutional_login_by_token_introspection(start_sim, start_gateway, monkeypatch):
    import time

    from streamllm.serving import ServerThread
    from tests.test_introspection import CLIENT_ID, CLIENT_SECRET, double_app

    answers: dict = {}
    seen: list = []
    hits: list = []
    idp = ServerThread(double_app(answers, seen, hits)).start()
    try:
        sim = start_sim({"m": {"answer_tokens": 4}})
        monkeypatch.setenv("STREAM_TEST_OAUTH_SECRET", CLIENT_SECRET)
        gateway = start_gateway({
            "server": {"oauth": {
                "introspection_url": f"{idp.url}/v2/oauth2/token/introspect",
                "client_id": CLIENT_ID, "client_secret_env": "STREAM_TEST_OAUTH_SECRET",
                "allowed_domains": ["uchicago.edu"], "allow_cloud": False}},
            "tiers": {"local": tier_config(sim.url, "m"), "hpc": {"enabled": False},
                      "cloud": {"enabled": False}}})
        good, outsider = "globus-token-of-alice-0001", "globus-token-of-mallory-01"
        answers[good] = {"active": True, "username": "alice@uchicago.edu",
                         "exp": int(time.time()) + 3600, "sub": "a1"}
        answers[outsider] = {"active": True, "username": "mallory@example.com",
                             "exp": int(time.time()) + 3600, "sub": "m1"}

        def client(token: str) -> openai.OpenAI:
            return openai.OpenAI(base_url=gateway.v1, api_key=token, max_retries=0)

        reply = client(good).chat.completions.create(model="local", messages=HELLO)
        assert reply.choices[0].message.content
        client(good).chat.completions.create(model="local", messages=HELLO)
        assert len(hits) == 1, "the second request was answered from the cache"
        for token in (outsider, "not-a-token-at-all"):
            with pytest.raises(openai.AuthenticationError):
                client(token).chat.completions.create(model="local", messages=HELLO)
        usage = httpx.get(f"{gateway.v1}/usage", timeout=10,
                          headers={"authorization": f"Bearer {good}"}).json()
        assert usage["key"] == "oauth:alice@uchicago.edu" and usage["totals"]["requests"] == 2
    finally:
        idp.stop()
    # The identity provider is gone: a new token cannot be checked, which is a 503, not a 401.
    with pytest.raises(openai.InternalServerError) as err:
        client("globus-token-new-0002").chat.completions.create(model="local", messages=HELLO)
    assert err.value.status_code == 503


def test_revoking_every_key_does_not_open_the_server(server):
    key = server.key("--name", "last")
    server.start()
    server.sdk(key).chat.completions.create(model="local", messages=HELLO)
    assert keys_cli(server.config, "revoke", "last").returncode == 0
    for bad in (key, "unused"):
        with pytest.raises(openai.AuthenticationError):
            server.sdk(bad).chat.completions.create(model="local", messages=HELLO)
