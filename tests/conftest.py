"""Shared fixtures: simulators and gateways served for real on loopback, random ports."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from streamllm import realmodel
from streamllm.config import Settings, SimModelSettings, SimSettings
from streamllm.gateway import create_app
from streamllm.serving import ServerThread
from streamllm.sim.app import Simulator


@dataclass
class RunningSim:
    sim: Simulator
    server: ServerThread

    @property
    def url(self) -> str:
        return f"{self.server.url}/v1"

    def model(self, name: str) -> SimModelSettings:
        return self.sim.settings.models[name]


@dataclass
class RunningGateway:
    server: ServerThread
    app: Any

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def v1(self) -> str:
        return f"{self.server.url}/v1"


def until(condition: Callable[[], Any], timeout: float, what: str) -> None:
    """Poll a condition of the running system (not a sleep standing in for synchronisation)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def hpc_ready(app: Any, timeout: float = 120) -> None:
    """Wait until every cluster of the app's `hpc` tier is ready. A streamed request held
    longer than a few seconds for a cluster's warm-up has its response started before
    dispatch, without the `x-stream-dispatch`/`x-stream-transport` headers some tests read."""
    clusters = app.state.runtime.backends["hpc"].clusters
    until(lambda: all(c.state() == "ready" for c in clusters), timeout, "the clusters to be ready")


STREAMLLM = str(Path(sys.executable).with_name("streamllm"))


def start_relay(*args: str) -> tuple[subprocess.Popen, int]:
    """`streamllm relay` on a port the OS picks (port 0), and that port, read from its log.

    A port picked here and bound later can be taken in between by another socket of this busy
    process; that was seen as a worker's relay handshake timing out in the full suite.
    """
    relay = subprocess.Popen([STREAMLLM, "relay", "--port", "0", *args],
                             stderr=subprocess.PIPE, text=True)
    for line in relay.stderr:  # type: ignore[union-attr]
        if "relay on ws" in line:
            port = int(line.rsplit(":", 1)[1].split()[0])
            # Keep reading its log so that it can never block on a full pipe.
            threading.Thread(target=relay.stderr.read, daemon=True).start()  # type: ignore[union-attr]
            return relay, port
    relay.wait()
    raise AssertionError("the relay exited before it was ready")


