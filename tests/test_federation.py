"""Several simulated clusters behind one gateway: placement by model, failover, load spreading,
warm agents (replacement at walltime, scaling, reconnection after a lost connection) and cold
starts made visible.

Each cluster has its own control plane (separate Parsl engines, or a process pool), its own
in-process relay and its own simulator standing in for its vLLM, with different models and
speeds. Everything is driven with the `openai` SDK.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import openai
import pytest

from streamllm.config import Settings
from streamllm.gateway import create_app
from streamllm.hpc.control import JobsOnly
from streamllm.serving import ServerThread
from streamllm.sim.content import answer_text
from tests.conftest import until


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def stream_text(url: str, model: str, messages) -> tuple[str, dict]:
    raw = client(url).chat.completions.with_raw_response.create(
        model=model, messages=messages, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    return text, dict(raw.headers)


def on_loop(server, coro, timeout: float = 30.0):
    return asyncio.run_coroutine_threadsafe(coro, server.loop).result(timeout)


class Gateway:
    def __init__(self, app, server):
        self.app, self.server = app, server
        self.url = server.url

    @property
    def runtime(self):
        return self.app.state.runtime

    def cluster(self, name: str):
        return next(c for c in self.runtime.backends["hpc"].clusters if c.name == name)


def start(clusters: dict, tmp, **extra) -> tuple[Gateway, ServerThread]:
    settings = Settings.model_validate({
        "server": {"detect_ollama": False, "data_dir": str(tmp)},
        "tiers": {"hpc": {"kind": "hpc", "clusters": clusters}, **extra.pop("tiers", {})},
        **extra,
    })
    app = create_app(settings)
    server = ServerThread(app).start(timeout=120)
    return Gateway(app, server), server


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """alpha (Parsl): llama-70b and mistral-7b; beta (another Parsl engine): llama-70b,
    slower; gamma (a process pool): qwen-32b."""
    from streamllm.config import SimModelSettings, SimSettings
    from streamllm.sim.app import Simulator

    sims = {
        "alpha": Simulator(SimSettings(models={
            "llama-70b": SimModelSettings(answer_tokens=20, tokens_per_s=100),
            "mistral-7b": SimModelSettings(answer_tokens=12)})),
        "beta": Simulator(SimSettings(models={
            "llama-70b": SimModelSettings(answer_tokens=20, tokens_per_s=50)})),
        "gamma": Simulator(SimSettings(models={
            "qwen-32b": SimModelSettings(answer_tokens=16)})),
    }
    servers = {n: ServerThread(s.app).start() for n, s in sims.items()}
    planes = {"alpha": {"control_plane": "parsl", "parsl": {"max_workers": 8}},
              "beta": {"control_plane": "parsl", "parsl": {"max_workers": 8}},
              "gamma": {"control_plane": "local", "local_workers": 4}}
    clusters = {n: {"base_url": f"{servers[n].url}/v1", "models": list(sims[n].settings.models),
                    **planes[n]} for n in sims}
    gw, server = start(clusters, tmp_path_factory.mktemp("fed"))
    until(lambda: all(c.state() == "ready" for c in gw.runtime.backends["hpc"].clusters), 120,
          "every cluster to be ready")
    yield gw, sims
    server.stop()
    for s in servers.values():
        s.stop()


def test_models_are_listed_once_with_the_clusters_behind_them(federation):
    gw, _ = federation
    models = httpx.get(f"{gw.url}/v1/models", timeout=10).json()["data"]
    ids = [m["id"] for m in models if m["id"].startswith("hpc/")]
    assert sorted(ids) == ["hpc/llama-70b", "hpc/mistral-7b", "hpc/qwen-32b"]
    llama = httpx.get(f"{gw.url}/v1/models/hpc/llama-70b", timeout=10).json()
    assert llama["state"] == "ready"
    assert sorted(e["name"] for e in llama["endpoints"]) == ["alpha", "beta"]
    assert all(e["state"] == "ready" for e in llama["endpoints"])


@pytest.mark.parametrize("model, cluster", [("qwen-32b", "gamma"), ("mistral-7b", "alpha")])
def test_a_request_goes_to_a_cluster_that_serves_its_model(federation, model, cluster):
    gw, sims = federation
    messages = ask(f"which cluster serves {model}?")
    text, headers = stream_text(gw.url, f"hpc/{model}", messages)
    assert headers["x-stream-cluster"] == cluster
    assert headers["x-stream-transport"] == "relay"
    assert text == answer_text(model, messages, sims[cluster].settings.models[model]
                               .answer_tokens)


def test_fifty_concurrent_streams_spread_over_both_clusters(federation):
    gw, sims = federation
    before = {n: len(sims[n].requests_for("llama-70b")) for n in ("alpha", "beta")}

    def one(i: int) -> str:
        messages = ask(f"stream number {i}")
        text, headers = stream_text(gw.url, "hpc/llama-70b", messages)
        assert text == answer_text("llama-70b", messages, 20), i
        return headers["x-stream-cluster"]

    with ThreadPoolExecutor(50) as pool:
        served = list(pool.map(one, range(50)))
    counts = {n: served.count(n) for n in ("alpha", "beta")}
    assert counts["alpha"] + counts["beta"] == 50
    assert min(counts.values()) >= 10, counts
    after = {n: len(sims[n].requests_for("llama-70b")) - before[n] for n in ("alpha", "beta")}
    assert after == counts, "each stream reached exactly one cluster's backend"


def batch_file(lines: list[dict]) -> bytes:
    return "\n".join(json.dumps(line) for line in lines).encode()


def chat_lines(model: str, prefix: str, text: str, count: int) -> list[dict]:
    """`count` batch lines `<prefix><i>` asking `<text> <i>` of `model`."""
    return [{"custom_id": f"{prefix}{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": model, "messages": ask(f"{text} {i}")}} for i in range(count)]


def start_batch(sdk: openai.OpenAI, lines: list[dict]):
    upload = sdk.files.create(file=("in.jsonl", batch_file(lines)), purpose="batch")
    return sdk.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                              completion_window="24h")


def file_lines(sdk: openai.OpenAI, file_id: str) -> list[dict]:
    return [json.loads(x) for x in sdk.files.content(file_id).text.splitlines()]


def wait_batch(sdk: openai.OpenAI, batch_id: str, timeout: float = 180):
    batch = sdk.batches.retrieve(batch_id)
    deadline = time.monotonic() + timeout
    while batch.status not in ("completed", "failed", "cancelled", "expired"):
        assert time.monotonic() < deadline, f"batch still {batch.status}"
        time.sleep(0.1)
        batch = sdk.batches.retrieve(batch_id)
    return batch


def assert_every_line_answered(sdk: openai.OpenAI, batch, prefix: str, text: str, count: int,
                               tokens: int, model: str = "m") -> None:
    """The batch completed with each of its `count` lines (from `chat_lines`) in the output
    once, with the answer the model gives it."""
    assert batch.status == "completed" and batch.request_counts.completed == count
    out = file_lines(sdk, batch.output_file_id)
    assert sorted(r["custom_id"] for r in out) == sorted(f"{prefix}{i}" for i in range(count))
    for r in out:
        assert r["response"]["body"]["choices"][0]["message"]["content"] == answer_text(
            model, ask(f"{text} {r['custom_id'].removeprefix(prefix)}"), tokens)


def test_a_batch_of_a_thousand_lines_is_split_across_clusters(federation):
    gw, sims = federation
    sdk = client(gw.url)
    lines = chat_lines("hpc/llama-70b", "q", "batch question", 1000)
    # Per-line errors: a body the cluster's vLLM rejects, and an invalid chat request.
    lines.append({"custom_id": "bad-model", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": "hpc/llama-70b", "messages": ask("x"), "n": 0}})
    runner = gw.runtime.batch_runners["hpc"]
    placed_before = dict(runner.placed)
    before = {n: len(sims[n].requests_for("llama-70b")) for n in ("alpha", "beta")}
    batch = wait_batch(sdk, start_batch(sdk, lines).id)
    assert batch.status == "completed"
    assert (batch.request_counts.total, batch.request_counts.completed,
            batch.request_counts.failed) == (1001, 1000, 1)
    out = file_lines(sdk, batch.output_file_id)
    assert sorted(r["custom_id"] for r in out) == sorted(f"q{i}" for i in range(1000))
    for r in out:
        i = int(r["custom_id"][1:])
        body = r["response"]["body"]
        assert body["choices"][0]["message"]["content"] == answer_text(
            "llama-70b", ask(f"batch question {i}"), 20)
    errors = file_lines(sdk, batch.error_file_id)
    assert [e["custom_id"] for e in errors] == ["bad-model"]
    placed = {n: runner.placed.get(n, 0) - placed_before.get(n, 0) for n in ("alpha", "beta")}
    assert placed["alpha"] > 0 and placed["beta"] > 0, placed
    ran = {n: len(sims[n].requests_for("llama-70b")) - before[n] for n in ("alpha", "beta")}
    assert sum(ran.values()) == 1000, "every line ran once, on one cluster"


def test_a_batch_on_the_clusters_can_be_cancelled(federation):
    gw, sims = federation
    sdk = client(gw.url)
    for sim in (sims["alpha"], sims["beta"]):
        sim.settings.models["llama-70b"].tokens_per_s = 4  # five seconds a line
    try:
        batch = start_batch(sdk, chat_lines("hpc/llama-70b", "c", "slow", 300))
        until(lambda: any(r.outcome == "running" for s in (sims["alpha"], sims["beta"])
                          for r in s.requests_for("llama-70b")), 60, "lines to be running")
        sdk.batches.cancel(batch.id)
        batch = wait_batch(sdk, batch.id)
        assert batch.status == "cancelled"
        assert batch.request_counts.completed < 300
        # The backend requests in flight were aborted, and nothing new started.
        until(lambda: all(r.outcome != "running" for s in (sims["alpha"], sims["beta"])
                          for r in s.requests_for("llama-70b")), 30, "requests to end")
        aborted = [r for s in (sims["alpha"], sims["beta"]) for r in s.requests_for("llama-70b")
                   if r.body["messages"][0]["content"].startswith("slow")
                   and r.outcome == "cancelled"]
        assert aborted, "the lines running at cancel time were aborted on the backend"
        count = sum(1 for s in (sims["alpha"], sims["beta"]) for r in s.requests_for("llama-70b")
                    if r.body["messages"][0]["content"].startswith("slow"))
        assert count < 300
    finally:
        for sim in (sims["alpha"], sims["beta"]):
            sim.settings.models["llama-70b"].tokens_per_s = 50


def test_a_retry_with_the_same_idempotency_key_joins_the_job_on_the_same_cluster(federation):
    """Two clusters serve the model and the first try keeps one busy: the retry, sent while
    the first is still running, still goes to that cluster and joins its job."""
    gw, sims = federation
    messages = ask("one expensive question, retried across the federation")

    async def both():
        c = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="u", max_retries=0)
        try:
            async def read():
                raw = await c.chat.completions.with_raw_response.create(
                    model="hpc/llama-70b", messages=messages, stream=True,
                    extra_headers={"Idempotency-Key": "fed-retry-1"})
                text = "".join([x.delta.content or "" async for ch in raw.parse()
                                for x in ch.choices])
                return text, raw.headers["x-stream-cluster"]
            return await asyncio.gather(read(), read())
        finally:
            await c.close()

    (first, at_first), (second, at_second) = asyncio.run(both())
    expected = answer_text("llama-70b", messages, 20)
    assert first == expected and second == expected
    assert at_first == at_second
    ran = [r for n in ("alpha", "beta") for r in sims[n].requests_for("llama-70b")
           if r.body["messages"] == messages]
    assert len(ran) == 1, "one job on one cluster"


def test_a_cluster_whose_relay_dies_is_avoided(federation):
    # Last in this module: alpha stays without its relay.
    gw, _sims = federation
    alpha = gw.cluster("alpha")
    on_loop(gw.server, alpha.relay.stop())
    on_loop(gw.server, gw.runtime.probe_all())
    assert alpha.state() == "offline"
    llama = httpx.get(f"{gw.url}/v1/models/hpc/llama-70b", timeout=10).json()
    states = {e["name"]: e["state"] for e in llama["endpoints"]}
    assert states == {"alpha": "offline", "beta": "ready"}
    for i in range(5):
        messages = ask(f"after the relay died {i}")
        text, headers = stream_text(gw.url, "hpc/llama-70b", messages)
        assert headers["x-stream-cluster"] == "beta"
        assert text == answer_text("llama-70b", messages, 20)


def test_a_chunk_whose_relay_dies_brings_its_results_back_in_the_job_result(tmp_path):
    """The relay of the cluster running a chunk is stopped midway. The job goes on; the lines
    it answers after that come back in the control plane's result instead of being run again,
    and only the few whose frames were in flight when the relay went run once more."""
    from streamllm.config import SimModelSettings, SimSettings
    from streamllm.sim.app import Simulator

    sims = {n: Simulator(SimSettings(models={
        "m": SimModelSettings(answer_tokens=6, tokens_per_s=24)})) for n in ("a", "b")}
    servers = {n: ServerThread(s.app).start() for n, s in sims.items()}
    gw, server = start({n: {"base_url": f"{servers[n].url}/v1", "models": ["m"],
                            "control_plane": "local", "local_workers": 2} for n in sims},
                       tmp_path)
    try:
        until(lambda: all(c.state() == "ready" for c in gw.runtime.backends["hpc"].clusters),
              60, "both clusters to be ready")
        sdk = client(gw.url)
        batch = start_batch(sdk, chat_lines("hpc/m", "r", "relay line", 48))  # one chunk

        def answered(name: str) -> int:
            return sum(r.outcome == "completed" for r in sims[name].requests_for("m"))

        until(lambda: max(answered("a"), answered("b")) >= 8, 60, "some lines answered")
        victim = "a" if answered("a") >= 8 else "b"
        on_loop(gw.server, gw.cluster(victim).relay.stop())
        at_kill = answered(victim)
        batch = wait_batch(sdk, batch.id)
        assert_every_line_answered(sdk, batch, "r", "relay line", 48, tokens=6)
        # Most of the chunk was answered on the victim after its relay had gone ...
        assert answered(victim) - at_kill >= 48 - at_kill - 8
        # ... and was not run again: at most the lines in flight (8 at once) ran twice.
        ran = sum(len(sim.requests_for("m")) for sim in sims.values())
        assert ran <= 48 + 8, ran
    finally:
        server.stop()
        for s in servers.values():
            s.stop()


# -- warm agents ----------------------------------------------------------------------------


@contextlib.contextmanager
def agent_gateway(tmp, plane: dict, agents: dict, sim_spec: dict, **extra):
    """A gateway with one cluster `a` (model `m` on a simulator of its own) and warm agents,
    once its first agent is ready: (gateway, simulator, agent pool, that agent)."""
    from streamllm.config import SimModelSettings, SimSettings
    from streamllm.sim.app import Simulator

    sim = Simulator(SimSettings(models={"m": SimModelSettings(**sim_spec)}))
    sim_server = ServerThread(sim.app).start()
    gw, server = start({"a": {"base_url": f"{sim_server.url}/v1", "models": ["m"], **plane,
                              "agents": {"heartbeat_s": 1, **agents}}}, tmp, **extra)
    try:
        pool = gw.cluster("a").pool
        until(lambda: pool.ready() and pool.ready()[0].pid, 120, "a warm agent")
        yield gw, sim, pool, pool.ready()[0]
    finally:
        server.stop()
        sim_server.stop()


def test_streams_go_to_a_warm_agent_and_survive_its_replacement(tmp_path):
    with agent_gateway(
        tmp_path, {"control_plane": "local", "local_workers": 6},
        {"min_warm": 1, "max": 2, "max_concurrency": 4, "walltime_s": 8, "replace_before_s": 5},
        {"answer_tokens": 30, "tokens_per_s": 30}) as (gw, _sim, pool, first):
        results = []

        def one(i: int) -> tuple[str, str]:
            messages = ask(f"through the agent {i}")
            text, headers = stream_text(gw.url, "hpc/m", messages)
            assert text == answer_text("m", messages, 30), i
            return headers["x-stream-dispatch"], headers["x-stream-transport"]

        # Streams of about a second each, four at a time, for as long as it takes the first
        # agent to be replaced (at 3 s of its 8 s walltime) and retire.
        with ThreadPoolExecutor(4) as workers:
            while first.phase != "gone" and len(results) < 200:
                results += list(workers.map(one, range(len(results), len(results) + 4)))
        assert first.phase == "gone" and pool.launched >= 2
        assert ("agent", "relay") in results
        assert all(r[1] == "relay" for r in results)
        # Every stream arrived whole (checked in `one`), none was cut by the replacement.
        assert first.served > 0


def test_a_batch_runs_its_chunks_on_a_warm_agent(tmp_path):
    """With an agent ready, a batch's chunks go to it (no job each), and every line comes
    back once through the chunk's relay channel."""
    with agent_gateway(
        tmp_path, {"control_plane": "local", "local_workers": 2},
        {"min_warm": 1, "max": 1, "max_concurrency": 8},
        {"answer_tokens": 9}) as (gw, sim, _pool, agent):
        sdk = client(gw.url)
        batch = wait_batch(sdk, start_batch(sdk, chat_lines("hpc/m", "a", "agent line", 120)).id)
        assert_every_line_answered(sdk, batch, "a", "agent line", 120, tokens=9)
        assert agent.served == 3  # 120 lines in chunks of 50: three chunks, all on the agent
        assert len(sim.requests_for("m")) == 120


