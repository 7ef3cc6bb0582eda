"""The HPC tier on the `slurm` control plane: each request, agent and batch chunk is a Slurm job
of its own in the cluster in a box, charged to its caller's account, answering with the real
model's tokens through a separate relay, read with the official `openai` SDK.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from streamllm.realmodel import MODEL_NAME
from tests.conftest import STREAMLLM, hpc_ready, until
from tests.test_slurm import MODEL, Relay, body, direct_answer, relay, start_gateway, streamed

__all__ = ["relay"]  # the module-scoped relay fixture, shared with tests/test_slurm.py

pytestmark = [pytest.mark.slurm, pytest.mark.real_model, pytest.mark.timeout(300)]

ALICE, BOB, CAROL = "sk-alice-0123456789", "sk-bob-0123456789", "sk-carol-0123456789"
KEYS = [{"key": ALICE, "name": "alice"}, {"key": BOB, "name": "bob"},
        {"key": CAROL, "name": "carol"}]
# carol is not mapped: the default account. dana's key is made with `streamllm keys create`.
ACCOUNTS = {"alice": "chem-123", "bob": "phys-7", "dana": "astro-9"}
DEFAULT_ACCOUNT = "stream-svc"


def sbatch_cluster(relay: Relay, model_url: str, partition: str, work_dir: Path,
                   **extra: Any) -> dict[str, Any]:
    """A cluster whose jobs this gateway submits with `sbatch` itself, one per request."""
    return {
        "control_plane": "slurm",
        "relay_url": relay.url,
        "relay_secret_file": str(relay.secret_file),
        "base_url": model_url,
        "models": [MODEL_NAME],
        "slurm": {"partition": partition, "account": DEFAULT_ACCOUNT, "poll_s": 0.5,
                  "walltime": "00:10:00", "work_dir": str(work_dir)},
        **extra,
    }


def job_fields(box, job_id: str) -> dict[str, str]:
    """What the scheduler says of one job, ended ones included (for MinJobAge, 300 s)."""
    out = box.command("squeue", "-h", "--states=all", f"--jobs={job_id}",
                      "-o", "%j|%a|%k|%T|%P|%Z").strip()
    keys = ("JobName", "Account", "Comment", "JobState", "Partition", "WorkDir")
    return dict(zip(keys, out.split("|"), strict=True))


@pytest.fixture(scope="module")
def campus(slurm_box, model_server, relay, tmp_path_factory) -> Iterator[tuple[Any, str]]:
    tmp = tmp_path_factory.mktemp("sbatch-campus")
    cluster = sbatch_cluster(relay, model_server.url, "gpu", tmp / "slurm", accounts=ACCOUNTS)
    app, server = start_gateway(tmp, {"campus": cluster}, server={"api_keys": KEYS})
    try:
        hpc_ready(app, timeout=120)
        yield app, server.url, tmp
    finally:
        server.stop()


def test_each_request_is_a_slurm_job_of_its_own_with_the_real_models_answer(
        campus, model_server, slurm_box):
    _, url, _ = campus
    question = "Name a large ocean."
    text, finish, headers = streamed(url, question, key=CAROL)
    assert text == direct_answer(model_server, question)
    assert finish in ("stop", "length")
    assert headers["x-stream-dispatch"] == "job"
    assert headers["x-stream-transport"] == "relay"
    job = job_fields(slurm_box, headers["x-stream-hpc-job"])
    assert job["JobName"] == "stream-completion" and job["Partition"] == "gpu"
    # It ends once its worker has returned (it may still be exiting as the answer arrives).
    assert job["JobState"] in ("RUNNING", "COMPLETING", "COMPLETED")


def test_keys_run_under_their_accounts_and_an_unmapped_key_under_the_default(
        campus, slurm_box):
    _, url, data_dir = campus
    # A key made the way an operator makes one, in the gateway's own store.
    config = data_dir / "keys.yaml"
    config.write_text(f"server:\n  data_dir: {data_dir}\n")
    made = subprocess.run([STREAMLLM, "keys", "create", "--name", "dana", "--config",
                           str(config)], capture_output=True, text=True, timeout=60, check=False)
    assert made.returncode == 0, made.stderr
    dana = made.stdout.strip()
    seen = {}
    for key, name in ((ALICE, "alice"), (BOB, "bob"), (CAROL, "carol"), (dana, "dana")):
        text, _, headers = streamed(url, "Say one word.", max_tokens=8, key=key)
        assert text
        assert headers["x-stream-dispatch"] == "job"
        job = job_fields(slurm_box, headers["x-stream-hpc-job"])
        seen[name] = job["Account"]
        assert job["Comment"].startswith(f"streamllm caller={name} ref="), job
    assert seen == {"alice": "chem-123", "bob": "phys-7", "carol": DEFAULT_ACCOUNT,
                    "dana": "astro-9"}


def test_warm_agents_are_slurm_jobs_and_scancel_mid_stream_names_the_job(
        slurm_box, model_server, relay, tmp_path):
    agents = {"min_warm": 1, "max": 1, "walltime_s": 1200, "replace_before_s": 60,
              "heartbeat_s": 1}
    app, server = start_gateway(tmp_path, {"campus": sbatch_cluster(
        relay, model_server.url, "gpu2", tmp_path / "slurm", agents=agents,
        accounts={"alice": "chem-123"})}, server={"api_keys": KEYS})
    try:
        pool = app.state.runtime.backends["hpc"].clusters[0].pool
        until(lambda: len(pool.ready()) == 1, 120, "the agent to be ready")
        first = pool.ready()[0]
        agent_job = job_fields(slurm_box, first.job_id)
        assert agent_job["JobName"] == "stream-agent" and agent_job["JobState"] == "RUNNING"
        assert agent_job["Partition"] == "gpu2" and agent_job["Account"] == DEFAULT_ACCOUNT
        assert agent_job["Comment"].startswith("streamllm agent ")

        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=CAROL, max_retries=0,
                               timeout=120)
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, stream=True, **{**body("Write a long story about a lighthouse."),
                                         "max_tokens": 1500})
        assert raw.headers["x-stream-dispatch"] == "agent"
        assert raw.headers["x-stream-hpc-job"] == first.job_id
        text = ""
        with pytest.raises(openai.APIError) as failure:
            for chunk in raw.parse():
                for choice in chunk.choices:
                    text += choice.delta.content or ""
                if text and slurm_box.jobs() and first.job_id in {
                        j["id"] for j in slurm_box.jobs()}:
                    slurm_box.command("scancel", first.job_id)
        assert text, "the text already sent came first"
        message = str(failure.value.message)
        assert f"Slurm job {first.job_id} ended CANCELLED" in message, message

        # A new agent takes its place, as a new Slurm job, and serves the next request.
        until(lambda: pool.ready() and pool.ready()[0].job_id != first.job_id, 120,
              "a new agent")
        question = "What is the capital of Italy?"
        answer, _, headers = streamed(server.url, question, key=CAROL)
        assert headers["x-stream-dispatch"] == "agent"
        assert headers["x-stream-hpc-job"] == pool.ready()[0].job_id != first.job_id
        assert answer == direct_answer(model_server, question)
        # A caller charged to an account of their own never rides the service's agent.
        answer, _, headers = streamed(server.url, question, key=ALICE)
        assert headers["x-stream-dispatch"] == "job"
        assert job_fields(slurm_box, headers["x-stream-hpc-job"])["Account"] == "chem-123"
        assert answer == direct_answer(model_server, question)
    finally:
        server.stop()


def test_two_partitions_behind_one_model_name_and_one_refusing_jobs(
        slurm_box, model_server, relay, tmp_path):
    """Federation: clusters `east` (partition gpu) and `west` (gpu2) both serve the model; when
    the scheduler refuses jobs on the partition that served, the other one answers."""
    clusters = {"east": sbatch_cluster(relay, model_server.url, "gpu", tmp_path / "east"),
                "west": sbatch_cluster(relay, model_server.url, "gpu2", tmp_path / "west")}
    app, server = start_gateway(tmp_path, clusters)
    partitions = {"east": "gpu", "west": "gpu2"}
    closed = None
    try:
        hpc_ready(app, timeout=120)
        question = "Name a primary colour."
        expected = direct_answer(model_server, question)
        text, _, headers = streamed(server.url, question)
        assert text == expected
        served = headers["x-stream-cluster"]
        assert job_fields(slurm_box, headers["x-stream-hpc-job"])["Partition"] == \
            partitions[served]
        closed = partitions[served]
        slurm_box.command("scontrol", "update", f"PartitionName={closed}", "State=INACTIVE")
        text, _, headers = streamed(server.url, question)
        assert text == expected
        assert headers["x-stream-cluster"] != served
        assert job_fields(slurm_box, headers["x-stream-hpc-job"])["Partition"] != closed
    finally:
        if closed:
            slurm_box.command("scontrol", "update", f"PartitionName={closed}", "State=UP")
        server.stop()


def test_a_batch_runs_its_lines_in_a_slurm_job_charged_to_its_caller(
        slurm_box, model_server, relay, tmp_path):
    cluster = sbatch_cluster(relay, model_server.url, "gpu", tmp_path / "slurm",
                             accounts=ACCOUNTS)
    # One line at a time: llama.cpp's answers are reproducible only that way.
    app, server = start_gateway(tmp_path, {"campus": cluster}, server={"api_keys": KEYS},
                                batch={"lines_at_once": 1, "chunks_at_once": 1})
    try:
        hpc_ready(app, timeout=120)
        questions = ["Name a fruit.", "Name a river.", "Name a mountain."]
        lines = [{"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": MODEL, **body(q, max_tokens=20)}}
                 for i, q in enumerate(questions)]
        path = tmp_path / "input.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=ALICE, max_retries=0)
        with open(path, "rb") as f:
            uploaded = client.files.create(file=f, purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id,
                                      endpoint="/v1/chat/completions", completion_window="24h")
        deadline = time.monotonic() + 240
        while batch.status not in ("completed", "failed", "cancelled", "expired"):
            assert time.monotonic() < deadline, batch
            time.sleep(0.2)
            batch = client.batches.retrieve(batch.id)
        assert batch.status == "completed", batch
        out = [json.loads(x) for x in client.files.content(batch.output_file_id).text.split(
            "\n") if x.strip()]
        got = {o["custom_id"]: o["response"]["body"]["choices"][0]["message"]["content"]
               for o in out}
        assert got == {f"q{i}": direct_answer(model_server, q, max_tokens=20)
                       for i, q in enumerate(questions)}
        chunks = [j for j in (job_fields(slurm_box, i) for i in _recent_job_ids(slurm_box))
                  if j["JobName"] == "stream-batch-chunk"
                  and j.get("WorkDir") == str(tmp_path / "slurm")]
        assert chunks, "no batch chunk ran as a Slurm job"
        assert all(j["Account"] == "chem-123" and
                   j["Comment"].startswith("streamllm caller=alice ref=") for j in chunks), chunks
    finally:
        server.stop()


def _recent_job_ids(box) -> list[str]:
    """Every job the controller still knows of (ended ones for MinJobAge)."""
    out = box.command("squeue", "-h", "--states=all", "-o", "%i")
    return out.split()
