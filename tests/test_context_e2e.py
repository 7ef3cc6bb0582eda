"""Long conversations through the gateway, with the simulators' windows enforced (a prompt over
the window is a 400): summaries keep simple questions local, are written once per aged block,
survive restarts, and can be fetched."""

from __future__ import annotations

import asyncio

import httpx2 as httpx
import openai
import pytest

from streamllm.context.summarize import SUMMARY_INSTRUCTIONS
from streamllm.sim.content import prompt_tokens
from tests.conftest import tier_config

LOCAL_WINDOW = 2048
PROBE = "thanks! quick one: what's 2 + 2?"
PROBE_TURNS = (10, 20, 30, 35, 40)
TOPICS = ["the Lustre scratch quota", "our CUDA 12 build", "the Slurm fairshare policy",
          "node gpu017's ECC errors", "the weekly Globus transfer", "MPI rank placement",
          "the conda environment for the lab", "checkpoint intervals for the solver"]


def user_turn(i: int) -> str:
    topic = TOPICS[i % len(TOPICS)]
    return (f"Turn {i}: about {topic}, we saw the job slow down again on Tuesday and I "
            f"logged the timings in the notebook; can you walk me through what to check "
            f"next and what numbers would be normal for a run of this size on our cluster?")


def is_summary_request(entry) -> bool:
    messages = entry.body.get("messages") or []
    return bool(messages) and messages[0].get("content") == SUMMARY_INSTRUCTIONS


@pytest.fixture
def cluster(start_sim, start_gateway, tmp_path):
    """local (2k window), hpc (8k) and cloud (32k) simulators behind a gateway whose store is
    in tmp_path; `start(summarize=...)` starts (or restarts) the gateway."""
    sims = {
        "local": start_sim({"local-m": {"context_window": LOCAL_WINDOW, "answer_tokens": 80}}),
        "hpc": start_sim({"hpc-m": {"context_window": 8192, "answer_tokens": 80}}),
        "cloud": start_sim({"cloud-m": {"context_window": 32768, "answer_tokens": 80}}),
    }
    windows = {"local": LOCAL_WINDOW, "hpc": 8192, "cloud": 32768}

    def start(summarize: bool = True, **context):
        return start_gateway({
            "server": {"data_dir": str(tmp_path)},
            "tiers": {t: tier_config(s.url, f"{t}-m", context_window=windows[t])
                      for t, s in sims.items()},
            "context": {"summarize": summarize, **context},
        })

    return sims, start


def converse(gateway, turns: int, probes=PROBE_TURNS, model="local"):
    """A client keeping its own history, as OpenAI clients do: ordinary turns to `model`,
    a LOW probe (auto) at the probe turns. Returns the probes' response headers (None when the
    probe failed) and the history."""
    client = openai.OpenAI(base_url=gateway.v1, api_key="unused", max_retries=0)
    history = [{"role": "system", "content": "You help a research computing group."}]
    seen = {}
    for i in range(1, turns + 1):
        probe = i in probes
        history.append({"role": "user", "content": PROBE if probe else user_turn(i)})
        try:
            raw = client.chat.completions.with_raw_response.create(
                model="auto" if probe else model, messages=history)
        except openai.BadRequestError:
            seen[i] = None
            history.pop()
            continue
        if probe:
            seen[i] = raw.headers
        history.append({"role": "assistant",
                        "content": raw.parse().choices[0].message.content})
    return seen, history