def test_cancelling_a_batch_aborts_its_lines_on_the_agent_and_keeps_the_agent(tmp_path):
    with agent_gateway(
        tmp_path, {"control_plane": "local", "local_workers": 2},
        {"min_warm": 1, "max": 1, "max_concurrency": 8},
        {"answer_tokens": 20, "tokens_per_s": 4},  # five seconds a line
    ) as (gw, sim, pool, agent):
        sdk = client(gw.url)
        batch = start_batch(sdk, chat_lines("hpc/m", "x", "cancelled line", 100))
        until(lambda: any(r.outcome == "running" for r in sim.requests_for("m")), 60,
              "lines to be running on the agent")
        sdk.batches.cancel(batch.id)
        batch = wait_batch(sdk, batch.id)
        assert batch.status == "cancelled" and batch.request_counts.completed < 100
        until(lambda: all(r.outcome != "running" for r in sim.requests_for("m")), 30,
              "the lines in flight to be aborted")
        assert any(r.outcome == "cancelled" for r in sim.requests_for("m"))
        assert len(sim.requests_for("m")) < 100, "lines not started were not started"
        # The agent is the same one, still ready, and goes on serving.
        assert pool.ready() == [agent] and agent.served >= 1
        sim.settings.models["m"].tokens_per_s = 200
        messages = ask("after the cancel")
        text, headers = stream_text(gw.url, "hpc/m", messages)
        assert text == answer_text("m", messages, 20)
        assert headers["x-stream-dispatch"] == "agent" and pool.launched == 1


