"""Control planes run the real worker function: a process pool and a local Parsl engine."""

from __future__ import annotations

import os

import pytest

from streamllm.config import SimModelSettings, SimSettings
from streamllm.hpc.control import IdempotentSubmitter, LocalControlPlane, ParslControlPlane
from streamllm.hpc.worker import run_completion
from streamllm.serving import ServerThread
from streamllm.sim.app import Simulator
from streamllm.sim.content import answer_text
from tests.conftest import closed_port

MESSAGES = [{"role": "user", "content": "what is queued on the cluster?"}]


@pytest.fixture(scope="module")
def vllm():
    sim = Simulator(SimSettings(models={"m": SimModelSettings(answer_tokens=12)}))
    with ServerThread(sim.app) as server:
        yield sim, f"{server.url}/v1"


def job(backend_url: str) -> dict:
    # No relay reachable: the answer comes back through the control plane alone (batch mode).
    return {
        "relay_url": f"ws://127.0.0.1:{closed_port()}",
        "channel": "ctl",
        "producer_token": "unused",
        "key": None,
        "backend_url": backend_url,
        "body": {"model": "m", "messages": MESSAGES},
        "relay_connect_s": 1.0,
    }


@pytest.fixture(scope="module", params=["local", "parsl"])
def plane(request, tmp_path_factory):
    if request.param == "local":
        p = LocalControlPlane(max_workers=2)
    else:
        pytest.importorskip("parsl", reason="the [parsl] extra is part of the test install")
        p = ParslControlPlane(str(tmp_path_factory.mktemp("parsl")), max_workers=2)
    yield p
    p.shutdown()


def test_control_plane_runs_the_worker_and_returns_the_backstop(plane, vllm):
    _, backend = vllm
    result = plane.submit(run_completion, job(backend)).result(timeout=120)
    assert result["choices"][0]["content"] == answer_text("m", MESSAGES, 12)
    assert result["relay_error"].startswith("relay unreachable")


def test_retried_request_joins_the_running_job(plane, vllm):
    sim, backend = vllm
    before = len(sim.log)
    submitter = IdempotentSubmitter(plane)
    original = job(backend)
    first = submitter.submit("req-1", run_completion, original)
    again = submitter.submit("req-1", run_completion, job(backend))
    assert first.started and not again.started and again.future is first.future
    assert again.args == (original,), "a joiner learns the running job's channel and key"
    first.future.result(timeout=120)
    done_again = submitter.submit("req-1", run_completion, job(backend))
    assert done_again.future is first.future
    assert submitter.submitted == 1
    assert len(sim.log) - before == 1, "one GPU job for three submissions"


def test_local_workers_exit_when_the_gateway_is_killed():
    """A gateway killed with SIGKILL cannot shut its process pool down: the workers notice
    their parent is gone and exit instead of waiting for work forever."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = (
        "from streamllm.hpc.control import LocalControlPlane\n"
        "from streamllm.hpc.worker import ping\n"
        "plane = LocalControlPlane(max_workers=1)\n"
        "print(plane.submit(ping).result(timeout=60)['pid'], flush=True)\n"
        "import time; time.sleep(600)\n"
    )
    gateway = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                               text=True)
    try:
        worker = int(gateway.stdout.readline())
        os.kill(worker, 0)  # alive while the gateway is
        gateway.send_signal(signal.SIGKILL)
        gateway.wait(timeout=10)
        deadline = time.monotonic() + 15
        while True:
            try:
                os.kill(worker, 0)
            except ProcessLookupError:
                break
            assert time.monotonic() < deadline, "the worker outlived its gateway"
            time.sleep(0.1)
    finally:
        gateway.kill()
        gateway.stdout.close()


def test_a_local_plane_goes_on_after_a_worker_is_killed():
    """A killed worker breaks a process pool for good; the plane starts a fresh one, as an
    endpoint goes on after losing a node. Only the jobs the dead worker's pool held fail."""
    import concurrent.futures.process
    import os
    import signal
    import time

    from streamllm.hpc.worker import ping

    plane = LocalControlPlane(max_workers=1)
    try:
        first = plane.submit(ping).result(timeout=60)["pid"]
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline, "the plane never ran a job again"
            try:
                after = plane.submit(ping).result(timeout=60)["pid"]
                break
            except concurrent.futures.process.BrokenProcessPool:
                continue  # submitted before the pool knew it was broken: that job failed
        assert after != first
    finally:
        plane.shutdown()


def _say_and_stay(path: str) -> None:
    """A long job (as a warm agent is) that says when it has started."""
    import time

    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(120)


def test_shutting_a_local_plane_down_stops_its_running_jobs(tmp_path):
    """A job still running at shutdown is stopped, or the gateway's exit would wait for it."""
    import time

    started = tmp_path / "started"
    plane = LocalControlPlane(max_workers=1)
    try:
        plane.submit(_say_and_stay, str(started))
        deadline = time.monotonic() + 60
        while not (started.exists() and started.read_text()):
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.05)
        pid = int(started.read_text())
    finally:
        plane.shutdown()

    def running() -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 10
    while running():
        assert time.monotonic() < deadline, "the worker still runs its job after shutdown"
        time.sleep(0.05)
