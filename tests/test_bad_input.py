"""Bad input gets a clear 4xx in OpenAI's envelope, reaches no backend, and never causes a 5xx."""

from __future__ import annotations

import json

import httpx2 as httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

OK_MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """One gateway over one simulator for the whole module (the fuzz sends many requests)."""
    from streamllm.config import Settings, SimModelSettings, SimSettings
    from streamllm.gateway import create_app
    from streamllm.serving import ServerThread
    from streamllm.sim.app import Simulator

    sim = Simulator(SimSettings(models={"m": SimModelSettings(answer_tokens=4)}))
    with ServerThread(sim.app) as sim_server:
        settings = Settings.model_validate({
            "server": {"detect_ollama": False, "max_body_bytes": 64 * 1024,
                       "data_dir": str(tmp_path_factory.mktemp("gw"))},
            "tiers": {
                "local": {"kind": "vllm", "base_url": f"{sim_server.url}/v1", "models": ["m"]},
                "hpc": {"enabled": False},
                "cloud": {"enabled": False},
            },
        })
        with ServerThread(create_app(settings)) as gw:
            with httpx.Client(base_url=gw.url, timeout=10) as client:
                yield client, sim


def post(client: httpx.Client, content: bytes | str, **headers: str) -> httpx.Response:
    return client.post(
        "/v1/chat/completions",
        content=content,
        headers={"content-type": "application/json", **headers},
    )


def assert_envelope(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param
    assert resp.headers["x-request-id"]
    return err


@pytest.mark.parametrize(
    "body, param, fragment",
    [
        (b"{not json", None, "not valid JSON"),
        (b"", None, "empty"),
        (b"[1, 2]", None, "JSON object"),
        (b'"text"', None, "JSON object"),
        (json.dumps({"model": "local"}), "messages", "required"),
        (json.dumps({"model": "local", "messages": []}), "messages", "at least 1"),
        (json.dumps({"model": "local", "messages": "hi"}), "messages", ""),
        (json.dumps({"model": "local", "messages": [{"content": "x"}]}), "messages[0].role", ""),
        (json.dumps({"model": "local", "messages": [{"role": "wizard", "content": "x"}]}),
         "messages[0].role", ""),
        (json.dumps({"messages": OK_MESSAGES, "temperature": 2.5}), "temperature", "less than"),
        (json.dumps({"messages": OK_MESSAGES, "temperature": "hot"}), "temperature", ""),
        (json.dumps({"messages": OK_MESSAGES, "top_p": -0.1}), "top_p", ""),
        (json.dumps({"messages": OK_MESSAGES, "n": 0}), "n", ""),
        (json.dumps({"messages": OK_MESSAGES, "max_tokens": 0}), "max_tokens", ""),
        (json.dumps({"messages": OK_MESSAGES, "stream": "yes please"}), "stream", ""),
        (json.dumps({"messages": OK_MESSAGES, "model": 7}), "model", ""),
        (json.dumps({"messages": OK_MESSAGES, "model": ""}), "model", ""),
        (json.dumps({"messages": OK_MESSAGES, "stop": ["a", "b", "c", "d", "e"]}), "stop", ""),
        (json.dumps({"messages": OK_MESSAGES, "presence_penalty": 3}), "presence_penalty", ""),
        (json.dumps({"messages": OK_MESSAGES, "top_logprobs": 3}), "top_logprobs", "logprobs"),
        (json.dumps({"messages": [{"role": "user", "content": [{"type": "video"}]}]}),
         "messages[0].content[0]", ""),
    ],
)
def test_bad_request_is_400_in_envelope_and_reaches_no_backend(gateway, body, param, fragment):
    client, sim = gateway
    before = len(sim.log)
    err = assert_envelope(post(client, body), 400, param)
    assert err["type"] == "invalid_request_error"
    assert fragment in err["message"]
    assert len(sim.log) == before


def test_oversized_body_is_413(gateway):
    client, sim = gateway
    before = len(sim.log)
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 70_000}]})
    err = assert_envelope(post(client, big), 413)
    assert err["code"] == "request_too_large"
    assert len(sim.log) == before


def test_oversized_chunked_body_without_length_is_413(gateway):
    client, _ = gateway

    def body():
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(80):
            yield b"y" * 1024
        yield b'"}]}'

    resp = client.post(
        "/v1/chat/completions", content=body(), headers={"content-type": "application/json"}
    )
    assert_envelope(resp, 413)


def test_unknown_fields_are_accepted(gateway):
    client, sim = gateway
    resp = post(client, json.dumps({
        "model": "local", "messages": OK_MESSAGES, "frobnicate": {"deep": [1, 2]}, "top_k": 3,
    }))
    assert resp.status_code == 200, resp.text
    assert sim.log[-1].body["frobnicate"] == {"deep": [1, 2]}


def test_content_parts_and_assistant_tool_calls_are_accepted(gateway):
    client, _ = gateway
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [
            {"type": "text", "text": "what is in this picture?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        ]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
        {"role": "user", "content": "and so?"},
    ]
    resp = post(client, json.dumps({"model": "local", "messages": messages}))
    assert resp.status_code == 200, resp.text


def test_wrong_method_and_unknown_path_use_the_envelope(gateway):
    client, _ = gateway
    assert_envelope(client.get("/v1/chat/completions"), 405)
    assert_envelope(client.get("/v1/nothing-here"), 404)


# -- fuzz ---------------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(
    allow_nan=False, allow_infinity=False
) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)
roles = st.sampled_from(["system", "user", "assistant", "tool", "developer", "x", 3, None])
messages = st.lists(
    st.fixed_dictionaries(
        {"role": roles},
        optional={
            "content": st.text(max_size=30) | json_values,
            "name": json_values,
            "tool_calls": json_values,
        },
    ),
    max_size=3,
)
fields = {
    "model": st.sampled_from(["auto", "local", "hpc", "cloud", "local/m", "m", "x"]) | json_values,
    "messages": messages | json_values,
    "stream": st.booleans() | json_values,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | json_values,
    "temperature": st.floats(-1, 3) | json_values,
    "top_p": st.floats(-0.5, 1.5) | json_values,
    "max_tokens": st.integers(-5, 50) | json_values,
    "max_completion_tokens": st.integers(-5, 50) | json_values,
    "n": st.integers(-1, 3) | json_values,
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=3), max_size=5) | json_values,
    "seed": st.integers() | json_values,
    "tools": json_values,
    "tool_choice": st.sampled_from(["none", "auto", "required"]) | json_values,
    "response_format": st.sampled_from([{"type": "json_object"}, {"type": "text"}]) | json_values,
    "logprobs": st.booleans() | json_values,
    "top_logprobs": st.integers(-1, 25) | json_values,
    "presence_penalty": st.floats(-3, 3) | json_values,
    "user": json_values,
    "allow_cloud": json_values,
}
bodies = st.fixed_dictionaries({}, optional=fields) | json_values


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies)
def test_fuzzed_bodies_never_cause_5xx(gateway, body):
    client, _ = gateway
    resp = post(client, json.dumps(body))
    assert resp.status_code < 500, (body, resp.text)
    if resp.status_code >= 400:
        assert_envelope(resp, resp.status_code)
    elif isinstance(body, dict) and body.get("stream") is True:
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert "data: [DONE]" in resp.text or '"error"' in resp.text


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200))
def test_fuzzed_raw_bytes_never_cause_5xx(gateway, raw):
    client, _ = gateway
    resp = post(client, raw)
    assert resp.status_code < 500, (raw, resp.text)
