"""The `streamllm` command as a user runs it: real processes, real ports."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx2 as httpx
import openai
import pytest

from streamllm.realmodel import MODEL_NAME
from tests.conftest import closed_port, until

STREAMLLM = str(Path(sys.executable).with_name("streamllm"))


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("STREAMLLM_") and k != "OPENROUTER_API_KEY"}
    # The default hpc tier keeps Parsl's run directory in the data directory: not the home.
    env["XDG_DATA_HOME"] = tempfile.mkdtemp(prefix="streamllm-test-")
    return {**env, **extra}


class Running:
    """A `streamllm` process, ready once it logged that startup completed."""

    def __init__(self, args: list[str], env: dict[str, str], ready: str):
        self.proc = subprocess.Popen(
            [STREAMLLM, *args], env=env, stderr=subprocess.PIPE, text=True
        )
        self.log: list[str] = []
        for line in self.proc.stderr:  # blocks on the process's own output, no sleeping
            self.log.append(line)
            if ready in line:
                break
        else:
            raise AssertionError("process exited before it was ready:\n" + "".join(self.log))

    def stop(self) -> str:
        self.proc.terminate()
        rest, _ = self.proc.communicate(timeout=15)
        return "".join(self.log) + (rest or "")


def test_serve_with_no_config_simulates_every_tier_and_says_so():
    port = closed_port()
    env = clean_env(STREAMLLM_SERVER__OLLAMA_URL=f"http://127.0.0.1:{closed_port()}/v1")
    srv = Running(["serve", "--port", str(port)], env, "Uvicorn running on")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x")
        models = {m.id: m for m in client.models.list()}
        for tier in ("local", "hpc", "cloud"):
            assert models[tier].owned_by == "simulator"
        resp = client.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": "hi, quokka here"}]
        )
        assert resp.choices[0].message.content
        # The default hpc tier is the whole dual-channel path: Parsl, the relay, the simulator.
        raw = client.chat.completions.with_raw_response.create(
            model="hpc", messages=[{"role": "user", "content": "quokka on the cluster"}]
        )
        assert raw.headers["x-stream-transport"] == "relay"
        assert raw.parse().choices[0].message.content
        body = httpx.get(f"http://127.0.0.1:{port}/health/ready").json()
        assert body["status"] == "ready" and body["tiers"]["hpc"]["simulated"] is True
    finally:
        log = srv.stop()
    for tier in ("local", "hpc", "cloud"):
        assert f"tier {tier} is SIMULATED" in log
    assert "hi" not in log.split("Uvicorn running on")[-1], "no prompt text in logs"


def test_serve_uses_ollama_when_it_answers(start_sim):
    ollama = start_sim({"llama3.2:3b": {}, "qwen2.5:7b": {}})
    port = closed_port()
    env = clean_env(STREAMLLM_SERVER__OLLAMA_URL=ollama.url)
    srv = Running(["serve", "--port", str(port)], env, "Uvicorn running on")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x")
        models = {m.id: m for m in client.models.list()}
        assert models["local"].owned_by == "ollama"
        assert "local/qwen2.5:7b" in models and models["hpc"].owned_by == "simulator"
        resp = client.chat.completions.create(
            model="local", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=3
        )
        assert resp.usage.completion_tokens == 3
    finally:
        srv.stop()
    assert ollama.sim.log[-1].body["max_tokens"] == 3


def test_serve_refuses_to_bind_beyond_loopback():
    proc = subprocess.run(
        [STREAMLLM, "serve", "--host", "0.0.0.0", "--port", str(closed_port())],
        env=clean_env(), capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.returncode == 2
    assert "refusing to bind 0.0.0.0" in proc.stderr


def test_serve_reports_invalid_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("routing: {allow_clod: false}\n")
    proc = subprocess.run(
        [STREAMLLM, "serve", "--config", str(bad)], env=clean_env(),
        capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.returncode == 2
    assert "routing.allow_clod" in proc.stderr


def test_sim_command_serves_openai_api():
    port = closed_port()
    srv = Running(
        ["sim", "--port", str(port), "--model", "tiny", "--answer-tokens", "4"],
        clean_env(), "simulator on",
    )
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x")
        resp = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}]
        )
        assert resp.usage.completion_tokens == 4
    finally:
        srv.stop()


def test_relay_command_serves_and_requires_a_secret():
    proc = subprocess.run(
        [STREAMLLM, "relay", "--port", str(closed_port())], env=clean_env(),
        capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.returncode == 2 and "secret" in proc.stderr
    proc = subprocess.run(
        [STREAMLLM, "relay", "--host", "0.0.0.0", "--port", str(closed_port())],
        env=clean_env(STREAMLLM_RELAY_SECRET="s" * 32), capture_output=True, text=True,
        timeout=30, check=False
    )
    assert proc.returncode == 2 and "without TLS" in proc.stderr
    port = closed_port()
    srv = Running(["relay", "--port", str(port)],
                  clean_env(STREAMLLM_RELAY_SECRET="s" * 32), "relay on ws://")
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/health").json()["status"] == "ok"
    finally:
        srv.stop()


@pytest.mark.real_model
@pytest.mark.timeout(300)
def test_serve_real_model_answers_with_the_real_model_and_counts_its_tokens_exactly(
        model_server):
    """`streamllm serve --real-model` (what `make run-real` starts): the local tier is the real
    model behind its own server, started and stopped with the gateway."""
    port = closed_port()
    # What `make run-real PORT=...` exports, and variables a shell may hold anyway: the model
    # server must not take them as its own settings (it did: PORT moved it onto our port).
    env = clean_env(STREAMLLM_SERVER__OLLAMA_URL=f"http://127.0.0.1:{closed_port()}/v1",
                    PORT=str(port), HOST="0.0.0.0", API_KEY="not-for-the-model-server")
    srv = Running(["serve", "--port", str(port), "--real-model"], env, "Uvicorn running on")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                               max_retries=0, timeout=120)
        models = {m.id: m for m in client.models.list()}
        assert models["local"].owned_by != "simulator"
        body = {"messages": [{"role": "user", "content": "Name two kinds of trees."}],
                "temperature": 0, "seed": 7, "max_tokens": 24}
        raw = client.chat.completions.with_raw_response.create(model="local", **body)
        answer = raw.parse()
        direct = openai.OpenAI(base_url=model_server.url, api_key="x", max_retries=0)
        expected = direct.chat.completions.create(model=MODEL_NAME, **body)
        assert answer.choices[0].message.content == expected.choices[0].message.content
        assert raw.headers["x-stream-tier"] == "local"
        # Counted with the GGUF's own vocabulary: never under what the server counted.
        counted = int(raw.headers["x-stream-context-tokens-before"])
        assert answer.usage.prompt_tokens <= counted <= answer.usage.prompt_tokens + 1
        served_at = next(line for line in srv.log if "local tier: " in line)
    finally:
        srv.stop()
    url = served_at.rsplit(" at ", 1)[1].split()[0]

    def model_server_gone() -> bool:
        try:
            httpx.get(f"{url}/models", timeout=2)
        except httpx.HTTPError:
            return True
        return False

    # It is told to end when the gateway exits (and takes a moment to do so).
    until(model_server_gone, 30, "the model server to end with the gateway")
