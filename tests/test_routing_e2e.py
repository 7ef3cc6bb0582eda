"""Routing and faults end to end: explicit tiers, auto, fallback, mid-stream death, privacy, cancel."""

from __future__ import annotations

import json

import httpx2 as httpx
import openai
import pytest

from streamllm.sim.content import answer_text
from tests.conftest import closed_port

HELLO = [{"role": "user", "content": "hello, how are you today"}]
HARD = [{
    "role": "user",
    "content": "Derive the variational lower bound for a hierarchical model and design a "
    "rigorous experiment comparing it with MCMC; discuss the trade-offs in depth.",
}]
MEDIUM = [{"role": "user", "content": "Explain how to compute the standard deviation of a list."}]


def sdk(t) -> openai.OpenAI:
    return openai.OpenAI(base_url=t.gateway.v1, api_key="unused", max_retries=0)


def stream_text(client, **kw) -> tuple[str, object]:
    raw = client.chat.completions.with_raw_response.create(stream=True, **kw)
    text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    return text, raw.headers


@pytest.mark.parametrize("tier", ["local", "hpc", "cloud"])
def test_explicit_tier_goes_to_that_tier_only(three_tiers, tier):
    t = three_tiers()
    text, headers = stream_text(sdk(t), model=tier, messages=HARD)
    assert headers["x-stream-tier"] == tier
    assert text == answer_text(f"{tier}-m", HARD, 32)
    for other in ("local", "hpc", "cloud"):
        assert len(t.sim(other).sim.log) == (1 if other == tier else 0)


def test_tier_slash_model_and_alias_and_bare_name(three_tiers):
    t = three_tiers(aliases={"fast": "local", "big": "cloud/cloud-m"})
    c = sdk(t)
    for model, tier in [("hpc/hpc-m", "hpc"), ("fast", "local"), ("big", "cloud"), ("hpc-m", "hpc")]:
        raw = c.chat.completions.with_raw_response.create(model=model, messages=HELLO)
        assert raw.headers["x-stream-tier"] == tier, model


@pytest.mark.parametrize(
    "messages, complexity, tier",
    [(HELLO, "LOW", "local"), (MEDIUM, "MEDIUM", "hpc"), (HARD, "HIGH", "cloud")],
)
def test_auto_routes_by_judged_complexity(three_tiers, messages, complexity, tier):
    t = three_tiers()
    raw = sdk(t).chat.completions.with_raw_response.create(model="auto", messages=messages)
    assert raw.headers["x-stream-complexity"] == complexity
    assert raw.headers["x-stream-tier"] == tier
    assert t.sim(tier).sim.requests_for(f"{tier}-m")[0].outcome == "completed"


@pytest.mark.parametrize("stream", [True, False])
def test_fallback_when_tier_dies_before_first_token(three_tiers, stream):
    t = three_tiers()
    t.local.server.stop()  # the local backend is killed after the gateway saw it healthy
    if stream:
        text, headers = stream_text(sdk(t), model="auto", messages=HELLO)
    else:
        raw = sdk(t).chat.completions.with_raw_response.create(model="auto", messages=HELLO)
        text, headers = raw.parse().choices[0].message.content, raw.headers
    # LOW chain is local -> hpc -> cloud: hpc takes over, invisibly to the client.
    assert headers["x-stream-tier"] == "hpc"
    assert headers["x-stream-fallbacks"] == "1"
    assert text == answer_text("hpc-m", HELLO, 32)


def test_tier_down_at_startup_is_tried_last(three_tiers):
    down = f"http://127.0.0.1:{closed_port()}/v1"
    t = three_tiers(tiers={"local": {"base_url": down}})
    text, headers = stream_text(sdk(t), model="auto", messages=HELLO)
    assert headers["x-stream-tier"] == "hpc"
    assert "x-stream-fallbacks" not in headers  # the probe already knew: nothing was wasted
    assert text == answer_text("hpc-m", HELLO, 32)


def test_fallback_on_backend_500_and_unhealthy_tier_is_tried_last(three_tiers):
    t = three_tiers(sims={"local": {"error_rate": 1.0}})
    text, headers = stream_text(sdk(t), model="auto", messages=HELLO)
    assert headers["x-stream-tier"] == "hpc" and text == answer_text("hpc-m", HELLO, 32)
    assert [r.status for r in t.local.sim.log] == [500]
    # The failure is remembered: the next LOW request goes to hpc first, local is not retried.
    text, headers = stream_text(sdk(t), model="auto", messages=HELLO)
    assert headers["x-stream-tier"] == "hpc"
    assert len(t.local.sim.log) == 1