def test_a_batch_chunk_on_an_agent_killed_midway_is_finished_elsewhere(tmp_path):
    """The agent running a chunk is killed: the lines it had answered are kept, the others run
    once more (as jobs, or on its successor), and every line is in the output once."""
    with agent_gateway(
        tmp_path, {"control_plane": "local", "local_workers": 3},
        {"min_warm": 1, "max": 1, "max_concurrency": 8},
        {"answer_tokens": 6, "tokens_per_s": 12},  # half a second a line
    ) as (gw, sim, _pool, victim):
        sdk = client(gw.url)
        batch = start_batch(sdk, chat_lines("hpc/m", "k", "killed line", 40))
        until(lambda: sum(r.outcome == "completed" for r in sim.requests_for("m")) >= 8, 60,
              "the agent to answer some lines")
        os.kill(victim.pid, signal.SIGKILL)
        batch = wait_batch(sdk, batch.id)
        assert_every_line_answered(sdk, batch, "k", "killed line", 40, tokens=6)
        assert victim.phase == "gone"
        # Lines answered before the kill were not run again: only those cut off (at most the
        # chunk's 8 lines at once) ran twice.
        assert len(sim.requests_for("m")) <= 40 + 8


def test_agents_scale_up_under_a_burst_and_down_when_idle(tmp_path):
    with agent_gateway(
        tmp_path, {"control_plane": "local", "local_workers": 8},
        {"min_warm": 1, "max": 3, "max_concurrency": 2, "idle_timeout_s": 1,
         "walltime_s": 600, "replace_before_s": 60},
        {"answer_tokens": 40, "tokens_per_s": 20}) as (gw, _sim, pool, _):

        def one(i: int) -> str:
            messages = ask(f"burst {i}")
            text, headers = stream_text(gw.url, "hpc/m", messages)
            assert text == answer_text("m", messages, 40)
            return headers["x-stream-dispatch"]

        with ThreadPoolExecutor(10) as workers:
            burst = [workers.submit(one, i) for i in range(10)]
            until(lambda: len(pool.ready()) == 3, 60, "the pool to grow to its maximum")
            served = [f.result(timeout=120) for f in burst]
        assert "agent" in served
        until(lambda: len(pool.ready()) == 1, 60, "idle agents to be stopped")
        assert pool.launched == 3


