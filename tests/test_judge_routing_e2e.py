"""Routing decisions end to end through the gateway with the `openai` SDK: the judge's headers,
privacy pins, budgets, per-key cloud rules, context sizes and the LLM judge."""

from __future__ import annotations

import json

import httpx2 as httpx
import openai
import pytest

from streamllm.sim.content import answer_text

HARD = ("Design a fault-tolerant checkpointing scheme for our 2000-node MPI code, weighing I/O "
        "cost against lost work, and argue how you would validate it.")
EASY = "hi, what's the capital of Peru?"
KEY, NO_CLOUD_KEY, THRIFTY_KEY = "sk-test-key-one-0001", "sk-test-key-two-0002", "sk-thrifty-03"


def sdk(t, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=t.gateway.v1, api_key=key, max_retries=0)


def ask(t, text: str, key: str = "unused", **kw):
    raw = sdk(t, key).chat.completions.with_raw_response.create(
        model=kw.pop("model", "auto"), messages=[{"role": "user", "content": text}], **kw)
    return raw.headers, raw.parse()


def test_auto_explains_its_choice_in_headers_and_keeps_the_stream_pure_openai(three_tiers):
    t = three_tiers()
    with httpx.Client(base_url=t.gateway.url, timeout=30) as client:
        resp = client.post("/v1/chat/completions", json={
            "model": "auto", "stream": True, "messages": [{"role": "user", "content": HARD}]})
    assert resp.status_code == 200
    h = resp.headers
    assert (h["x-stream-complexity"], h["x-stream-tier"]) == ("HIGH", "cloud")
    assert h["x-stream-route-reason"] == "judge:HIGH"
    assert h["x-stream-judge"] == "classifier"
    assert 0.5 <= float(h["x-stream-judge-confidence"]) <= 1.0
    events = [ln[6:] for ln in resp.text.split("\n") if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        assert json.loads(event)["object"] == "chat.completion.chunk"
    assert all(ln.startswith("data: ") or not ln for ln in resp.text.split("\n"))


def test_explicit_model_says_explicit(three_tiers):
    headers, _ = ask(three_tiers(), HARD, model="hpc")
    assert (headers["x-stream-route-reason"], headers["x-stream-complexity"]) == ("explicit",
                                                                                 "none")


SENSITIVE = {
    "email": "Reply to jane.doe+grants@example.org with the result.",
    "phone": "Call me back at +1-202-555-0143 when it is done.",
    "national_id": "My SSN is 123-45-6789, include it in the form.",
    "card": "Charge the compute time to card 4111 1111 1111 1111.",
    "api_key": "Use this key: sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z.",
    "private_key": "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n"
                   "-----END OPENSSH PRIVATE KEY-----",
    "custom:project": "This concerns project ZX-4471-CONFIDENTIAL.",
}


@pytest.mark.parametrize("kind", sorted(SENSITIVE))
def test_sensitive_data_keeps_a_hard_query_off_the_cloud(three_tiers, kind):
    t = three_tiers(routing={"privacy": {"patterns": {"project": r"ZX-\d{4}-CONFIDENTIAL"}}})
    headers, reply = ask(t, f"{HARD}\n\n{SENSITIVE[kind]}", stream=False)
    assert headers["x-stream-complexity"] == "HIGH"
    assert headers["x-stream-tier"] == "hpc"
    assert headers["x-stream-route-reason"] == f"judge:HIGH,privacy:{kind}"
    assert not t.cloud.sim.log, "nothing reached the cloud"
    assert reply.choices[0].message.content


def test_sensitive_data_with_an_explicit_cloud_model_is_refused(three_tiers):
    t = three_tiers()
    with pytest.raises(openai.PermissionDeniedError) as err:
        ask(t, f"{EASY} {SENSITIVE['email']}", model="cloud")
    assert err.value.body["code"] == "cloud_not_allowed"
    assert not t.cloud.sim.log


def test_ordinary_text_is_not_flagged(three_tiers):
    t = three_tiers()
    text = (HARD + " We ran job 48213377 on 2024-05-01 with Python 3.11.7; see "
            "doi 10.1038/s41586-020-2649-2 and arXiv 2101.00001; p < 0.05 over 1234567 rows.")
    headers, _ = ask(t, text)
    assert headers["x-stream-tier"] == "cloud"
    assert "privacy" not in headers["x-stream-route-reason"]


def test_a_spent_budget_moves_hard_queries_off_the_cloud(three_tiers):
    # Every cloud answer costs a dollar (the simulator's 32 tokens times this price, and the
    # reservation for max_tokens 32 is the same); budget $2 a month.
    t = three_tiers(routing={"budget": {"usd": 2.0, "soft_start": 0.5}},
                    tiers={"cloud": {"prices": {"*": {"input_per_mtok": 0.0,
                                                      "output_per_mtok": 1e6 / 32}}}})
    tiers = []
    for _ in range(3):
        headers, _ = ask(t, HARD, max_tokens=32)
        tiers.append((headers["x-stream-tier"], headers["x-stream-route-reason"]))
    assert tiers[0] == ("cloud", "judge:HIGH")
    assert tiers[-1] == ("hpc", "budget"), tiers
    assert len(t.cloud.sim.log) <= 2


def test_streamed_answers_count_against_the_budget_too(three_tiers):
    t = three_tiers(routing={"budget": {"usd": 1.0, "soft_start": 0.0}},
                    tiers={"cloud": {"prices": {"*": {"output_per_mtok": 1e6 / 32}}}})
    stream = sdk(t).chat.completions.create(
        model="auto", stream=True, max_tokens=32, messages=[{"role": "user", "content": HARD}])
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    headers, _ = ask(t, HARD, max_tokens=32)
    assert (headers["x-stream-tier"], headers["x-stream-route-reason"]) == ("hpc", "budget")


def keyed(three_tiers, **routing):
    return three_tiers(
        routing=routing,
        server={"api_keys": [KEY, {"key": NO_CLOUD_KEY, "name": "clinic", "allow_cloud": False},
                             {"key": THRIFTY_KEY, "name": "thrifty", "budget_usd": 1.0}]},
        tiers={"cloud": {"prices": {"*": {"output_per_mtok": 1e6 / 32}}}},
    )


def test_a_key_without_cloud_never_reaches_it(three_tiers):
    t = keyed(three_tiers)
    headers, _ = ask(t, HARD, key=NO_CLOUD_KEY)
    assert (headers["x-stream-tier"], headers["x-stream-route-reason"]) == ("hpc",
                                                                            "judge:HIGH,no-cloud")
    with pytest.raises(openai.PermissionDeniedError):
        ask(t, HARD, key=NO_CLOUD_KEY, model="cloud")
    assert not t.cloud.sim.log
    headers, _ = ask(t, HARD, key=KEY)
    assert headers["x-stream-tier"] == "cloud", "other keys are not affected"


def test_a_keys_budget_is_its_own(three_tiers):
    t = keyed(three_tiers)
    first, _ = ask(t, HARD, key=THRIFTY_KEY, max_tokens=32)
    second, _ = ask(t, HARD, key=THRIFTY_KEY, max_tokens=32)
    other, _ = ask(t, HARD, key=KEY, max_tokens=32)
    assert first["x-stream-tier"] == "cloud"
    assert (second["x-stream-tier"], second["x-stream-route-reason"]) == ("hpc", "budget")
    assert other["x-stream-tier"] == "cloud"


@pytest.mark.parametrize("stream", [True, False])
def test_no_fallback_reaches_a_forbidden_cloud(three_tiers, stream):
    t = three_tiers(sims={"local": {"error_rate": 1.0}, "hpc": {"error_rate": 1.0}},
                    routing={"allow_cloud": False})
    for text in (EASY, HARD):
        with pytest.raises(openai.APIStatusError) as err:
            if stream:
                list(sdk(t).chat.completions.create(
                    model="auto", stream=True, messages=[{"role": "user", "content": text}]))
            else:
                ask(t, text)
        assert err.value.status_code == 503
    assert not t.cloud.sim.log
    assert len(t.local.sim.log) >= 1 and len(t.hpc.sim.log) >= 1


@pytest.mark.parametrize("summarize", [False, True])
def test_a_tier_whose_window_is_too_small_is_skipped_unless_summaries_fit_it(three_tiers,
                                                                             summarize):
    t = three_tiers(sims={"local": {"context_window": 600}},
                    tiers={"local": {"context_window": 600}, "hpc": {"context_window": 4000},
                           "cloud": {"context_window": 4000}},
                    context={"summarize": summarize})
    history = [{"role": "user" if i % 2 == 0 else "assistant",
                "content": f"turn {i}: " + "we measured the sample again and logged it. " * 20}
               for i in range(9)]
    raw = sdk(t).chat.completions.with_raw_response.create(
        model="auto", messages=[*history, {"role": "user", "content": "thanks! all good?"}])
    assert raw.headers["x-stream-complexity"] == "LOW"
    if summarize:
        assert (raw.headers["x-stream-tier"], raw.headers["x-stream-context"]) == (
            "local", "summarized")
        assert all(e.status in (None, 200) for e in t.local.sim.log), "it fitted the window"
    else:
        assert raw.headers["x-stream-tier"] == "hpc"
        assert "context:local-too-small" in raw.headers["x-stream-route-reason"]
        assert not t.local.sim.log
    served = len(t.local.sim.log) + len(t.hpc.sim.log)
    huge = [{"role": "user", "content": "data " * 20000}]
    with pytest.raises(openai.BadRequestError) as err:
        sdk(t).chat.completions.create(model="auto", messages=huge)
    assert err.value.body["code"] == "context_length_exceeded"
    assert len(t.local.sim.log) + len(t.hpc.sim.log) == served and not t.cloud.sim.log, (
        "refused before any backend")


def test_the_llm_judge_asks_the_local_model(three_tiers):
    t = three_tiers(sims={"local": {"reply": "HIGH"}},
                    routing={"judge": {"kind": "llm", "cache_size": 0}})
    headers, reply = ask(t, EASY)
    assert headers["x-stream-judge"] == "llm"
    assert (headers["x-stream-complexity"], headers["x-stream-tier"]) == ("HIGH", "cloud")
    judge_request = t.local.sim.log[0].body
    assert judge_request["max_tokens"] == 4 and EASY in judge_request["messages"][-1]["content"]
    assert reply.choices[0].message.content == answer_text(
        "cloud-m", [{"role": "user", "content": EASY}], 32)


def test_a_junk_answering_llm_judge_falls_back_to_the_classifier(three_tiers):
    t = three_tiers(sims={"local": {"reply": "hmm, hard to say"}},
                    routing={"judge": {"kind": "llm"}})
    headers, _ = ask(t, EASY)
    assert headers["x-stream-judge"] == "llm->classifier"
    assert (headers["x-stream-complexity"], headers["x-stream-tier"]) == ("LOW", "local")


def test_a_request_the_budget_cannot_cover_is_refused_with_429(three_tiers):
    t = keyed(three_tiers)
    ask(t, HARD, key=THRIFTY_KEY, model="cloud", max_tokens=32)  # spends the whole $1
    with pytest.raises(openai.RateLimitError) as err:
        ask(t, HARD, key=THRIFTY_KEY, model="cloud", max_tokens=32)
    assert err.value.body["code"] == "insufficient_quota"
    assert int(err.value.response.headers["retry-after"]) > 0
    assert len(t.cloud.sim.log) == 1, "the refused request reached no backend"
    # Free tiers stay open to the key.
    headers, _ = ask(t, HARD, key=THRIFTY_KEY, model="hpc")
    assert headers["x-stream-tier"] == "hpc"
