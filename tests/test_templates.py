"""The cluster-side templates shipped in streamllm/hpc/templates: they parse, their field names
are ones Globus Compute and Parsl accept, the gateway fragment is valid configuration, and the
vLLM job script starts, publishes its URL and stops cleanly (against a stand-in for vLLM)."""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

import streamllm.hpc.templates
from streamllm.config import Settings
from tests.conftest import closed_port

TEMPLATES = Path(streamllm.hpc.templates.__file__).parent
GLOBUS = {"globus-endpoint-slurm.yaml": "SlurmProvider", "globus-endpoint-pbs.yaml": "PBSProProvider"}
SCRIPT = TEMPLATES / "vllm-launch.sh"
# GlobusComputeEngine's own arguments; everything else in `engine:` goes to Parsl's
# HighThroughputExecutor.
ENGINE_OWN = {"type", "provider", "label", "max_retries_on_system_failure", "executor",
              "container_type", "container_uri", "container_cmd_options", "encrypted",
              "strategy", "job_status_kwargs", "run_in_sandbox", "allowed_serializers",
              "working_dir", "endpoint_id"}


def load(name: str) -> dict[str, Any]:
    data = yaml.safe_load((TEMPLATES / name).read_text())
    assert isinstance(data, dict), f"{name} must hold a mapping"
    return data


def seconds(walltime: str) -> int:
    parts = [int(p) for p in walltime.split(":")]
    assert len(parts) == 3, walltime
    return parts[0] * 3600 + parts[1] * 60 + parts[2]


def globus_cluster() -> Any:
    tier = Settings.model_validate(load("stream-clusters.yaml")).tiers["hpc"]
    return next(c for c in tier.clusters.values() if c.control_plane == "globus")


def test_the_templates_ship_in_the_package():
    names = {p.name for p in TEMPLATES.iterdir()}
    assert {*GLOBUS, "stream-clusters.yaml", "vllm-launch.sh", "__init__.py"} <= names


@pytest.mark.parametrize("name", sorted(p.name for p in TEMPLATES.glob("*.yaml")))
def test_every_yaml_template_parses(name):
    assert load(name), f"{name} is an empty mapping"


@pytest.mark.parametrize("name", sorted(GLOBUS))
def test_globus_templates_are_plain_yaml_for_jinja(name):
    # The endpoint renders the file with Jinja (undefined variables are errors) before it reads
    # the YAML: no template syntax may appear, not even in a comment.
    text = (TEMPLATES / name).read_text()
    assert not re.search(r"\{\{|\{%|\{#", text)


@pytest.mark.parametrize("name,provider_type", sorted(GLOBUS.items()))
def test_globus_engine(name, provider_type):
    config = load(name)
    engine = config["engine"]
    provider = engine["provider"]
    assert engine["type"] == "GlobusComputeEngine"
    assert provider["type"] == provider_type
    assert 0 <= provider["min_blocks"] <= provider["init_blocks"] <= provider["max_blocks"]
    assert provider["nodes_per_block"] >= 1
    assert isinstance(provider["walltime"], str)  # quoted: unquoted YAML reads a number
    # The idle setting lives under job_status_kwargs; 4.x refuses it directly under engine.
    assert "max_idletime" not in engine
    assert engine["job_status_kwargs"]["max_idletime"] > 0
    assert engine["max_retries_on_system_failure"] == 0
    assert engine["cores_per_worker"] < 1  # workers must not be capped by the core count
    assert config["idle_heartbeats_soft"] == 0  # the endpoint must never idle out
    assert "source " in provider["worker_init"] and "/bin/activate" in provider["worker_init"]
    assert "export VLLM_API_KEY=" in provider["worker_init"]


@pytest.mark.parametrize("name", sorted(GLOBUS))
def test_globus_engine_fits_the_gateway_agents(name):
    engine = load(name)["engine"]
    agents = globus_cluster().agents
    walltime = seconds(engine["provider"]["walltime"])
    # Agents and their successors overlap during a replacement; per-request jobs need room too.
    assert engine["max_workers_per_node"] > 2 * agents.max
    # A block stops taking tasks early enough that an agent started on it can finish.
    assert engine["drain_period"] + agents.walltime_s <= walltime
    assert agents.walltime_s < walltime