def test_a_killed_agent_is_replaced_and_requests_still_complete(tmp_path):
    with agent_gateway(
        tmp_path, {"control_plane": "parsl", "parsl": {"max_workers": 4, "heartbeat_s": 1}},
        {"min_warm": 1, "max": 1, "max_concurrency": 8, "walltime_s": 600,
         "replace_before_s": 60},
        {"answer_tokens": 10}) as (gw, _sim, pool, victim):
        os.kill(victim.pid, signal.SIGKILL)
        until(lambda: victim.phase == "gone", 30, "the gateway to notice")
        # Meanwhile requests are jobs of their own; then a new agent takes over.
        messages = ask("while the agent is gone")
        text, headers = stream_text(gw.url, "hpc/m", messages)
        assert text == answer_text("m", messages, 10)
        until(lambda: pool.ready() and pool.ready()[0] is not victim, 120, "a new agent")
        text, headers = stream_text(gw.url, "hpc/m", messages)
        assert headers["x-stream-dispatch"] == "agent"


def test_an_agent_that_falls_silent_and_wakes_up_comes_back_on_its_next_channel(tmp_path):
    """The agent's process is stopped (SIGSTOP: a stalled node, a partition): its connection
    stays open but carries nothing. The gateway notices the silence and waits on the agent's
    next channel; the agent, woken, notices the gateway's silence and comes there too. It is
    the same agent, ready again, and no other was launched meanwhile."""
    with agent_gateway(
        tmp_path, {"control_plane": "local", "local_workers": 3},
        {"min_warm": 1, "max": 1, "walltime_s": 600, "replace_before_s": 60},
        {"answer_tokens": 10}) as (gw, _sim, pool, agent):
        os.kill(agent.pid, signal.SIGSTOP)
        try:
            until(lambda: agent.phase == "reconnecting", 30, "the gateway to notice the silence")
            assert pool.counts()["reconnecting"] == 1 and pool.launched == 1
            messages = ask("while the agent is stopped")
            text, headers = stream_text(gw.url, "hpc/m", messages)
            assert text == answer_text("m", messages, 10)
            assert headers["x-stream-dispatch"] == "job"
        finally:
            os.kill(agent.pid, signal.SIGCONT)
        until(lambda: agent.phase == "ready", 60, "the agent to come back")
        assert agent.resumed == 1 and agent.epoch == 1 and pool.ready() == [agent]
        assert pool.launched == 1, "no replacement for an agent that came back"
        text, headers = stream_text(gw.url, "hpc/m", messages)
        assert text == answer_text("m", messages, 10) and headers["x-stream-dispatch"] == "agent"