def test_probes_stay_local_with_summaries_and_escalate_without(cluster):
    sims, start = cluster
    with_summaries, history = converse(start(summarize=True), 40)
    for turn, headers in with_summaries.items():
        assert headers is not None, f"probe at turn {turn} failed"
        assert headers["x-stream-tier"] == "local", (turn, headers["x-stream-route-reason"])
        assert headers["x-stream-complexity"] == "LOW"
    assert prompt_tokens(history) > 2.5 * LOCAL_WINDOW, "the conversation outgrew the window"
    late = with_summaries[40]
    assert late["x-stream-context"] == "summarized"
    assert int(late["x-stream-context-tokens-before"]) > LOCAL_WINDOW
    assert int(late["x-stream-context-tokens-after"]) < LOCAL_WINDOW
    # Every request the local simulator accepted fitted its window: none was a 400.
    assert all(e.status in (None, 200) for e in sims["local"].sim.log)

    for sim in sims.values():
        sim.sim.log.clear()
    without, _ = converse(start(summarize=False), 40)
    escalated = [t for t, h in without.items() if h is None or h["x-stream-tier"] != "local"]
    assert len(escalated) >= 3, without
    for turn in escalated:
        headers = without[turn]
        assert headers is None or "context:local-too-small" in headers["x-stream-route-reason"]


def test_the_summarizer_runs_once_per_aged_block_not_once_per_turn(cluster):
    sims, start = cluster
    converse(start(), 40, probes=())
    summaries = [e for e in sims["local"].sim.log if is_summary_request(e)]
    over_window = 40 - 12  # roughly the turns after the conversation outgrew the window
    assert 1 <= len(summaries) <= over_window // 3, len(summaries)
    # Each later summary extends the one before with only the newly aged turns.
    for entry in summaries[1:]:
        content = entry.body["messages"][-1]["content"]
        assert "Turn 1:" not in content, "the first turns are not summarised again"


def test_a_summary_can_be_fetched_and_survives_a_restart(cluster):
    sims, start = cluster
    gateway = start()
    _, history = converse(gateway, 30, probes=())
    client = openai.OpenAI(base_url=gateway.v1, api_key="unused", max_retries=0)
    history.append({"role": "user", "content": user_turn(31)})
    raw = client.chat.completions.with_raw_response.create(model="local", messages=history)
    summary_id = raw.headers["x-stream-summary-id"]
    got = httpx.get(f"{gateway.v1}/stream/summaries/{summary_id}", timeout=10).json()
    assert got["id"] == summary_id and got["text"] and got["tier"] == "local"
    assert got["messages_summarized"] > 10
    missing = httpx.get(f"{gateway.v1}/stream/summaries/local.{'0' * 64}", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"

    gateway.server.stop()
    sims["local"].sim.log.clear()
    again = start()
    raw = openai.OpenAI(base_url=again.v1, api_key="unused", max_retries=0) \
        .chat.completions.with_raw_response.create(model="local", messages=history)
    assert raw.headers["x-stream-summary-id"] == summary_id
    assert raw.headers["x-stream-summary"] == "stored"
    assert not [e for e in sims["local"].sim.log if is_summary_request(e)], "not rebuilt"


def test_planted_facts_survive_when_the_summarizer_model_is_unavailable(cluster):
    _sims, start = cluster
    # The summarizing model does not exist: the extractive summarizer must keep the facts.
    gateway = start(summarizer={"model": "no-such-model"})
    client = openai.OpenAI(base_url=gateway.v1, api_key="unused", max_retries=0)
    facts = ["Our allocation is PROJ-4471.", "The budget is $12,500 for the year.",
             "Dr. Okafor approved the plan on March 14.",
             "Results go to /scratch/lab/run42 on the cluster."]
    history = [{"role": "system", "content": "You help a research computing group."}]
    chatter = ("I'm still reading through the notes you pointed me to and trying things out "
               "on the side; it is slowly making more sense, thanks for your patience with all "
               "of this, really appreciated.")
    for i in range(1, 31):
        text = chatter + (" " + facts[i - 1] if i <= len(facts) else "")
        history += [{"role": "user", "content": text}]
        reply = client.chat.completions.create(model="local", messages=history)
        history.append({"role": "assistant", "content": reply.choices[0].message.content})
    history.append({"role": "user", "content": "what was our allocation again?"})
    raw = client.chat.completions.with_raw_response.create(model="local", messages=history)
    got = httpx.get(f"{gateway.v1}/stream/summaries/{raw.headers['x-stream-summary-id']}",
                    timeout=10).json()
    assert got["method"] == "extractive"
    for needle in ("PROJ-4471", "$12,500", "Okafor", "March 14", "/scratch/lab/run42"):
        assert needle in got["text"], needle


def test_a_high_query_goes_to_a_tier_that_holds_the_whole_conversation(cluster):
    sims, start = cluster
    gateway = start()
    _, history = converse(gateway, 20, probes=())
    client = openai.OpenAI(base_url=gateway.v1, api_key="unused", max_retries=0)
    history.append({"role": "user", "content":
                    "Design a checkpoint/restart strategy for everything we discussed, weighing "
                    "I/O cost against lost work, and justify the interval rigorously."})
    raw = client.chat.completions.with_raw_response.create(model="auto", messages=history)
    assert raw.headers["x-stream-complexity"] == "HIGH"
    assert raw.headers["x-stream-context"] == "full"
    assert raw.headers["x-stream-tier"] in ("hpc", "cloud")
    # A LOW question that asks for the full context is not summarised either.
    history[-1] = {"role": "user", "content": PROBE}
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=history, extra_body={"full_context": True})
    assert raw.headers["x-stream-context"] == "full"
    assert raw.headers["x-stream-tier"] != "local"
    assert "full_context" not in sims[raw.headers["x-stream-tier"]].sim.log[-1].body