def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused)."""
    return realmodel.free_port()


def stop_all(servers: list[ServerThread]) -> None:
    for server in servers:  # ask all first, so their shutdowns overlap
        server.request_stop()
    for server in servers:
        server.stop()


@pytest.fixture
def start_sim() -> Iterator[Callable[..., RunningSim]]:
    running: list[ServerThread] = []

    def start(models: dict[str, dict[str, Any]] | None = None, seed: int = 0) -> RunningSim:
        specs = {n: SimModelSettings(**s) for n, s in (models or {"sim-model": {}}).items()}
        sim = Simulator(SimSettings(models=specs, seed=seed))
        server = ServerThread(sim.app).start()
        running.append(server)
        return RunningSim(sim, server)

    yield start
    stop_all(running)


@pytest.fixture
def start_gateway(tmp_path_factory) -> Iterator[Callable[..., RunningGateway]]:
    running: list[ServerThread] = []

    def start(config: dict[str, Any]) -> RunningGateway:
        config = {**config}
        server = config["server"] = {**config.get("server", {})}
        server.setdefault("detect_ollama", False)
        # The store and Parsl's run directory go to a fresh directory, never the home.
        server.setdefault("data_dir", str(tmp_path_factory.mktemp("gateway")))
        # Tests never reach a real cloud: unconfigured tiers are simulated.
        settings = Settings.model_validate(config)
        app = create_app(settings)
        server = ServerThread(app).start()
        running.append(server)
        return RunningGateway(server, app)

    yield start
    stop_all(running)


@dataclass
class ThreeTiers:
    local: RunningSim
    hpc: RunningSim
    cloud: RunningSim
    gateway: RunningGateway

    def sim(self, tier: str) -> RunningSim:
        return getattr(self, tier)


def tier_config(url: str, model: str, kind: str = "vllm", **extra: Any) -> dict[str, Any]:
    return {
        "kind": kind,
        "base_url": url,
        "models": [model],
        "timeouts": {"connect": 2, "first_token": 5, "between_tokens": 5, "total": 30},
        **extra,
    }


@pytest.fixture
def three_tiers(start_sim, start_gateway) -> Callable[..., ThreeTiers]:
    """Three simulators (one per tier, models local-m / hpc-m / cloud-m) behind one gateway."""

    def build(
        sims: dict[str, dict[str, Any]] | None = None,
        routing: dict[str, Any] | None = None,
        tiers: dict[str, dict[str, Any]] | None = None,
        server: dict[str, Any] | None = None,
        aliases: dict[str, str] | None = None,
        context: dict[str, Any] | None = None,
    ) -> ThreeTiers:
        sims = sims or {}
        running = {t: start_sim({f"{t}-m": sims.get(t, {})}) for t in ("local", "hpc", "cloud")}
        config: dict[str, Any] = {
            "tiers": {
                t: tier_config(r.url, f"{t}-m", **(tiers or {}).get(t, {}))
                for t, r in running.items()
            },
            "routing": routing or {},
            "server": server or {},
            "aliases": aliases or {},
            "context": context or {},
        }
        gw = start_gateway(config)
        return ThreeTiers(running["local"], running["hpc"], running["cloud"], gw)

    return build


# -- databases ----------------------------------------------------------------------------------

PG_HOST, PG_PORT = "127.0.0.1", 5432
PG_USERS = ("postgres", "root")  # trust auth on this machine; either role may exist


def _pg_user() -> tuple[str | None, str]:
    """A PostgreSQL role that can create databases, or why there is none."""
    import asyncio

    import asyncpg

    async def probe() -> tuple[str | None, str]:
        errors = []
        for user in PG_USERS:
            try:
                conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=user,
                                             database="test", timeout=5)
            except (TimeoutError, OSError, asyncpg.PostgresError) as e:
                errors.append(f"as {user}: {e}")
                continue
            await conn.close()
            return user, ""
        return None, "; ".join(errors)

    return asyncio.run(probe())


@pytest.fixture(scope="session")
def postgres_user() -> str:
    user, why = _pg_user()
    if user is None:
        pytest.skip(f"PostgreSQL not reachable at {PG_HOST}:{PG_PORT}: {why}")
    return user


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, or a new PostgreSQL database dropped after."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'stream.db'}"
        return
    import asyncio
    import uuid

    import asyncpg

    user = request.getfixturevalue("postgres_user")
    name = f"stream_t_{uuid.uuid4().hex[:12]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=user, database="test")
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql+asyncpg://{user}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# -- the real parts: a Slurm cluster in a box and a real model ----------------------------------

def unavailable(why: str) -> None:
    """Skip a test whose real part cannot run here, and say why in one line; in CI, where every
    real part must run, fail instead."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must run this test, but: {why}", pytrace=False)
    pytest.skip(why)


@pytest.fixture(scope="session")
def slurm_box() -> Iterator[Any]:
    """One Slurm cluster for the whole run (bring-up ~1 s), its commands first on PATH the way
    a login node's are (Parsl's SlurmProvider runs them by name). Ended by PID at the end."""
    from tests import slurm_box as box_module

    why = box_module.why_not_available()
    if why:
        unavailable(why)
    with box_module.SlurmBox() as box, pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", f"{box.bin}{os.pathsep}{os.environ.get('PATH', '')}")
        yield box


@pytest.fixture(scope="session")
def model_server(tmp_path_factory) -> Iterator[realmodel.ModelServer]:
    """SmolLM2-135M-Instruct behind llama-cpp-python's OpenAI-compatible server (load ~1 s)."""
    why = realmodel.why_not_available()
    if why:
        unavailable(why)
    with realmodel.start_model_server(tmp_path_factory.mktemp("model-server")) as server:
        yield server


@pytest.fixture(scope="session")
def walled_box() -> Iterator[Any]:
    """A second Slurm cluster, behind a firewall: its daemons and jobs run in a network
    namespace of their own that lets nothing in (tests/slurm_box.py WalledSlurmBox,
    docs/firewall.md). PATH is left alone: a test puts `walled_box.bin` first itself, since
    `slurm_box` may have put its own there. Everything it started is ended by PID, and the
    namespace and its veth pair are deleted, at the end."""
    from tests import slurm_box as box_module

    why = box_module.why_walled_not_available()
    if why:
        unavailable(why)
    with box_module.WalledSlurmBox() as box:
        yield box


@pytest.fixture(scope="session")
def walled_model_server(walled_box, tmp_path_factory) -> Iterator[realmodel.ModelServer]:
    """The real model's server inside `walled_box`'s namespace, on its address (a GPU node's
    vLLM): only the namespace itself, and so the jobs in it, can reach it."""
    why = realmodel.why_not_available()
    if why:
        unavailable(why)
    with walled_box.start_model_server(tmp_path_factory.mktemp("walled-model-server")) as server:
        yield server