# -- cold starts ----------------------------------------------------------------------------


def test_a_starting_cluster_is_visible_and_auto_moves_on(tmp_path, start_sim):
    """The cluster's vLLM is not up yet: its agent waits for it, the cluster says it is
    starting, and `auto` requests go to another tier meanwhile."""
    from streamllm.config import SimModelSettings, SimSettings
    from streamllm.sim.app import Simulator

    local = start_sim({"local-m": {"answer_tokens": 4}})
    sim = Simulator(SimSettings(models={"m": SimModelSettings(answer_tokens=6)}))
    sim_server = ServerThread(sim.app)  # bound, not yet serving: the vLLM still loading
    settings = Settings.model_validate({
        "server": {"detect_ollama": False, "data_dir": str(tmp_path)},
        "tiers": {
            "hpc": {"kind": "hpc", "clusters": {"a": {
                "base_url": f"{sim_server.url}/v1", "models": ["m"],
                "control_plane": "local", "local_workers": 2,
                "agents": {"min_warm": 1, "max": 1, "heartbeat_s": 1}}}},
            "local": {"kind": "vllm", "base_url": local.url, "models": ["local-m"]},
            "cloud": {"enabled": False}},
        "routing": {"tier_for": {"LOW": "hpc", "MEDIUM": "hpc", "HIGH": "hpc"},
                    "fallback": {"LOW": ["local"], "MEDIUM": ["local"], "HIGH": ["local"]}},
    })
    app = create_app(settings)
    with ServerThread(app) as server:
        cluster = app.state.runtime.backends["hpc"].clusters[0]
        # The agent is launched and says it is starting: it waits for the backend.
        until(lambda: cluster.pool.counts()["starting"] == 1, 60, "the agent to start")
        # An agent waiting for its backend keeps beating, and is not taken for lost.
        waiting = next(iter(cluster.pool.agents.values()))
        until(lambda: waiting.beats >= 4, 30, "the waiting agent's beats")
        assert cluster.pool.launched == 1 and waiting.phase == "starting"
        card = httpx.get(f"{server.url}/v1/models/hpc/m", timeout=10).json()
        assert card["state"] == "starting"
        endpoint = card["endpoints"][0]
        assert endpoint["state"] == "starting" and endpoint["estimated_wait_s"] > 0
        assert "queue_position" in endpoint
        raw = client(server.url).chat.completions.with_raw_response.create(
            model="auto", messages=ask("hello there"))
        assert raw.headers["x-stream-tier"] == "local"
        assert "fallback:hpc-starting" in raw.headers["x-stream-route-reason"]
        # The backend comes up: the agent says it is ready and the cluster serves again.
        sim_server.start()
        until(lambda: cluster.state() == "ready", 60, "the cluster to be ready")
        raw = client(server.url).chat.completions.with_raw_response.create(
            model="hpc/m", messages=ask("hello there"))
        assert raw.headers["x-stream-dispatch"] == "agent"
    sim_server.stop()


