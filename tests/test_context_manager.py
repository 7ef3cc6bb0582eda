"""The context manager against a real simulator and a real SQLite store: summaries written once,
in parts when the summarizing model's window is small, extractive when it fails."""

from __future__ import annotations

import asyncio

import pytest

from streamllm.config import ContextSettings, TierSettings
from streamllm.context.manager import ContextManager
from streamllm.context.summarize import SUMMARY_INSTRUCTIONS
from streamllm.store import Store, default_url
from streamllm.tiers import OpenAIHTTPBackend
from streamllm.tiers.adapt import backend_body


def long_chat(turns: int, words: int = 60) -> list[dict]:
    out = [{"role": "system", "content": "You help."}]
    for i in range(turns):
        role = "user" if i % 2 == 0 else "assistant"
        out.append({"role": role, "content": f"Turn {i} about PROJ-{1000 + i}: " +
                    "we looked at the numbers again " * (words // 6)})
    return out


@pytest.fixture
async def parts(start_sim, tmp_path):
    made = []

    async def build(window: int, **sim_spec):
        sim = start_sim({"summ": {"context_window": window, "answer_tokens": 40, **sim_spec}})
        tier = TierSettings(kind="vllm", base_url=sim.url, models=["summ"])
        backend = OpenAIHTTPBackend("local", tier)

        async def complete(body):
            return await backend.complete(backend_body(body, "summ", tier, stream=False))

        store = await Store.open(default_url(str(tmp_path)))
        manager = ContextManager(ContextSettings(), store, complete, "summ",
                                 summarizer_window=window)
        made.append((backend, store, manager))
        return sim, manager

    yield build
    for backend, store, manager in made:
        await manager.aclose()
        await store.close()
        await backend.aclose()


def summary_requests(sim):
    return [e for e in sim.sim.log if e.body["messages"][0]["content"] == SUMMARY_INSTRUCTIONS]


async def test_a_block_larger_than_the_summarizers_window_goes_in_parts(parts):
    sim, manager = await parts(window=2048)
    outcome = await manager.fit(long_chat(41), "hpc", "big", 3000, None, None)
    assert outcome is not None and outcome.fitted.action == "summarized"
    assert outcome.summary_method == "model"
    asked = summary_requests(sim)
    assert len(asked) >= 2, "the aged block did not fit the summarizer at once"
    assert all(e.status in (None, 200) for e in asked), "every part fitted its window"
    # Later parts extend the earlier ones.
    assert "<previous_summary>" in asked[-1].body["messages"][-1]["content"]


async def test_racing_requests_write_one_summary(parts):
    sim, manager = await parts(window=32000, ttft_ms=200)
    outcomes = await asyncio.gather(*(manager.fit(long_chat(41), "local", "m", 3000, None, None)
                                      for _ in range(5)))
    assert len({o.summary_id for o in outcomes}) == 1
    assert len(summary_requests(sim)) == 1


async def test_a_failing_summarizer_falls_back_to_the_extractive_summary(parts):
    _sim, manager = await parts(window=32000, error_rate=1.0)
    outcome = await manager.fit(long_chat(41), "local", "m", 3000, None, None)
    assert outcome.summary_method == "extractive"
    record = await manager.summary(outcome.summary_id, None)
    assert "PROJ-10" in record.text, "identifiers are kept"
    assert manager.extractive_summaries == 1 and manager.model_summaries == 0


async def test_calibration_is_kept_in_the_store(parts, tmp_path):
    _, manager = await parts(window=32000)
    messages = [{"role": "user", "content": "word " * 400}]
    for _ in range(10):
        manager.observe("m", messages, 406)
    await manager.idle()
    reopened = ContextManager(ContextSettings(), manager.store)
    await reopened.start()
    assert abs(reopened.counter("m").calibration.tokens_per_char - 0.2) < 0.01
    assert reopened.counter("m").calibration.samples == 10
