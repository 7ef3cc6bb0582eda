"""Pure parts without sockets: SSE codec, request adaptation, config."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamllm.config import RoutingSettings, Settings, TierSettings, load_settings
from streamllm.errors import ConfigError, InvalidRequest
from streamllm.protocol.sse import SSEBytesDecoder, encode
from streamllm.tiers.adapt import backend_body

# -- SSE ---------------------------------------------------------------------------------------


@given(st.lists(st.dictionaries(st.text(max_size=5), st.text(max_size=20), max_size=3)))
def test_sse_round_trip(objs):
    import json

    decoder = SSEBytesDecoder()
    out = []
    for obj in objs:
        out += [json.loads(data) for data in decoder.feed(encode(obj))]
    assert out == objs


@given(
    st.lists(
        st.text(
            alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)),
            max_size=12,
        ),
        min_size=1, max_size=6,
    ),
    st.sampled_from(["\n", "\r\n"]),
    st.lists(st.integers(1, 9), max_size=30),
)
def test_sse_bytes_decoder_any_split_any_line_ending(datas, eol, cuts):
    wire = "".join(f": ping{eol}data: {d}{eol}{eol}" for d in datas).encode()
    decoder, out, pos = SSEBytesDecoder(), [], 0
    for cut in cuts:
        out += decoder.feed(wire[pos:pos + cut])
        pos += cut
    out += decoder.feed(wire[pos:]) + decoder.flush()
    assert out == datas


def test_sse_bytes_decoder_multiline_and_unterminated_last_event():

    d = SSEBytesDecoder()
    assert d.feed(b"data: a\r\ndata: b\r") == []
    assert d.feed(b"\n\r\ndata: [DONE]") == ["a\nb"]
    assert d.flush() == ["[DONE]"]


def test_sse_encode_survives_lone_surrogates_and_decode_survives_bad_utf8():
    import json


    out = encode({"content": "\ud800x"})
    assert json.loads(out[6:-2]) == {"content": "\ud800x"}
    assert SSEBytesDecoder().feed(b'data: {"c":"\xff"}\n\n') == ['{"c":"\ufffd"}']


def test_sse_decoder_skips_comments_and_joins_multiline_data():
    d = SSEBytesDecoder()
    assert d.feed(b": keep-alive\n\n") == []
    assert d.feed(b"data: a\ndata:b\n") == []
    assert d.feed(b"\n") == ["a\nb"]


# -- adaptation --------------------------------------------------------------------------------


def test_backend_body_always_asks_for_usage_and_strips_stream_fields():
    tier = TierSettings(kind="vllm", base_url="http://x/v1")
    body = {"model": "auto", "messages": [], "allow_cloud": False, "top_k": 3,
            "stream_options": {"include_usage": False}}
    out = backend_body(body, "m", tier, stream=True)
    assert out["model"] == "m" and out["stream"] is True
    assert out["stream_options"] == {"include_usage": True}
    assert "allow_cloud" not in out and out["top_k"] == 3
    assert body["model"] == "auto", "the client's body is not modified"
    plain = backend_body({**body, "stream": True}, "m", tier, stream=False)
    assert "stream" not in plain and "stream_options" not in plain


def test_backend_body_for_ollama_uses_max_tokens():
    tier = TierSettings(kind="ollama", base_url="http://x/v1", drop_params=["seed"])
    out = backend_body({"max_completion_tokens": 9, "seed": 1}, "m", tier, stream=False)
    assert out == {"model": "m", "max_tokens": 9}


# -- config ------------------------------------------------------------------------------------


def test_env_overrides_nested_fields(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("tiers:\n  hpc:\n    kind: vllm\n    base_url: http://h/v1\n    models: [a]\n")
    s = load_settings(path, environ={
        "STREAMLLM_ROUTING__ALLOW_CLOUD": "false",
        "STREAMLLM_TIERS__HPC__MODELS": "[b, c]",
        "STREAMLLM_SERVER__PORT": "9001",
        "STREAMLLM_LOG_LEVEL": "debug",
        "OTHER": "x",
    })
    assert s.routing.allow_cloud is False
    assert s.tiers["hpc"].models == ["b", "c"] and s.tiers["hpc"].base_url == "http://h/v1"
    assert s.server.port == 9001 and s.server.log_level == "debug"
    assert load_settings(environ={"STREAMLLM_PORT": "9002"}).server.port == 9002


def test_config_file_from_environment_variable(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("server: {port: 7000}\n")
    assert load_settings(environ={"STREAMLLM_CONFIG": str(path)}).server.port == 7000


@pytest.mark.parametrize(
    "yaml_text, fragment",
    [
        ("server: {prot: 1}\n", "server.prot: Extra inputs are not permitted"),
        ("tiers: {hpc: {kind: vllm}}\n", "needs a base_url"),
        ("tiers: {gpu: {}}\n", "tiers.gpu"),
        ("routing: {tier_for: {LOW: moon}}\n", "routing.tier_for.LOW"),
        ("- a\n- b\n", "mapping at the top level"),
        ("server: [\n", "not valid YAML"),
    ],
)
def test_config_errors_name_the_field(tmp_path, yaml_text, fragment):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as exc:
        load_settings(path, environ={})
    assert fragment in str(exc.value)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "absent.yaml", environ={})


def test_defaults_validate():
    s = Settings()
    assert s.server.host == "127.0.0.1" and s.routing.fallback["HIGH"] == ["cloud", "hpc", "local"]


def test_tier_for_leads_the_chain_and_env_labels_are_case_insensitive():
    s = load_settings(environ={"STREAMLLM_ROUTING__TIER_FOR__LOW": "hpc"})
    assert s.routing.tier_for["LOW"] == "hpc"
    assert s.routing.chain("LOW") == ["hpc", "local", "cloud"]
    partial = RoutingSettings(fallback={"HIGH": ["cloud", "hpc"]})
    assert partial.chain("LOW") == ["local", "hpc", "cloud"], "missing chains get every tier"


def test_base_url_without_kind_is_openai_not_simulated():
    assert TierSettings(base_url="http://x/v1").kind == "openai"
    assert TierSettings().simulated


def test_alias_cycles_are_rejected():
    with pytest.raises(ValueError, match="cycle"):
        Settings.model_validate({"aliases": {"a": "b", "b": "a"}})


def test_chunks_are_patched_in_place_or_reencoded_with_the_same_result():
    import json

    from streamllm.gateway.chat import _for_client
    from streamllm.tiers.base import Chunk

    compact = '{"id":"b-1","choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null}'
    spaced = '{"id": "b-1", "choices": [{"index": 0, "delta": {"content": "hi"}}], "usage": null}'
    usage = '{"id":"b-1","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}'
    for raw in (compact, spaced):
        chunk = Chunk(json.loads(raw), raw)
        out = _for_client([chunk], "ours", include_usage=False).decode()
        assert out.startswith("data: ") and out.endswith("\n\n")
        assert json.loads(out[6:]) == {
            "id": "ours", "choices": [{"index": 0, "delta": {"content": "hi"}}]
        }
        out = _for_client([chunk], "ours", include_usage=True).decode()
        assert json.loads(out[6:])["usage"] is None and json.loads(out[6:])["id"] == "ours"
    last = Chunk(json.loads(usage), usage)
    assert _for_client([last], "ours", include_usage=False) == b""
    out = _for_client([last], "ours", include_usage=True).decode()
    assert json.loads(out[6:])["usage"]["total_tokens"] == 3


def test_hpc_tier_settings_are_inferred_and_checked():
    assert TierSettings.model_validate({"hpc": {"control_plane": "local"}}).kind == "hpc"
    plain = TierSettings(kind="hpc")
    assert plain.simulated and plain.hpc is not None and plain.hpc.transport == "relay"
    assert not TierSettings(kind="hpc", base_url="http://node:8000/v1").simulated
    with pytest.raises(ValueError, match="globus.endpoint_id"):
        TierSettings.model_validate({"hpc": {"control_plane": "globus"}})
    with pytest.raises(ValueError, match="ws:// or wss://"):
        TierSettings.model_validate({"hpc": {"relay_url": "https://relay"}})
    with pytest.raises(ValueError, match="kind 'hpc'"):
        TierSettings.model_validate({"kind": "vllm", "base_url": "http://x/v1", "hpc": {}})


def test_hpc_as_api_profile_keeps_everything_on_the_cluster():
    s = Settings.model_validate({"server": {"profile": "hpc-as-api"}})
    assert s.tiers["hpc"].kind == "hpc"
    assert not s.tiers["local"].enabled and not s.tiers["cloud"].enabled
    assert not s.routing.allow_cloud
    assert all(s.routing.chain(level) == ["hpc"] for level in ("LOW", "MEDIUM", "HIGH"))
    with pytest.raises(ValueError, match="kind 'hpc'"):
        Settings.model_validate({"server": {"profile": "hpc-as-api"},
                                 "tiers": {"hpc": {"base_url": "http://x/v1"}}})


def test_globus_control_plane_hands_its_settings_to_the_sdk_executor(monkeypatch):
    # A live endpoint needs Globus credentials and the internet; this checks the wiring.
    import globus_compute_sdk

    from streamllm.config import HPCSettings
    from streamllm.hpc.control import make_control_plane

    made = []

    class RecordingExecutor:
        def __init__(self, **kw):
            made.append(kw)

        def submit(self, fn, *args):
            return ("submitted", fn, args)

        def shutdown(self, wait=True, *, cancel_futures=False):
            made.append({"shutdown": (wait, cancel_futures)})

    monkeypatch.setattr(globus_compute_sdk, "Executor", RecordingExecutor)
    settings = HPCSettings.model_validate({"control_plane": "globus", "globus": {
        "endpoint_id": "4b116d3c-1703-4f8f-9f6f-39921e5864df",
        "user_endpoint_config": {"account": "abc123", "partition": "gpu"}, "amqp_port": 443,
    }})
    plane = make_control_plane(settings, "/tmp/unused")
    assert plane.name == "globus"
    assert made[0]["endpoint_id"] == "4b116d3c-1703-4f8f-9f6f-39921e5864df"
    assert made[0]["user_endpoint_config"] == {"account": "abc123", "partition": "gpu"}
    assert made[0]["amqp_port"] == 443
    assert plane.submit(len, "x") == ("submitted", len, ("x",))
    plane.shutdown()
    assert made[-1] == {"shutdown": (False, True)}


def test_preflight_rejects_hpc_settings_that_could_never_work(monkeypatch):
    from streamllm.gateway.runtime import preflight

    def check(hpc, **tier):
        preflight(Settings.model_validate({"tiers": {"hpc": {"kind": "hpc", "hpc": hpc,
                                                             **tier}}}))

    cluster = {"base_url": "http://gpu-node:8000/v1", "models": ["llama"]}
    globus = {"control_plane": "globus", "globus": {"endpoint_id": "e"}}
    with pytest.raises(ConfigError, match="base_url"):
        check(globus)
    with pytest.raises(ConfigError, match="models"):
        check(globus, base_url="http://gpu-node:8000/v1")
    with pytest.raises(ConfigError, match="relay_url"):
        check({"control_plane": "parsl", "parsl": {"provider": "slurm"}}, **cluster)
    monkeypatch.delenv("STREAMLLM_RELAY_SECRET", raising=False)
    with pytest.raises(ConfigError, match="token secret"):
        check({**globus, "relay_url": "wss://relay.example.edu"}, **cluster)
    monkeypatch.setenv("STREAMLLM_RELAY_SECRET", "s" * 32)
    check({**globus, "relay_url": "wss://relay.example.edu"}, **cluster)  # all set: accepted
    check({**globus, "transport": "batch"}, **cluster)  # no relay needed
    check({"control_plane": "local"})  # the simulator on this machine is fine locally


def test_the_relay_secret_variable_is_not_a_settings_override():
    s = load_settings(environ={"STREAMLLM_RELAY_SECRET": "x" * 40, "STREAMLLM_PORT": "9001"})
    assert s.server.port == 9001


def test_idempotency_keys_are_scoped_to_the_caller():
    from starlette.requests import Request

    from streamllm.gateway.chat import idempotency_key

    def key(auth):
        headers = [(b"idempotency-key", b"retry-1")]
        if auth:
            headers.append((b"authorization", auth.encode()))
        return idempotency_key(Request({"type": "http", "headers": headers}))

    assert key("Bearer sk-a") == key("Bearer sk-a")
    assert key("Bearer sk-a") != key("Bearer sk-b") != key(None)
    with pytest.raises(InvalidRequest):
        idempotency_key(Request({"type": "http", "headers": [(b"idempotency-key", b"a\x01")]}))


def test_preflight_rejects_a_database_url_the_store_cannot_use():
    from streamllm.gateway.runtime import preflight

    for url in ("mysql://root@localhost/x", "sqlite:///plain-driver.db"):
        settings = Settings.model_validate({"server": {"database_url": url}})
        with pytest.raises(ConfigError, match="server.database_url"):
            preflight(settings)


def test_json_logs_carry_the_request_id_and_nothing_else_is_added():
    import io
    import json as _json
    import logging

    from streamllm.logs import JsonFormatter, _RequestId, request_id_var

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(_RequestId())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("streamllm.test-json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        token = request_id_var.set("req-42")
        logger.warning("tier %s failed", "hpc")
        request_id_var.reset(token)
        logger.warning("outside a request")
    finally:
        logger.removeHandler(handler)
    first, second = (_json.loads(line) for line in out.getvalue().splitlines())
    assert first["request_id"] == "req-42" and first["message"] == "tier hpc failed"
    assert first["level"] == "warning" and first["logger"] == "streamllm.test-json"
    assert "request_id" not in second


def test_a_clusters_estimated_wait_counts_down_from_the_agent_furthest_along():
    from types import SimpleNamespace

    from streamllm.config import AgentSettings
    from streamllm.tiers.agents import AgentPool

    now = [1000.0]
    pool = AgentPool("c", AgentSettings(), plane=None,  # type: ignore[arg-type]
                     relay_url="", secret=b"", backend_url="", clock=lambda: now[0])
    assert pool.estimated_wait_s() == 60.0  # nothing known, nothing starting
    pool.startup_seconds = 300.0
    pool.agents["a"] = SimpleNamespace(phase="starting", launched_at=900.0)
    pool.agents["b"] = SimpleNamespace(phase="queued", launched_at=990.0)
    pool.agents["old"] = SimpleNamespace(phase="ready", launched_at=100.0)
    assert pool.estimated_wait_s() == 200.0  # "a" has had 100 of its usual 300 s
    now[0] = 1150.0
    assert pool.estimated_wait_s() == 50.0
    now[0] = 1300.0
    assert pool.estimated_wait_s() == 0.0  # later than usual: any moment now
    pool.agents["a"].phase = pool.agents["b"].phase = "gone"
    assert pool.estimated_wait_s() == 300.0  # none coming: a whole start


async def test_an_agent_back_from_a_lost_connection_settles_what_never_reached_it():
    """Its hello on the new channel names the requests it holds: the others fail at once (they
    go elsewhere) instead of waiting for a result that will not come; a drain said while the
    connection was lost is said again; what was made for the lost connection is not sent on
    the new one; and no replacement is launched while it reconnects."""
    import asyncio
    import concurrent.futures
    import json

    from streamllm.config import AgentSettings
    from streamllm.errors import RelayError
    from streamllm.hpc.agent import epoch_channel, epoch_key
    from streamllm.relay.crypto import Opener, new_key
    from streamllm.relay.frames import Direction
    from streamllm.tiers.agents import Agent, AgentLost, AgentPool

    class Link:
        sent: list[bytes] = []

        async def send(self, frame: bytes) -> None:
            self.sent.append(frame)

    key = new_key()
    pool = AgentPool("c", AgentSettings(min_warm=1, max=1), plane=None,  # type: ignore[arg-type]
                     relay_url="", secret=b"", backend_url="")
    agent = Agent("agent-x", "agent-x", key, launched_at=0.0, walltime_s=60.0,
                  phase="reconnecting", phase_before="ready", lost_at=1.0, epoch=1)
    agent.link = Link()  # type: ignore[assignment]
    pool.agents[agent.id] = agent
    held, lost = concurrent.futures.Future(), concurrent.futures.Future()
    agent.requests = {"held": held, "lost": lost}
    assert pool.desired() == 1 and pool._live() == [agent], "reconnecting counts as live"

    await pool._drain(agent)  # asked while it is away: remembered, not sent
    assert agent.phase == "reconnecting" and not Link.sent
    pool._on_message(agent, {"t": "hello", "phase": "ready", "resync": True,
                             "serving": ["held"]})
    assert isinstance(lost.exception(timeout=0), AgentLost)
    assert not held.done() and list(agent.requests) == ["held"]
    assert agent.phase == "draining" and agent.resumed == 1 and agent.lost_at is None
    await asyncio.gather(*pool._tasks)
    now_on = epoch_channel("agent-x", 1)  # the agent's channel since it came back
    opened = Opener(epoch_key(key, "agent-x", 1), now_on, Direction.UP).open(Link.sent[0])[1]
    assert json.loads(opened) == {"t": "drain"}
    with pytest.raises(RelayError):  # a request (or beat) made on epoch 0, sent after it
        await pool._send(agent, b'{"t":"job"}', 0)
    assert len(Link.sent) == 1
    pool._on_message(agent, {"t": "done", "channel": "held", "result": {"ok": 1}})
    pool._on_message(agent, {"t": "done", "channel": "held", "result": {"ok": 2}})  # again
    assert held.result(timeout=0) == {"ok": 1} and agent.served == 1
