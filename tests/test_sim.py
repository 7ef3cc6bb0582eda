"""The simulator behaves like vLLM's OpenAI server where tests and benchmarks rely on it."""

from __future__ import annotations

import json

import httpx2 as httpx
import pytest

from streamllm.sim import content

MSG = [{"role": "user", "content": "tell me something"}]


def chat(sim, **body):
    body.setdefault("model", "sim-model")
    body.setdefault("messages", MSG)
    return httpx.post(f"{sim.url}/chat/completions", json=body, timeout=10)


def sse_events(resp: httpx.Response) -> list:
    return [
        line[6:] for line in resp.text.splitlines() if line.startswith("data: ")
    ]


def test_answer_is_deterministic_and_depends_on_prompt():
    a = content.answer_text("m", MSG, 10)
    assert a == content.answer_text("m", MSG, 10)
    assert a != content.answer_text("m", [{"role": "user", "content": "other"}], 10)
    assert a != content.answer_text("other-model", MSG, 10)
    assert len(content.answer_tokens("m", MSG, 10)) == 10


def test_stop_sequence_cuts_before_it():
    tokens = ["alpha", " beta", " gamma"]
    assert content.apply_stop(tokens, " gam") == (["alpha", " beta"], True)
    assert content.apply_stop(tokens, ["ta g"]) == (["alpha", " be"], True)
    assert content.apply_stop(tokens, "zzz") == (tokens, False)


def test_context_window_overflow_is_vllm_400(start_sim):
    sim = start_sim({"sim-model": {"context_window": 50}})
    resp = chat(sim, messages=[{"role": "user", "content": "w " * 60}])
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert err["message"].startswith("This model's maximum context length is 50 tokens.")
    assert sim.sim.log[0].outcome == "error"
    # max_tokens counts against the window too
    resp = chat(sim, max_tokens=45)
    assert resp.status_code == 400 and "45 in the completion" in resp.json()["error"]["message"]


def test_stream_with_usage_and_n(start_sim):
    sim = start_sim({"sim-model": {"answer_tokens": 5}})
    resp = chat(sim, stream=True, n=2, stream_options={"include_usage": True})
    events = sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    texts = {0: "", 1: ""}
    for c in chunks:
        for ch in c["choices"]:
            texts[ch["index"]] += ch["delta"].get("content") or ""
    assert texts[0] == content.answer_text("sim-model", MSG, 5, 0)
    assert texts[1] == content.answer_text("sim-model", MSG, 5, 1)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 10
    assert all("usage" in c for c in chunks)  # null until the last, as OpenAI does


def test_faults_500_and_429(start_sim):
    sim = start_sim({"sim-model": {"error_rate": 1.0}, "limited": {"rate_limit_rate": 1.0}})
    assert chat(sim).status_code == 500
    resp = chat(sim, model="limited")
    assert resp.status_code == 429 and resp.headers["retry-after"] == "1"
    assert [r.status for r in sim.sim.log] == [500, 429]


def test_fault_rate_is_a_probability(start_sim):
    sim = start_sim({"sim-model": {"error_rate": 0.5}}, seed=7)
    statuses = [chat(sim).status_code for _ in range(60)]
    assert 10 < statuses.count(500) < 50
    assert set(statuses) == {200, 500}


def test_disconnect_after_n_tokens_breaks_the_connection(start_sim):
    sim = start_sim({"sim-model": {"disconnect_after": 3}})
    received = ""
    with pytest.raises(httpx.RemoteProtocolError):
        with httpx.stream("POST", f"{sim.url}/chat/completions", timeout=10,
                          json={"model": "sim-model", "messages": MSG, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    delta = json.loads(line[6:])["choices"][0]["delta"]
                    received += delta.get("content") or ""
    assert received == content.answer_text("sim-model", MSG, 3)
    assert sim.sim.log[0].outcome == "disconnected"


def test_unknown_model_is_404_and_request_log_is_readable_over_http(start_sim):
    sim = start_sim()
    assert chat(sim, model="nope").status_code == 404
    log = httpx.get(f"{sim.server.url}/sim/requests").json()
    assert log[0]["model"] == "nope" and log[0]["status"] == 404
    assert httpx.delete(f"{sim.server.url}/sim/requests").status_code == 204
    assert httpx.get(f"{sim.server.url}/sim/requests").json() == []


def test_json_response_format_and_logprobs(start_sim):
    sim = start_sim({"sim-model": {"answer_tokens": 4}})
    resp = chat(sim, response_format={"type": "json_object"}, logprobs=True, top_logprobs=1)
    choice = resp.json()["choices"][0]
    assert json.loads(choice["message"]["content"]) == {
        "answer": content.answer_text("sim-model", MSG, 4)
    }
    assert choice["logprobs"]["content"][0]["top_logprobs"]


def test_ttft_and_rate_are_respected(start_sim):
    sim = start_sim({"sim-model": {"ttft_ms": 150, "tokens_per_s": 100, "answer_tokens": 11}})
    resp = chat(sim, stream=True)
    entry = sim.sim.log[0]
    # 150 ms to the first token, then 10 more at 100/s: at least 250 ms in all.
    assert entry.finished_at - entry.received_at >= 0.25
    assert sse_events(resp)[-1] == "[DONE]"


def test_prefill_makes_a_longer_prompt_wait_longer(start_sim):
    # The simulator schedules the first token at ttft + prompt / prefill rate: it can only be
    # late, never early, so a lower bound is safe to check.
    import time

    sim = start_sim({"sim-model": {"prefill_tokens_per_s": 1000, "answer_tokens": 1}})
    long = [{"role": "user", "content": "word " * 400}]
    started = time.monotonic()
    resp = chat(sim, messages=long)
    assert resp.status_code == 200
    prompt = resp.json()["usage"]["prompt_tokens"]
    assert time.monotonic() - started >= prompt / 1000


def test_a_fixed_reply_is_answered_verbatim(start_sim):
    sim = start_sim({"sim-model": {"reply": "MEDIUM"}})
    assert chat(sim).json()["choices"][0]["message"]["content"] == "MEDIUM"
    sim.model("sim-model").reply = ""
    resp = chat(sim, stream=True)
    texts = [json.loads(e)["choices"][0]["delta"].get("content") for e in sse_events(resp)
             if e != "[DONE]" and json.loads(e).get("choices")]
    assert not any(texts)