@pytest.mark.parametrize("name,provider_type", sorted(GLOBUS.items()))
def test_globus_field_names_are_parsl_arguments(name, provider_type):
    pytest.importorskip("parsl")
    import parsl.launchers
    import parsl.providers
    from parsl.executors import HighThroughputExecutor

    engine = load(name)["engine"]
    provider = dict(engine["provider"])
    provider_cls = getattr(parsl.providers, provider_type)
    known = set(inspect.signature(provider_cls.__init__).parameters)
    unknown = set(provider) - {"type"} - known
    assert not unknown, f"{provider_type} takes no {sorted(unknown)}"
    assert hasattr(parsl.launchers, provider["launcher"]["type"])

    htex = set(inspect.signature(HighThroughputExecutor.__init__).parameters)
    unknown = set(engine) - ENGINE_OWN - htex
    assert not unknown, f"GlobusComputeEngine/HighThroughputExecutor take no {sorted(unknown)}"
    assert set(engine["job_status_kwargs"]) <= {"strategy", "max_idletime", "strategy_period"}


@pytest.mark.parametrize("name,provider_type", sorted(GLOBUS.items()))
def test_globus_templates_load_in_the_endpoint(name, provider_type):
    # Only where globus-compute-endpoint is installed (it cannot share the gateway's
    # environment: it needs an older click).
    pytest.importorskip("globus_compute_endpoint")
    from globus_compute_endpoint.endpoint.config.utils import load_config_yaml

    config = load_config_yaml((TEMPLATES / name).read_text())
    try:
        assert type(config.engine).__name__ == "GlobusComputeEngine"
        assert type(config.engine.executor.provider).__name__ == provider_type
        assert config.idle_heartbeats_soft == 0
    finally:
        config.engine.shutdown()


def test_stream_clusters_is_valid_configuration(monkeypatch):
    monkeypatch.delenv("STREAMLLM_RELAY_SECRET", raising=False)
    settings = Settings.model_validate(load("stream-clusters.yaml"))
    tier = settings.tiers["hpc"]
    assert tier.kind == "hpc" and len(tier.clusters) == 2
    by_plane = {c.control_plane: c for c in tier.clusters.values()}
    assert set(by_plane) == {"globus", "parsl"}

    globus = by_plane["globus"]
    assert globus.globus.endpoint_id and globus.agents.max > 0 and globus.agents.min_warm >= 1
    parsl = by_plane["parsl"]
    assert parsl.parsl.provider == "slurm" and parsl.agents.max == 0
    for cluster in tier.clusters.values():
        assert cluster.base_url and cluster.base_url.endswith("/v1")
        assert cluster.models and cluster.api_key_env == "VLLM_API_KEY"
        assert cluster.relay_url and cluster.relay_url.startswith("wss://")
        assert cluster.transport == "relay"
    assert tier.models == ["meta-llama/Llama-3.1-70B-Instruct"]


def test_stream_clusters_provider_options_build_a_slurm_provider():
    pytest.importorskip("parsl")
    from parsl.providers import SlurmProvider

    tier = Settings.model_validate(load("stream-clusters.yaml")).tiers["hpc"]
    parsl = next(c for c in tier.clusters.values() if c.control_plane == "parsl")
    provider = SlurmProvider(**parsl.parsl.provider_options)
    assert provider.min_blocks <= provider.max_blocks
    assert provider.walltime == "24:00:00"


# -- vllm-launch.sh -------------------------------------------------------------------------------

def test_vllm_launch_is_valid_bash():
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr


def test_vllm_launch_headers_and_key_handling():
    lines = SCRIPT.read_text().splitlines()
    assert lines[0] == "#!/bin/bash"
    first_command = next(i for i, ln in enumerate(lines) if ln and not ln.startswith("#"))
    header = lines[:first_command]
    sbatch = [ln for ln in header if ln.startswith("#SBATCH")]
    pbs = [ln for ln in header if ln.startswith("#PBS")]
    assert sbatch[0] == "#SBATCH --ignore-pbs"  # else sbatch would read the #PBS lines too
    assert any(ln.startswith("#SBATCH --signal=B:TERM@") for ln in sbatch)
    assert any(ln.startswith("#PBS -l walltime=") for ln in pbs)
    # Every directive sits above the first command, where both schedulers still read them.
    body = lines[first_command:]
    assert not [ln for ln in body if ln.startswith(("#SBATCH", "#PBS"))]
    assert lines[first_command] == "set -euo pipefail"
    code = [ln for ln in body if not ln.lstrip().startswith("#")]
    assert not [ln for ln in code if "--api-key" in ln]


FAKE_VLLM = """\
import http.server, json, os, signal, sys
argv = sys.argv[1:]
record = os.environ["FAKE_RECORD"]
key = os.environ.get("VLLM_API_KEY", "")
with open(record + ".argv", "w") as f:
    json.dump({"argv": argv, "key": key}, f)
if os.environ.get("FAKE_FAIL"):
    sys.exit(3)
name = argv[argv.index("--served-model-name") + 1]

class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path == "/health":
            self.send_response(200)
            self.end_headers()
        elif self.path == "/v1/models" and self.headers.get("Authorization") == "Bearer " + key:
            body = json.dumps({"object": "list", "data": [{"id": name}]}).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_response(401)
            self.end_headers()

def stop(*_):
    open(record + ".stopped", "w").write("TERM")
    os._exit(0)

signal.signal(signal.SIGTERM, stop)
host = argv[argv.index("--host") + 1]
port = int(argv[argv.index("--port") + 1])
http.server.HTTPServer((host, port), Handler).serve_forever()
"""


