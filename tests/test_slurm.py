"""The HPC tier on real parts: Slurm jobs, a real model, the official `openai` SDK.

The Slurm cluster in a box (tests/slurm_box.py) runs Parsl's pilot jobs, warm agents and batch
jobs; the worker inside each job streams SmolLM2-135M-Instruct's tokens from llama-cpp-python's
server back through the relay. Answers are compared with what the model server itself returns
for the same body at temperature 0 with a fixed seed, one request at a time (llama.cpp is only
deterministic that way).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from streamllm.config import Settings
from streamllm.gateway import create_app
from streamllm.realmodel import MODEL_NAME
from streamllm.serving import ServerThread
from tests.conftest import hpc_ready, start_relay, until
from tests.slurm_box import end_process

pytestmark = [pytest.mark.slurm, pytest.mark.real_model, pytest.mark.timeout(300)]

MODEL = f"hpc/{MODEL_NAME}"


@dataclass
class Relay:
    url: str
    secret_file: Path


@pytest.fixture(scope="module")
def relay(tmp_path_factory) -> Iterator[Relay]:
    """`streamllm relay` in a process of its own, which the gateway and the jobs dial out to."""
    secret = tmp_path_factory.mktemp("relay") / "relay.secret"
    secret.write_text(secrets.token_hex(32))
    process, port = start_relay("--secret-file", str(secret))
    try:
        yield Relay(f"ws://127.0.0.1:{port}", secret)
    finally:
        end_process(process)


def slurm_cluster(relay: Relay, model_url: str, partition: str, run_dir: Path,
                  **extra: Any) -> dict:
    """A cluster whose jobs are Parsl pilot jobs on one partition of the box."""
    return {
        "control_plane": "parsl",
        "relay_url": relay.url,
        "relay_secret_file": str(relay.secret_file),
        "base_url": model_url,
        "models": [MODEL_NAME],
        "parsl": {
            "provider": "slurm",
            "max_workers": 4,
            "heartbeat_s": 1,
            "run_dir": str(run_dir),
            "provider_options": {
                "partition": partition,
                # The node is shared by pilot jobs, agents and other partitions' jobs.
                "exclusive": False,
                "walltime": "00:30:00",
                "init_blocks": 1, "min_blocks": 1, "max_blocks": 1,
            },
        },
        **extra,
    }


def body(question: str, max_tokens: int = 40) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": question}], "temperature": 0,
            "seed": 7, "max_tokens": max_tokens}


def direct_answer(model_server, question: str, max_tokens: int = 40) -> str:
    """What the model server itself says for the same body."""
    client = openai.OpenAI(base_url=model_server.url, api_key="unused", max_retries=0)
    done = client.chat.completions.create(model=MODEL_NAME, **body(question, max_tokens))
    return done.choices[0].message.content or ""


def streamed(url: str, question: str, max_tokens: int = 40,
             key: str = "unused") -> tuple[str, str | None, dict]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, stream=True, **body(question, max_tokens))
    text, finish = "", None
    for chunk in raw.parse():
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    return text, finish, dict(raw.headers)


def start_gateway(tmp: Path, clusters: dict[str, dict], **more: Any) -> tuple[Any, ServerThread]:
    """A gateway whose only tier is `hpc` with these clusters; `more`: other sections or
    `server` settings (API keys)."""
    server = {"detect_ollama": False, "data_dir": str(tmp), **more.pop("server", {})}
    settings = Settings.model_validate({
        "server": server,
        "tiers": {"hpc": {"kind": "hpc", "clusters": clusters},
                  "local": {"enabled": False}, "cloud": {"enabled": False}},
        **more,
    })
    app = create_app(settings)
    return app, ServerThread(app).start(timeout=120)


@pytest.fixture(scope="module")
def campus(slurm_box, model_server, relay, tmp_path_factory) -> Iterator[tuple[Any, str]]:
    """A gateway whose one cluster runs its jobs in a Parsl pilot job on partition `gpu`."""
    tmp = tmp_path_factory.mktemp("campus")
    app, server = start_gateway(tmp, {"campus": slurm_cluster(relay, model_server.url, "gpu",
                                                              tmp / "parsl")})
    try:
        hpc_ready(app, timeout=120)
        yield app, server.url
    finally:
        server.stop()


def test_a_request_runs_in_a_slurm_job_and_streams_the_real_models_answer(
        campus, model_server, slurm_box):
    _, url = campus
    question = "Name three planets of the solar system."
    expected = direct_answer(model_server, question)
    assert expected.strip(), "the model server answered nothing"
    text, finish, headers = streamed(url, question)
    assert text == expected
    assert finish in ("stop", "length")
    assert headers["x-stream-dispatch"] == "job"
    assert headers["x-stream-transport"] == "relay"
    # The worker that ran it is in a Parsl pilot job that Slurm is running on partition gpu.
    pilots = [j for j in slurm_box.jobs() if j["partition"] == "gpu" and j["state"] == "R"]
    assert pilots and all(j["name"].startswith("parsl") for j in pilots), slurm_box.jobs()


def test_requests_one_after_another_each_get_their_own_answer(campus, model_server):
    _, url = campus
    for question in ("What is 2 plus 2?", "Say hello in French."):
        assert streamed(url, question)[0] == direct_answer(model_server, question)


def test_a_warm_agent_in_a_slurm_pilot_job_streams_the_real_models_answer(
        slurm_box, model_server, relay, tmp_path):
    """The agent is a long-running task in the cluster's Parsl pilot job (partition gpu2)."""
    agents = {"min_warm": 1, "max": 1, "walltime_s": 1200, "replace_before_s": 60,
              "heartbeat_s": 1}
    app, server = start_gateway(tmp_path, {"campus": slurm_cluster(
        relay, model_server.url, "gpu2", tmp_path / "parsl", agents=agents)})
    try:
        pool = app.state.runtime.backends["hpc"].clusters[0].pool
        until(lambda: len(pool.ready()) == 1, 120, "the agent to be ready")
        question = "What colour is the sky on a clear day?"
        text, _, headers = streamed(server.url, question)
        assert headers["x-stream-dispatch"] == "agent"
        assert text == direct_answer(model_server, question)
        assert any(j["partition"] == "gpu2" and j["state"] == "R" for j in slurm_box.jobs())
    finally:
        server.stop()