def test_explicit_tier_down_is_503_without_fallback(three_tiers):
    t = three_tiers(sims={"hpc": {"error_rate": 1.0}})
    with pytest.raises(openai.InternalServerError) as exc:
        sdk(t).chat.completions.create(model="hpc", messages=HELLO)
    assert exc.value.status_code == 503
    assert exc.value.code == "tier_unavailable"
    assert len(t.local.sim.log) == len(t.cloud.sim.log) == 0


def test_backend_dying_mid_stream_gives_partial_text_once_and_error_event(three_tiers):
    t = three_tiers(sims={"local": {"disconnect_after": 7}})
    with httpx.stream(
        "POST", f"{t.gateway.v1}/chat/completions",
        json={"model": "auto", "messages": HELLO, "stream": True}, timeout=10,
    ) as resp:
        assert resp.status_code == 200
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] != "[DONE]"
    error = json.loads(events[-1])["error"]
    assert error["type"] == "upstream_error" and "local" in error["message"]
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == answer_text("local-m", HELLO, 7), "partial text exactly once, nothing repeated"
    # No fallback after the first token: the other tiers never saw the request.
    assert len(t.hpc.sim.log) == len(t.cloud.sim.log) == 0


def test_backend_dying_mid_stream_raises_in_openai_sdk(three_tiers):
    t = three_tiers(sims={"local": {"disconnect_after": 3}})
    stream = sdk(t).chat.completions.create(model="local", messages=HELLO, stream=True)
    seen = ""
    with pytest.raises(openai.APIError):
        for chunk in stream:
            seen += chunk.choices[0].delta.content or ""
    assert seen == answer_text("local-m", HELLO, 3)


def test_stall_before_first_token_falls_back_after_first_token_timeout(three_tiers):
    t = three_tiers(
        sims={"local": {"stall_after": 0, "stall_s": 30}},
        tiers={"local": {"timeouts": {"first_token": 0.3}}},
    )
    _text, headers = stream_text(sdk(t), model="auto", messages=HELLO)
    assert headers["x-stream-tier"] == "hpc"
    assert t.local.sim.wait_until(lambda log: log[0].outcome == "cancelled")


def test_stall_between_tokens_ends_stream_with_error(three_tiers):
    t = three_tiers(
        sims={"local": {"stall_after": 4, "stall_s": 30}},
        tiers={"local": {"timeouts": {"between_tokens": 0.3}}},
    )
    stream = sdk(t).chat.completions.create(model="local", messages=HELLO, stream=True)
    seen = ""
    with pytest.raises(openai.APIError) as exc:
        for chunk in stream:
            seen += chunk.choices[0].delta.content or ""
    assert "stalled between tokens" in str(exc.value)
    assert seen == answer_text("local-m", HELLO, 4)
    assert t.local.sim.wait_until(lambda log: log[0].outcome == "cancelled")


@pytest.mark.parametrize("how", ["config", "body", "header"])
def test_allow_cloud_false_never_reaches_cloud(three_tiers, how):
    # Every free tier fails, so only the cloud could answer: it still must not be asked.
    t = three_tiers(
        sims={"local": {"error_rate": 1.0}, "hpc": {"error_rate": 1.0}},
        routing={"allow_cloud": False} if how == "config" else None,
    )
    kw: dict = {}
    if how == "body":
        kw["extra_body"] = {"allow_cloud": False}
    if how == "header":
        kw["extra_headers"] = {"x-stream-allow-cloud": "false"}
    for messages in (HELLO, MEDIUM, HARD):
        with pytest.raises(openai.APIStatusError) as exc:
            sdk(t).chat.completions.create(model="auto", messages=messages, **kw)
        assert exc.value.status_code == 503
    with pytest.raises(openai.PermissionDeniedError) as exc:
        sdk(t).chat.completions.create(model="cloud", messages=HELLO, **kw)
    assert exc.value.code == "cloud_not_allowed"
    assert list(t.cloud.sim.log) == []
    # STREAM's own field never leaves the gateway.
    assert all("allow_cloud" not in r.body for r in t.local.sim.log)


