"""The official openai SDK, sync and async, against the gateway over real sockets."""

from __future__ import annotations

import openai
import pytest

from streamllm.sim.content import answer_text

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def tiers(three_tiers):
    return three_tiers(sims={"local": {"answer_tokens": 12}, "hpc": {"answer_tokens": 20}})


def client(tiers) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiers.gateway.v1, api_key="unused", max_retries=0)


def test_non_streaming_returns_backend_answer_and_usage(tiers):
    resp = client(tiers).chat.completions.create(model="local", messages=MESSAGES)
    assert resp.choices[0].message.content == answer_text("local-m", MESSAGES, 12)
    assert resp.choices[0].finish_reason == "stop"
    assert resp.model == "local-m"
    assert resp.usage is not None and resp.usage.completion_tokens == 12
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 12


def test_streaming_without_include_usage_has_no_usage(tiers):
    stream = client(tiers).chat.completions.create(model="hpc", messages=MESSAGES, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer_text("hpc-m", MESSAGES, 20)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks), "no usage-only chunk when the client did not ask"
    # The gateway still asked the backend for usage (for accounting).
    sent = tiers.hpc.sim.requests_for("hpc-m")[-1].body
    assert sent["stream_options"] == {"include_usage": True}


def test_streaming_with_include_usage_ends_with_usage_chunk(tiers):
    stream = client(tiers).chat.completions.create(
        model="local", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None and last.usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_max_completion_tokens_gives_length_finish(tiers):
    resp = client(tiers).chat.completions.create(
        model="hpc", messages=MESSAGES, max_completion_tokens=5
    )
    assert resp.choices[0].finish_reason == "length"
    assert resp.choices[0].message.content == answer_text("hpc-m", MESSAGES, 5)


def test_unknown_model_raises_not_found(tiers):
    with pytest.raises(openai.NotFoundError) as exc:
        client(tiers).chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert exc.value.code == "model_not_found"


def test_bad_temperature_raises_bad_request(tiers):
    with pytest.raises(openai.BadRequestError) as exc:
        client(tiers).chat.completions.create(model="local", messages=MESSAGES, temperature=5)
    assert exc.value.param == "temperature"
    assert tiers.local.sim.log == type(tiers.local.sim.log)(), "bad input reached no backend"


def test_context_overflow_raises_bad_request_with_code(three_tiers):
    tiers = three_tiers(
        sims={t: {"context_window": 64} for t in ("local", "hpc", "cloud")}
    )
    long = [{"role": "user", "content": "word " * 200}]
    with pytest.raises(openai.BadRequestError) as exc:
        client(tiers).chat.completions.create(model="auto", messages=long)
    assert exc.value.code == "context_length_exceeded"
    assert "maximum context length" in str(exc.value)


def test_models_list_and_retrieve(tiers):
    c = client(tiers)
    ids = [m.id for m in c.models.list()]
    for expected in ("auto", "local", "hpc", "cloud", "local/local-m", "hpc/hpc-m", "cloud/cloud-m"):
        assert expected in ids
    assert c.models.retrieve("hpc/hpc-m").id == "hpc/hpc-m"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("nope")


def test_tool_call_streams_through(tiers):
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    stream = client(tiers).chat.completions.create(
        model="local", messages=MESSAGES, tools=tools, tool_choice="required", stream=True
    )
    name, args, finish = "", "", None
    for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or ():
                name += call.function.name or ""
                args += call.function.arguments or ""
            finish = choice.finish_reason or finish
    assert name == "lookup" and finish == "tool_calls"
    assert args.startswith('{"query":')


async def test_async_client_streaming_and_not(tiers):
    c = openai.AsyncOpenAI(base_url=tiers.gateway.v1, api_key="unused", max_retries=0)
    resp = await c.chat.completions.create(model="local", messages=MESSAGES)
    assert resp.choices[0].message.content == answer_text("local-m", MESSAGES, 12)
    stream = await c.chat.completions.create(
        model="local", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    text, usage = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        usage = chunk.usage or usage
    assert text == answer_text("local-m", MESSAGES, 12)
    assert usage is not None and usage.completion_tokens == 12
    with pytest.raises(openai.NotFoundError):
        await c.chat.completions.create(model="local/other", messages=MESSAGES)
    await c.close()


def test_response_headers_say_where_it_went(tiers):
    raw = client(tiers).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
    h = raw.headers
    assert h["x-stream-tier"] == "local"
    assert h["x-stream-model"] == "local-m"
    assert h["x-stream-complexity"] == "LOW"
    assert float(h["x-stream-overhead-ms"]) >= 0
    assert len(h["x-request-id"]) >= 16
    assert raw.parse().id == f"chatcmpl-{h['x-request-id']}"


def test_curl_streams_sse_exactly_as_openai_sends_it(tiers):
    import json
    import shutil
    import subprocess

    curl = shutil.which("curl")
    if curl is None:  # curl is part of the documented quick start, so CI must have it
        pytest.fail("curl is not installed")
    body = json.dumps({"model": "local", "stream": True, "messages": MESSAGES})
    out = subprocess.run(
        [curl, "-sN", "-D", "-", f"{tiers.gateway.v1}/chat/completions",
         "-H", "content-type: application/json", "-d", body],
        capture_output=True, timeout=30, check=True,
    ).stdout.decode()
    head, _, stream = out.partition("\r\n\r\n")
    assert "content-type: text/event-stream" in head.lower()
    assert "cache-control: no-cache" in head.lower()
    assert "x-accel-buffering: no" in head.lower()
    events = stream.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == answer_text("local-m", MESSAGES, 12)


def test_total_timeout_fails_over_for_non_streaming(three_tiers):
    t = three_tiers(
        sims={"local": {"ttft_ms": 5_000}}, tiers={"local": {"timeouts": {"total": 0.3}}}
    )
    resp = client(t).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
    assert resp.headers["x-stream-tier"] == "hpc"
    assert resp.headers["x-stream-fallbacks"] == "1"