def test_a_control_plane_that_fails_its_first_jobs_comes_back(tmp_path, start_sim, monkeypatch):
    """An endpoint that is down when the gateway starts makes its cluster offline, not dead:
    the warm-up job is tried again, and once the endpoint takes jobs the cluster serves."""
    import concurrent.futures
    import threading

    from streamllm.gateway import runtime as runtime_module

    down = threading.Event()
    down.set()
    refused = []

    class EndpointDownWhileSet(JobsOnly):
        """The real plane, behind an endpoint that refuses jobs while `down` is set."""

        def __init__(self, plane):
            self.plane, self.name = plane, plane.name

        def submit(self, fn, *args):
            if down.is_set():
                refused.append(fn.__name__)
                future = concurrent.futures.Future()
                future.set_exception(ConnectionError("endpoint is offline"))
                return future
            return self.plane.submit(fn, *args)

        def shutdown(self):
            self.plane.shutdown()

    real = runtime_module.make_control_plane
    monkeypatch.setattr(runtime_module, "make_control_plane",
                        lambda *a, **k: EndpointDownWhileSet(real(*a, **k)))
    monkeypatch.setattr(runtime_module, "WARM_RETRY_S", 0.2)
    sim = start_sim({"m": {"answer_tokens": 5}})
    settings = Settings.model_validate({
        "server": {"detect_ollama": False, "data_dir": str(tmp_path)},
        "tiers": {"hpc": {"kind": "hpc", "clusters": {"a": {
            "base_url": sim.url, "models": ["m"], "control_plane": "local",
            "local_workers": 1}}},
            "local": {"enabled": False}, "cloud": {"enabled": False}},
    })
    app = create_app(settings)
    with ServerThread(app) as server:
        def endpoint() -> dict:
            return httpx.get(f"{server.url}/v1/models/hpc/m", timeout=10).json()["endpoints"][0]

        until(lambda: endpoint()["state"] == "offline", 30, "the cluster to be offline")
        until(lambda: len(refused) >= 2, 30, "the warm-up job to be tried again")
        with pytest.raises(openai.APIStatusError) as refused_request:
            client(server.url).chat.completions.create(model="hpc/m", messages=ask("hi"))
        assert refused_request.value.status_code == 503
        down.clear()
        until(lambda: endpoint()["state"] == "ready", 60, "the cluster to come back")
        text, headers = stream_text(server.url, "hpc/m", ask("back again"))
        assert text == answer_text("m", ask("back again"), 5)
        assert headers["x-stream-cluster"] == "a"