def test_request_cannot_reallow_cloud_forbidden_by_config(three_tiers):
    t = three_tiers(routing={"allow_cloud": False})
    with pytest.raises(openai.PermissionDeniedError):
        sdk(t).chat.completions.create(
            model="cloud", messages=HELLO, extra_body={"allow_cloud": True}
        )
    assert list(t.cloud.sim.log) == []


def test_client_disconnect_mid_stream_cancels_backend_request(three_tiers):
    t = three_tiers(sims={"local": {"tokens_per_s": 50, "answer_tokens": 500}})
    with httpx.stream(
        "POST", f"{t.gateway.v1}/chat/completions",
        json={"model": "local", "messages": HELLO, "stream": True}, timeout=10,
    ) as resp:
        lines = resp.iter_lines()
        got = [line for line, _ in zip(lines, range(6)) if line.startswith("data: ")]
        assert len(got) >= 2
    # Closing the client connection must reach the backend long before its 10 s answer ends.
    assert t.local.sim.wait_until(lambda log: log and log[0].outcome == "cancelled", timeout=5)
    assert t.local.sim.log[0].tokens_sent < 500


def test_client_disconnect_before_first_token_cancels_backend_request(three_tiers):
    t = three_tiers(sims={"local": {"ttft_ms": 20_000}})
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{t.gateway.v1}/chat/completions",
            json={"model": "local", "messages": HELLO, "stream": True}, timeout=0.5,
        )
    assert t.local.sim.wait_until(lambda log: log and log[0].outcome == "cancelled", timeout=5)


def test_ollama_backend_gets_max_tokens_instead_of_max_completion_tokens(three_tiers):
    t = three_tiers(
        sims={"local": {"honours_max_completion_tokens": False}},
        tiers={"local": {"kind": "ollama"}},
    )
    resp = sdk(t).chat.completions.create(model="local", messages=HELLO, max_completion_tokens=4)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 4
    body = t.local.sim.log[0].body
    assert body["max_tokens"] == 4 and "max_completion_tokens" not in body


def test_unknown_fields_are_passed_on_and_drop_params_removes_them(three_tiers):
    t = three_tiers(tiers={"hpc": {"drop_params": ["repetition_penalty"]}})
    extra = {"top_k": 5, "repetition_penalty": 1.1}
    sdk(t).chat.completions.create(model="local", messages=HELLO, extra_body=extra)
    sdk(t).chat.completions.create(model="hpc", messages=HELLO, extra_body=extra)
    assert t.local.sim.log[0].body["top_k"] == 5
    assert t.local.sim.log[0].body["repetition_penalty"] == 1.1
    assert t.hpc.sim.log[0].body["top_k"] == 5
    assert "repetition_penalty" not in t.hpc.sim.log[0].body


def test_health_ready_reports_each_tier(three_tiers):
    down = f"http://127.0.0.1:{closed_port()}/v1"
    t = three_tiers(tiers={"cloud": {"base_url": down}})
    resp = httpx.get(f"{t.gateway.url}/health/ready")
    body = resp.json()
    assert resp.status_code == 200 and body["status"] == "degraded"
    assert body["tiers"]["local"]["state"] == "up"
    assert body["tiers"]["cloud"]["state"] == "down"
    assert httpx.get(f"{t.gateway.url}/health").json()["status"] == "ok"


def test_rate_limited_everywhere_gives_429(three_tiers):
    t = three_tiers(sims={"hpc": {"rate_limit_rate": 1.0}})
    with pytest.raises(openai.RateLimitError) as exc:
        sdk(t).chat.completions.create(model="hpc", messages=HELLO)
    assert exc.value.response.headers.get("retry-after") == "1"


def test_client_disconnect_during_non_streaming_request_cancels_backend(three_tiers):
    t = three_tiers(sims={"hpc": {"ttft_ms": 20_000}})
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{t.gateway.v1}/chat/completions",
            json={"model": "hpc", "messages": HELLO}, timeout=0.5,
        )
    assert t.hpc.sim.wait_until(lambda log: log and log[0].outcome == "cancelled", timeout=5)
    assert t.hpc.sim.log[0].finished_at - t.hpc.sim.log[0].received_at < 10


def test_status_page_says_what_is_running(three_tiers):
    t = three_tiers(tiers={"cloud": {"enabled": False}})
    page = httpx.get(f"{t.gateway.url}/status")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/v1" in page.text and "hpc-m" in page.text and "cloud" not in page.text
