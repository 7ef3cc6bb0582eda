"""HPC-as-API: only the cluster's models, behind API keys, for people with no HPC expertise."""

from __future__ import annotations

import subprocess

import httpx2 as httpx
import openai
import pytest

from streamllm.config import Settings
from streamllm.errors import ConfigError
from streamllm.gateway import create_app
from streamllm.serving import ServerThread
from streamllm.sim.content import answer_text
from tests.conftest import closed_port, hpc_ready
from tests.test_cli import STREAMLLM, clean_env

KEY = "sk-stream-hpc-as-api-test-key-1"
MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def profile(tmp_path, **server) -> Settings:
    return Settings.model_validate({
        "server": {"detect_ollama": False, "data_dir": str(tmp_path), "profile": "hpc-as-api",
                   **server},
        # No base_url: the simulator stands in for the cluster's vLLM, under the real name.
        "tiers": {"hpc": {"kind": "hpc", "models": [MODEL],
                          "hpc": {"control_plane": "local", "local_workers": 2}}},
    })


@pytest.fixture(scope="module")
def hpc_api(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hpcapi")
    keys = tmp / "keys"
    keys.write_text(f"# issued to the genomics group\n{KEY}\n")
    app = create_app(profile(tmp, api_keys_file=str(keys)))
    with ServerThread(app) as server:
        hpc_ready(app)
        yield app, server.url


def test_the_cluster_model_answers_by_its_own_name_through_the_relay(hpc_api):
    app, url = hpc_api
    c = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    messages = [{"role": "user", "content": "explain job arrays"}]
    raw = c.chat.completions.with_raw_response.create(model=MODEL, messages=messages,
                                                      stream=True)
    assert raw.headers["x-stream-tier"] == "hpc"
    assert raw.headers["x-stream-transport"] == "relay"
    text = "".join(ch.choices[0].delta.content or "" for ch in raw.parse() if ch.choices)
    tokens = app.state.runtime.simulator.settings.models[MODEL].answer_tokens
    assert text == answer_text(MODEL, messages, tokens)


def test_only_the_cluster_models_are_listed(hpc_api):
    _, url = hpc_api
    c = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in c.models.list()] == [MODEL]


def test_auto_and_other_tiers_stay_on_the_cluster(hpc_api):
    _, url = hpc_api
    c = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    raw = c.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "prove the four colour theorem"}]
    )
    assert raw.headers["x-stream-tier"] == "hpc"
    with pytest.raises(openai.APIStatusError) as err:
        c.chat.completions.create(model="cloud", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code in (403, 404)


@pytest.mark.parametrize("auth", [None, "Bearer sk-wrong", "Basic " + KEY, "Bearer"])
def test_requests_without_a_valid_key_get_401_in_openai_envelope(hpc_api, auth):
    app, url = hpc_api
    before = len(app.state.runtime.simulator.log)
    headers = {"authorization": auth} if auth else {}
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
        resp = httpx.request(method, f"{url}{path}", headers=headers,
                             json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
        assert resp.status_code == 401
        assert resp.headers["www-authenticate"] == "Bearer"
        err = resp.json()["error"]
        assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
        assert KEY not in resp.text
    assert len(app.state.runtime.simulator.log) == before, "nothing reached the cluster"


def test_the_sdk_sees_an_authentication_error(hpc_api):
    _, url = hpc_api
    c = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-not-issued", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        c.models.list()


def test_health_stays_open_for_operators(hpc_api):
    _, url = hpc_api
    assert httpx.get(f"{url}/health").status_code == 200


def test_the_profile_refuses_to_start_without_keys(tmp_path):
    with pytest.raises(ConfigError, match="requires API keys"):
        create_app(profile(tmp_path))
    proc = subprocess.run(
        [STREAMLLM, "serve", "--port", str(closed_port())],
        env=clean_env(STREAMLLM_SERVER__PROFILE="hpc-as-api",
                      STREAMLLM_SERVER__DATA_DIR=str(tmp_path)),
        capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 2 and "requires API keys" in proc.stderr


def test_serving_beyond_loopback_needs_keys_and_is_allowed_with_them(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(KEY + "\n")
    proc = subprocess.Popen(
        [STREAMLLM, "serve", "--host", "0.0.0.0", "--port", str(closed_port())],
        env=clean_env(STREAMLLM_SERVER__PROFILE="hpc-as-api",
                      STREAMLLM_SERVER__API_KEYS_FILE=str(keys),
                      STREAMLLM_SERVER__DATA_DIR=str(tmp_path),
                      STREAMLLM_TIERS__HPC__HPC__CONTROL_PLANE="local"),
        stderr=subprocess.PIPE, text=True,
    )
    try:
        log = []
        for line in proc.stderr:
            log.append(line)
            if "Uvicorn running on" in line:
                break
        assert "Uvicorn running on http://0.0.0.0" in "".join(log)
        assert KEY not in "".join(log)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_profile_starts_with_a_key_made_in_the_store(tmp_path):
    made = subprocess.run(
        [STREAMLLM, "keys", "create", "--name", "lab"], capture_output=True, text=True,
        timeout=60, env=clean_env(STREAMLLM_SERVER__DATA_DIR=str(tmp_path)), check=False)
    assert made.returncode == 0, made.stderr
    app = create_app(profile(tmp_path))
    with ServerThread(app) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=made.stdout.strip(),
                               max_retries=0)
        assert [m.id for m in client.models.list()] == [MODEL]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope",
                          max_retries=0).models.list()