def test_the_next_turns_summary_is_prepared_in_the_background(cluster):
    _sims, start = cluster
    gateway = start()
    client = openai.OpenAI(base_url=gateway.v1, api_key="unused", max_retries=0)
    history = [{"role": "system", "content": "You help a research computing group."}]
    context = gateway.app.state.runtime.context
    kinds = []
    for i in range(1, 41):
        history.append({"role": "user", "content": user_turn(i)})
        raw = client.chat.completions.with_raw_response.create(model="local", messages=history)
        history.append({"role": "assistant", "content": raw.parse().choices[0].message.content})
        kinds.append(raw.headers.get("x-stream-summary"))
        # Let the look-ahead finish, as a user reading the answer would.
        asyncio.run_coroutine_threadsafe(context.idle(), gateway.server.loop).result(30)
    summarized = [k for k in kinds if k is not None]
    assert summarized, "the conversation was never summarised"
    # Once the look-ahead is running, clients find their summary written: they never wait.
    assert summarized.count("new") <= 1, kinds
    assert summarized.count("stored") >= len(summarized) - 1


def test_a_local_tokenizer_gives_exact_counts(start_sim, start_gateway, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    # A word-level tokenizer that splits as the simulator counts: words and punctuation.
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    sim = start_sim({"m": {"context_window": 4096}})
    gateway = start_gateway({"tiers": {
        "local": tier_config(sim.url, "m", context_window=4096, tokenizer=str(path)),
        "hpc": {"enabled": False}, "cloud": {"enabled": False}}})
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "How many tokens is this sentence , exactly ?"}]
    raw = openai.OpenAI(base_url=gateway.v1, api_key="unused", max_retries=0) \
        .chat.completions.with_raw_response.create(model="local", messages=messages)
    assert int(raw.headers["x-stream-context-tokens-after"]) == prompt_tokens(messages)
    assert raw.parse().usage.prompt_tokens == prompt_tokens(messages)


def test_a_missing_tokenizer_file_is_a_startup_error(tmp_path):
    from streamllm.config import Settings
    from streamllm.context.tokens import load_tokenizer
    from streamllm.errors import ConfigError

    with pytest.raises(ConfigError, match="tiers.local.tokenizer"):
        load_tokenizer(str(tmp_path / "nope.json"), "tiers.local.tokenizer")
    assert Settings.model_validate({"tiers": {"local": {"tokenizer": "x.json"}}})