def test_a_cluster_failing_before_the_first_token_hands_over_to_the_next(tmp_path, start_sim):
    """Two clusters serve `m`; the one tried first answers 500: the other takes the request
    over and the client sees one clean answer."""
    broken = start_sim({"m": {"error_rate": 1.0}})
    healthy = start_sim({"m": {"answer_tokens": 7}})
    gw, server = start({
        "broken": {"base_url": broken.url, "models": ["m"], "control_plane": "local",
                   "local_workers": 2},
        "healthy": {"base_url": healthy.url, "models": ["m"], "control_plane": "local",
                    "local_workers": 2}},
        tmp_path, tiers={"local": {"enabled": False}, "cloud": {"enabled": False}})
    try:
        until(lambda: all(c.state() == "ready" for c in gw.runtime.backends["hpc"].clusters),
              60, "both clusters to be ready")
        messages = ask("who answers when the first cluster fails?")
        text, headers = stream_text(gw.url, "hpc/m", messages)
        assert text == answer_text("m", messages, 7)
        assert headers["x-stream-cluster"] == "healthy"
        assert len(broken.sim.requests_for("m")) == 1  # it was tried first, and failed
        assert len(healthy.sim.requests_for("m")) == 1
        assert gw.cluster("broken").recently_failed()
        # Non-streamed too; the cluster that just failed is now tried last.
        body = client(gw.url).chat.completions.create(model="hpc/m", messages=messages)
        assert body.choices[0].message.content == answer_text("m", messages, 7)
        assert len(broken.sim.requests_for("m")) == 1
    finally:
        server.stop()


def cold_cluster(tmp_path, sim_url: str, wait_s: float):
    settings = Settings.model_validate({
        "server": {"detect_ollama": False, "data_dir": str(tmp_path)},
        "tiers": {
            "hpc": {"kind": "hpc", "clusters": {"a": {
                "base_url": sim_url, "models": ["m"], "control_plane": "local",
                "local_workers": 2, "cold_start": "wait", "cold_start_wait_s": wait_s,
                "agents": {"min_warm": 1, "max": 1, "heartbeat_s": 1}}}},
            "local": {"enabled": False}, "cloud": {"enabled": False}},
    })
    return create_app(settings)


def test_a_request_waits_for_a_starting_cluster_and_is_told_where_it_stood(tmp_path):
    """`cold_start: wait`: the request is held (it shows in the cluster's queue) until the
    cluster's server is up and its agent ready, then answered through the agent. A streamed
    request held longer than a few seconds gets its response started, with its place in the
    queue in the headers and a note as an SSE comment, which the `openai` SDK skips."""
    from streamllm.config import SimModelSettings, SimSettings
    from streamllm.sim.app import Simulator

    sim = Simulator(SimSettings(models={"m": SimModelSettings(answer_tokens=6)}))
    sim_server = ServerThread(sim.app)  # bound, not serving yet: the model still loading
    app = cold_cluster(tmp_path, f"{sim_server.url}/v1", 600)
    try:
        with ServerThread(app) as server, ThreadPoolExecutor(1) as pool, \
                httpx.Client(base_url=server.url, timeout=60) as http:
            cluster = app.state.runtime.backends["hpc"].clusters[0]
            until(lambda: cluster.pool.counts()["starting"] == 1, 60, "the agent to start")
            messages = ask("worth the wait?")
            waiting = pool.submit(stream_text, server.url, "hpc/m", messages)
            until(lambda: cluster.waiting == 1, 30, "the request to be held")
            endpoint = http.get("/v1/models/hpc/m").json()["endpoints"][0]
            assert endpoint["state"] == "starting" and endpoint["queue_position"] == 1
            raw_messages = ask("and with a raw client?")
            with http.stream("POST", "/v1/chat/completions", json={
                    "model": "hpc/m", "messages": raw_messages, "stream": True}) as raw:
                # Headers and a note (after WAIT_NOTE_AFTER_S) while nothing has reached the
                # server yet.
                assert raw.status_code == 200
                assert raw.headers["x-stream-queue-position"] == "2"
                assert int(raw.headers["x-stream-estimated-wait-s"]) > 0
                assert raw.headers["x-stream-cluster"] == "a"
                lines = raw.iter_lines()
                note = next(lines)
                assert note.startswith(": waiting for cluster a (starting), about ")
                assert not waiting.done() and not sim.requests_for("m")
                # A client that leaves while it waits leaves the queue.
                with http.stream("POST", "/v1/chat/completions", json={
                        "model": "hpc/m", "messages": ask("never mind"), "stream": True}) as gone:
                    assert cluster.waiting == 3  # its response has started: it is held
                    assert next(gone.iter_lines()).startswith(": waiting for cluster a")
                until(lambda: cluster.waiting == 2, 10, "the client that left to leave the queue")
                sim_server.start()
                rest = [line for line in lines if line]
            assert rest[-1] == "data: [DONE]"
            chunks = [json.loads(line[6:]) for line in rest[:-1] if line.startswith("data: ")]
            assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                           if c["choices"]) == answer_text("m", raw_messages, 6)
            text, headers = waiting.result(timeout=60)
            assert text == answer_text("m", messages, 6)
            assert headers["x-stream-queue-position"] == "1"
            assert int(headers["x-stream-estimated-wait-s"]) > 0
            assert cluster.waiting == 0
            # Sent once the cluster is ready, a request goes straight through the agent.
            text, headers = stream_text(server.url, "hpc/m", messages)
            assert "x-stream-queue-position" not in headers
            assert headers["x-stream-dispatch"] == "agent"
    finally:
        sim_server.stop()