@pytest.fixture
def launch_env(tmp_path) -> dict[str, Any]:
    if shutil.which("curl") is None:
        pytest.skip("the script's health check needs curl")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "vllm"
    fake.write_text(f"#!{sys.executable}\n{FAKE_VLLM}")
    fake.chmod(0o755)
    key = tmp_path / "vllm.key"
    key.write_text("test-key-0123456789abcdef\n")
    key.chmod(0o600)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "PBS_", "VLLM_", "STREAM_VLLM_"))}
    env.update({
        "PATH": f"{bindir}{os.pathsep}{env.get('PATH', '')}",
        "FAKE_RECORD": str(tmp_path / "fake"),
        "STREAM_VLLM_VENV": "",
        "STREAM_VLLM_API_KEY_FILE": str(key),
        "STREAM_VLLM_URL_FILE": str(tmp_path / "shared" / "vllm-base-url"),
        "STREAM_VLLM_PORT": str(closed_port()),
        "STREAM_VLLM_HOST": "127.0.0.1",
        "STREAM_VLLM_ADVERTISE_HOST": "gpu017.cluster.test",
        "STREAM_VLLM_SERVED_MODEL_NAME": "llama-test",
        "STREAM_VLLM_MAX_NUM_SEQS": "64",
        "STREAM_VLLM_HEALTH_TIMEOUT_S": "60",
        "CUDA_VISIBLE_DEVICES": "0,1,2",
    })
    return env


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"the script exited with {proc.returncode}:\n{out}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path} did not appear within {timeout} s")
        time.sleep(0.1)


def test_vllm_launch_serves_publishes_and_stops_on_sigterm(launch_env, tmp_path):
    url_file = Path(launch_env["STREAM_VLLM_URL_FILE"])
    proc = subprocess.Popen(["bash", str(SCRIPT)], env=launch_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(url_file, proc)
        port = launch_env["STREAM_VLLM_PORT"]
        assert url_file.read_text() == f"http://gpu017.cluster.test:{port}/v1\n"

        started = json.loads((tmp_path / "fake.argv").read_text())
        argv = started["argv"]
        assert argv[:2] == ["serve", "meta-llama/Llama-3.1-70B-Instruct"]
        # Three GPUs: tensor parallelism over the largest power of two that fits.
        assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
        assert argv[argv.index("--max-num-seqs") + 1] == "64"
        # The key reached vLLM through its environment, never its command line.
        assert started["key"] == "test-key-0123456789abcdef"
        assert "--api-key" not in argv and not any(started["key"] in a for a in argv)

        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert (tmp_path / "fake.stopped").read_text() == "TERM"  # vLLM was stopped, not orphaned
    assert not url_file.exists()  # a stale URL would point the gateway at nothing
    assert "ready: base_url" in out


def test_vllm_launch_fails_when_vllm_dies_before_serving(launch_env, tmp_path):
    launch_env["FAKE_FAIL"] = "1"
    done = subprocess.run(["bash", str(SCRIPT)], env=launch_env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 1
    assert "exited with status 3" in done.stderr
    assert not Path(launch_env["STREAM_VLLM_URL_FILE"]).exists()


def test_vllm_launch_refuses_an_empty_key_file(launch_env, tmp_path):
    Path(launch_env["STREAM_VLLM_API_KEY_FILE"]).write_text("\n")
    done = subprocess.run(["bash", str(SCRIPT)], env=launch_env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 1 and "is empty" in done.stderr
    assert not (tmp_path / "fake.argv").exists()  # vLLM never started


def test_streamllm_cluster_templates_copies_them(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    exe = str(Path(sys.executable).with_name("streamllm"))
    listed = subprocess.run([exe, "cluster", "templates"], capture_output=True, text=True,
                            timeout=60, check=False)
    assert listed.returncode == 0 and "vllm-launch.sh" in listed.stdout
    out = tmp_path / "site"
    copied = subprocess.run([exe, "cluster", "templates", "--out", str(out)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert copied.returncode == 0, copied.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["globus-endpoint-pbs.yaml", "globus-endpoint-slurm.yaml",
                     "stream-clusters.yaml", "vllm-launch.sh"]
    assert (out / "vllm-launch.sh").stat().st_mode & 0o100, "the script stays executable"
    again = subprocess.run([exe, "cluster", "templates", "--out", str(out)],
                           capture_output=True, text=True, timeout=60, check=False)
    assert "kept" in again.stderr