def test_a_request_held_too_long_for_a_cold_cluster_fails_saying_so(tmp_path, monkeypatch):
    from streamllm.config import SimModelSettings, SimSettings
    from streamllm.sim.app import Simulator
    from streamllm.tiers import federation

    # The streamed request below is to have its response started within the 1 s it may wait.
    monkeypatch.setattr(federation, "WAIT_NOTE_AFTER_S", 0.3)

    sim = Simulator(SimSettings(models={"m": SimModelSettings()}))
    sim_server = ServerThread(sim.app)  # never serves
    app = cold_cluster(tmp_path, f"{sim_server.url}/v1", 1)
    try:
        with ServerThread(app) as server:
            cluster = app.state.runtime.backends["hpc"].clusters[0]
            until(lambda: cluster.pool.counts()["starting"] == 1, 60, "the agent to start")
            with pytest.raises(openai.APIStatusError) as failed:
                client(server.url).chat.completions.create(model="hpc/m", messages=ask("hi"))
            assert failed.value.status_code == 503
            assert "still starting after 1 s" in failed.value.message
            # Streamed, the response had begun while it waited: the failure ends it as an
            # error event, which the SDK raises.
            with pytest.raises(openai.APIError) as failed:
                for _ in client(server.url).chat.completions.create(
                        model="hpc/m", messages=ask("hi"), stream=True):
                    pass
            assert "still starting after 1 s" in failed.value.message
            assert cluster.waiting == 0 and not sim.requests_for("m")
            # An agent still waiting for its server listens: drained, it gives its node back.
            agent = next(iter(cluster.pool.agents.values()))
            on_loop(server, cluster.pool._drain(agent))
            until(lambda: agent.job.done(), 30, "the waiting agent's job to end")
            assert agent.job.result()["error"] == "drained while waiting for the backend"
    finally:
        sim_server.stop()


def test_a_cluster_whose_relay_restarts_keeps_its_agent_and_the_answer_in_flight(tmp_path):
    """The cluster's relay (its own process) is killed in the middle of an answer and started
    again on the same port. The agent and the gateway meet again on the agent's next channel:
    the answer that was streaming arrives whole, the cluster is ready again with the same agent
    (no new launch: on a real cluster that would be a queued job and a model load), and new
    requests go through it."""
    from streamllm.config import SimModelSettings, SimSettings
    from streamllm.sim.app import Simulator
    from tests.conftest import STREAMLLM, start_relay
    from tests.test_hpc_e2e import SECRET

    secret = tmp_path / "relay.secret"
    secret.write_text(SECRET)
    relay, port = start_relay("--secret-file", str(secret))
    sim = Simulator(SimSettings(models={"m": SimModelSettings(answer_tokens=40,
                                                              tokens_per_s=20)}))
    sim_server = ServerThread(sim.app).start()
    gw, server = start({"a": {
        "base_url": f"{sim_server.url}/v1", "models": ["m"], "control_plane": "local",
        "local_workers": 3, "relay_url": f"ws://127.0.0.1:{port}",
        "relay_secret_file": str(secret),
        "agents": {"min_warm": 1, "max": 1, "heartbeat_s": 1}}}, tmp_path,
        routing={"health_interval_s": 0.5})
    try:
        cluster = gw.cluster("a")
        until(lambda: cluster.state() == "ready", 60, "the cluster to be ready")
        agent = cluster.pool.ready()[0]
        messages = ask("while the relay restarts")
        raw = client(gw.url).chat.completions.with_raw_response.create(
            model="hpc/m", messages=messages, stream=True)
        assert raw.headers["x-stream-dispatch"] == "agent"
        chunks = iter(raw.parse())
        text = ""
        while not text:
            chunk = next(chunks)
            text += (chunk.choices[0].delta.content or "") if chunk.choices else ""

        relay.kill()
        relay.wait()
        until(lambda: cluster.state() == "offline", 30, "the cluster to go offline")
        relay = subprocess.Popen([STREAMLLM, "relay", "--port", str(port), "--secret-file",
                                  str(secret)], stderr=subprocess.DEVNULL)
        text += "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == answer_text("m", messages, 40), "the answer in flight arrives whole"

        until(lambda: cluster.pool.ready() == [agent], 60, "the agent to be ready again")
        assert cluster.state() == "ready" and agent.resumed == 1 and agent.epoch == 1
        assert cluster.pool.launched == 1, "no agent was launched to replace it"
        messages = ask("after the relay restarted")
        text, headers = stream_text(gw.url, "hpc/m", messages)
        assert text == answer_text("m", messages, 40)
        assert headers["x-stream-dispatch"] == "agent" and headers["x-stream-transport"] == "relay"
        # The whole result comes on the agent's channel just after the stream's last frame.
        until(lambda: agent.served == 2, 30, "both results from the same agent")
    finally:
        server.stop()
        sim_server.stop()
        relay.kill()
        relay.wait()
