"""What a running gateway holds: the tiers it resolved, their backends, health and the simulator.

Built at startup from Settings: configured tiers are used as given; an unconfigured `local` is
Ollama if it answers, an unconfigured `cloud` is OpenRouter if its key is set, an unconfigured
`hpc` is the whole dual-channel path on this machine (a local Parsl engine, an in-process relay,
the simulator as the cluster's vLLM), and any other tier is served by the embedded simulator.
The log and /v1/models say plainly which tiers are simulated.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

import httpx2

from streamllm.batch import BackendChunkRunner, BatchService, ChunkRunner, FileStore
from streamllm.batch.hpc import HPCChunkRunner
from streamllm.caller import Caller
from streamllm.config import (
    TIERS,
    ClusterSettings,
    JudgeSettings,
    Settings,
    SimModelSettings,
    SimSettings,
    TierSettings,
)
from streamllm.context.manager import ContextManager
from streamllm.context.tokens import load_tokenizer
from streamllm.errors import ConfigError, StreamError
from streamllm.gateway.accounting import EVERYONE, Accounts
from streamllm.gateway.metrics import Metrics
from streamllm.hpc.control import ControlPlane, IdempotentSubmitter, make_control_plane
from streamllm.hpc.worker import ping
from streamllm.relay.server import RelayServer
from streamllm.routing import RoutingPolicy
from streamllm.routing.budget import cost_usd, effective_high_threshold
from streamllm.routing.judge import Judge, build_judge
from streamllm.routing.privacy import SensitiveDataDetector
from streamllm.serving import ServerTask
from streamllm.sim.app import Simulator
from streamllm.store import Store, StoreConfigError, conversations, default_url
from streamllm.store.db import checked_url
from streamllm.tiers import Backend, OpenAIHTTPBackend
from streamllm.tiers.adapt import backend_body
from streamllm.tiers.agents import AgentFirstPlane, AgentPool
from streamllm.tiers.federation import Cluster, FederatedHPCBackend
from streamllm.tiers.hpc import HPCRelayBackend

log = logging.getLogger("streamllm.gateway")

WARM_RETRY_S = 10.0  # a control plane that failed its warm-up job is tried again after...
WARM_RETRY_MAX_S = 300.0  # ...a pause that doubles up to this
OPENROUTER_URL = "https://openrouter.ai/api/v1"
OPENROUTER_DEFAULT_MODEL = "openai/gpt-4o-mini"

# How the simulator behaves when it stands in for a tier nobody configured: roughly the shape
# of a small laptop model, a cluster-hosted mid-size model and a large cloud model.
SIM_PROFILES: dict[str, SimModelSettings] = {
    "local": SimModelSettings(context_window=8192, ttft_ms=60, tokens_per_s=60, answer_tokens=48),
    "hpc": SimModelSettings(context_window=32768, ttft_ms=150, tokens_per_s=120, answer_tokens=96),
    "cloud": SimModelSettings(
        context_window=128000, ttft_ms=350, tokens_per_s=90, answer_tokens=128
    ),
}


@dataclass
class TierHealth:
    state: str = "unknown"  # unknown | up | down
    detail: str = ""
    checked_at: float | None = None
    failed_at: float | None = None  # last request failure seen by the router

    def as_dict(self) -> dict[str, object]:
        return {"state": self.state, "detail": self.detail}


@dataclass
class Runtime:
    settings: Settings
    tiers: dict[str, TierSettings] = field(default_factory=dict)
    backends: dict[str, Backend] = field(default_factory=dict)
    catalogue: dict[str, list[str]] = field(default_factory=dict)
    health: dict[str, TierHealth] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)  # why each tier is what it is
    simulator: Simulator | None = None
    sim_tiers: set[str] = field(default_factory=set)  # tiers whose answers are synthetic
    relay: RelayServer | None = None  # the first in-process relay (no relay_url configured)
    relays: list[RelayServer] = field(default_factory=list)  # one per such cluster
    pools: list[AgentPool] = field(default_factory=list)  # warm agents, one pool per cluster
    planes: list[ControlPlane] = field(default_factory=list)
    _sim_server: ServerTask | None = None
    _warmups: list[asyncio.Task[None]] = field(default_factory=list)
    _monitor: asyncio.Task[None] | None = None
    policy: RoutingPolicy | None = None
    judge: Judge | None = None
    detector: SensitiveDataDetector | None = None
    windows: dict[str, int | None] = field(default_factory=dict)  # tier -> context window
    accounts: Accounts = field(init=False)
    metrics: Metrics = field(init=False)
    judges: dict[str, Judge] = field(default_factory=dict)  # the ones a request may ask for
    _background: set[asyncio.Task[None]] = field(default_factory=set)
    store: Store | None = None
    context: ContextManager = field(init=False)
    files: FileStore = field(init=False)  # the Batch API's files
    batches: BatchService = field(init=False)
    # Chunk runners by tier, for batch lines whose model is on that tier (e.g. "hpc": a runner
    # that sends whole chunks to the cluster); every other line runs through the backends.
    batch_runners: dict[str, ChunkRunner] = field(default_factory=dict)
    _batch_runner: ChunkRunner | None = None

    # -- health seen by the router -------------------------------------------------------------
    def healthy(self, tier: str) -> bool:
        h = self.health.get(tier)
        if h is None:
            return False
        recent = h.failed_at is not None and (
            time.monotonic() - h.failed_at < self.settings.routing.unhealthy_for_s
        )
        return h.state != "down" and not recent

    def mark_failed(self, tier: str, detail: str) -> None:
        h = self.health.setdefault(tier, TierHealth())
        h.failed_at, h.detail = time.monotonic(), detail

    def mark_ok(self, tier: str) -> None:
        h = self.health.setdefault(tier, TierHealth())
        h.failed_at = None
        if h.state != "up":
            h.state, h.detail = "up", "ok"

    def simulated(self, tier: str) -> bool:
        return tier in self.sim_tiers

    def _model_on(self, name: str) -> str:
        """The backend's own name for a model named in a request (`hpc/x`, `hpc`, `x`)."""
        assert self.policy is not None
        return self.policy.route(name).candidates[0].model

    def batch_runner_for(self, model: str) -> ChunkRunner:
        """Who runs a batch's lines that name `model` (see streamllm.batch.runner): the runner
        registered in `batch_runners` for the tier an explicit model is on, else the one that
        runs lines through the tiers' own backends (`auto`, unknown models, other tiers)."""
        if self.batch_runners and self.policy is not None and \
                not self.policy.needs_judgement(model):
            try:
                tier = self.policy.route(model).candidates[0].tier
            except StreamError:
                tier = None  # the default runner answers the line with the error
            if tier in self.batch_runners:
                return self.batch_runners[tier]
        if self._batch_runner is None:
            self._batch_runner = BackendChunkRunner(self, self.settings.batch)
        return self._batch_runner

    # -- cost, budgets and the web chat ----------------------------------------------------------
    def cost(self, tier: str | None, model: str | None, usage: dict | None) -> float:
        ts = self.tiers.get(tier) if tier else None
        return cost_usd(usage, ts.price(model) if ts and model else None)

    async def high_threshold(self, caller: Caller | None) -> float:
        """P(HIGH) `auto` needs for the HIGH tier, raised by whichever budget is tighter."""
        routing = self.settings.routing
        base, soft = routing.high_threshold, routing.budget.soft_start
        found = base
        for holder, budget in self.accounts.budgets(caller):
            spent = await self.accounts.spent(None if holder == EVERYONE else holder)
            found = max(found, effective_high_threshold(base, spent, budget, soft))
        return found

    def judge_for(self, kind: str | None) -> Judge:
        """The configured judge, or the one a request asks for if it is available."""
        assert self.judge is not None
        return self.judges.get(kind or "", self.judge)

    async def owns_conversation(self, caller: Caller | None, conversation_id: str) -> bool:
        assert self.store is not None
        return await conversations.owns(self.store, caller.name if caller else None,
                                        conversation_id)

    async def remember(self, conversation_id: str, user_text: str, answer: str,
                       meta: dict) -> None:
        """Keep a web chat exchange in its conversation."""
        assert self.store is not None
        await conversations.append(self.store, conversation_id,
                                   [("user", user_text, None), ("assistant", answer, meta)])

    def in_background(self, work: Awaitable[Any]) -> None:
        async def guarded() -> None:
            try:
                await work
            except Exception:
                log.exception("background work failed")

        task = asyncio.create_task(guarded())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self.metrics = Metrics(
            inflight=lambda: self.accounts.inflight() if hasattr(self, "accounts") else 0,
            relay_channels=lambda: len(self.relay.channels) if self.relay else None)
        resolved: dict[str, TierSettings] = {}
        for tier in TIERS:
            configured = self.settings.tier(tier)
            if configured is not None and not configured.enabled:
                continue
            if configured is not None:
                resolved[tier] = configured
                self.origin[tier] = "configured"
            else:
                resolved[tier] = await self._autodetect(tier)
        simulated = {t: s for t, s in resolved.items() if s.simulated}
        self.sim_tiers = set(simulated)
        partly = {t: s for t, s in resolved.items()
                  if s.clusters and any(c.base_url is None for c in s.clusters.values())}
        if simulated or partly:
            await self._start_simulator({**partly, **simulated}, resolved)
        for tier, ts in resolved.items():
            self.tiers[tier] = ts
            self.catalogue[tier] = list(ts.models)
            self.backends[tier] = (
                await self._hpc_backend(tier, ts) if ts.kind == "hpc"
                else OpenAIHTTPBackend(tier, ts)
            )
            self.health[tier] = TierHealth()
            if ts.kind == "hpc":
                backends = ", ".join(
                    f"{name}: " + ("the simulator" if cs.base_url is None
                                   or tier in self.sim_tiers else cs.base_url)
                    for name, cs in ts.cluster_settings().items())
                where = f"{self.backends[tier].name}; cluster backends {backends}"
            else:
                where = "simulator" if tier in self.sim_tiers else f"{ts.kind} at {ts.base_url}"
            log.info(
                "tier %s: %s, models %s (%s)", tier, where, ", ".join(ts.models) or "none",
                self.origin[tier],
            )
            if tier in self.sim_tiers:
                log.warning(
                    "tier %s is SIMULATED: answers are synthetic; configure tiers.%s to use a "
                    "real backend", tier, tier,
                )
        for tier, ts in resolved.items():
            spec = ts.simulator or SIM_PROFILES.get(tier) if tier in self.sim_tiers else None
            self.windows[tier] = ts.context_window or (spec.context_window if spec else None)
        self.policy = RoutingPolicy(self.settings.routing, self.catalogue, self.settings.aliases,
                                    self.windows)
        self.judge = self._judge()
        self.judges = self._judges()
        privacy = self.settings.routing.privacy
        if privacy.detect:
            self.detector = SensitiveDataDetector(privacy.patterns, privacy.kinds)
        server = self.settings.server
        self.store = await Store.open(server.database_url or default_url(server.data_dir))
        log.info("store: %s", self.store.url)
        self.context = self._context_manager()
        await self.context.start()
        self.accounts = Accounts(self.store, self.settings.routing.budget.usd)
        self.accounts.start()
        await self.probe_all()
        self._monitor = asyncio.create_task(self._watch(), name="tier-health")
        for tier, backend in self.backends.items():
            if isinstance(backend, FederatedHPCBackend):
                # A batch's lines for a cluster's model go as chunk jobs to the clusters.
                self.batch_runners[tier] = HPCChunkRunner(
                    tier, backend, self._model_on, lines_at_once=self.settings.batch.lines_at_once)
        self.files = FileStore(self.store, server.data_dir)
        self.batches = BatchService(self, self.store, self.files, self.settings.batch)
        await self.batches.start()  # resumes the batches a previous run left unfinished

    def _judges(self) -> dict[str, Judge]:
        """Every judge this server can run, for requests that pick one (the web chat's
        setting): the classifier always; llm and cascade when the judging tier has a model."""
        js = self.settings.routing.judge
        out: dict[str, Judge] = {js.kind: self.judge} if self.judge else {}
        for kind in ("classifier", "llm", "cascade"):
            if kind not in out:
                try:
                    out[kind] = self._judge(js.model_copy(update={"kind": kind}), quiet=True)
                except ConfigError:
                    continue
        return out

    def _judge(self, js: JudgeSettings | None = None, quiet: bool = False) -> Judge:
        js = js or self.settings.routing.judge
        if js.kind == "classifier":
            return build_judge(js)
        tier = js.llm.tier
        ts, backend = self.tiers.get(tier), self.backends.get(tier)
        model = js.llm.model or (self.catalogue[tier][0] if self.catalogue.get(tier) else None)
        if ts is None or backend is None or model is None:
            raise ConfigError(f"routing.judge.kind {js.kind} asks the {tier} tier's model, and "
                              f"that tier is disabled or has no models")

        async def complete(body: dict) -> dict:
            return await backend.complete(backend_body(body, model, ts, stream=False))

        if not quiet:
            log.info("complexity judge: %s, asking %s/%s", js.kind, tier, model)
        return build_judge(js, complete, model)

    def _context_manager(self) -> ContextManager:
        cs = self.settings.context
        tier = cs.summarizer.tier
        ts, backend = self.tiers.get(tier), self.backends.get(tier)
        model = cs.summarizer.model or (self.catalogue[tier][0] if self.catalogue.get(tier)
                                        else None)
        complete = None
        if ts is not None and backend is not None and model is not None:
            async def complete(body: dict) -> dict:
                return await backend.complete(backend_body(body, model, ts, stream=False))
        else:
            log.info("context: no %s model to summarize with; summaries are extractive", tier)
        tokenizers = {}
        for name, t in self.tiers.items():
            if t.tokenizer:
                loaded = load_tokenizer(t.tokenizer, f"tiers.{name}.tokenizer")
                tokenizers.update({m: loaded for m in self.catalogue.get(name, ())})
        return ContextManager(cs, self.store, complete, model, tokenizers,
                              self.windows.get(tier))

    async def stop(self) -> None:
        batches = getattr(self, "batches", None)  # first: it still needs backends and store
        if batches is not None:
            await batches.stop()
        if self._monitor:
            self._monitor.cancel()
            try:
                await self._monitor
            except asyncio.CancelledError:
                pass
        for task in self._warmups:
            task.cancel()
        accounts = getattr(self, "accounts", None)  # absent when startup failed before it
        if accounts is not None:
            await accounts.stop()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        context = getattr(self, "context", None)
        if context is not None:
            await context.aclose()
        if self.store is not None:
            await self.store.close()
        for backend in self.backends.values():
            await backend.aclose()
        for pool in self.pools:
            await pool.stop()
        for plane in self.planes:
            await asyncio.to_thread(plane.shutdown)
        for relay in self.relays:
            await relay.stop()
        if self._sim_server:
            await self._sim_server.stop()

    async def _warm(self, tier: str, cluster: Cluster) -> None:
        # A first job gets the workers started (Parsl launches them on demand, a Globus endpoint
        # may be cold), so that the first user request does not pay for it unannounced; until
        # it is done the cluster counts as starting.
        started = time.monotonic()
        plane = cluster.plane
        wait = WARM_RETRY_S
        while True:
            try:
                await asyncio.wrap_future(await asyncio.to_thread(plane.submit, ping))
                break
            except Exception as e:
                # Offline until a job gets through again: tried again with a growing pause,
                # so a control plane that recovers brings the cluster back without a restart.
                log.warning("tier %s, cluster %s: control plane %s failed a job: %s; trying "
                            "again in %.0f s", tier, cluster.name, plane.name, e, wait)
                cluster.plane_state = "failed"
                cluster.detail = f"control plane failed its job: {e}"
                await asyncio.sleep(wait)
                wait = min(wait * 2, WARM_RETRY_MAX_S)
        cluster.plane_state = "ready"
        log.info("tier %s, cluster %s: control plane %s ready in %.1f s", tier, cluster.name,
                 plane.name, time.monotonic() - started)

    async def _hpc_backend(self, tier: str, ts: TierSettings) -> FederatedHPCBackend:
        clusters = []
        for name, cs in ts.cluster_settings().items():
            clusters.append(await self._cluster(tier, name, cs))
        federation = FederatedHPCBackend(tier, clusters)
        for cluster in clusters:
            cluster.pool.start()
            self._warmups.append(asyncio.create_task(self._warm(tier, cluster),
                                                     name=f"warm-{tier}-{cluster.name}"))
        return federation

    async def _cluster(self, tier: str, name: str, cs: ClusterSettings) -> Cluster:
        assert cs.base_url is not None
        relay_url: str | None = None
        secret: bytes | None = None
        relay = None
        if cs.transport == "relay" and cs.relay_url:
            secret = _relay_secret(cs.relay_secret_env, cs.relay_secret_file)
            relay_url = cs.relay_url
        elif cs.transport == "relay":
            # Tokens are minted and checked in this process, so a fresh secret will do.
            secret = os.urandom(32)
            relay = await RelayServer(secret).start("127.0.0.1", 0)
            self.relays.append(relay)
            self.relay = self.relay or relay
            relay_url = f"ws://127.0.0.1:{relay.port}"
        data_dir = self.settings.server.data_dir
        if name != "default" and not cs.parsl.run_dir:
            # Each cluster's Parsl engine keeps its own run directory.
            cs = cs.model_copy(update={"parsl": cs.parsl.model_copy(update={
                "run_dir": os.path.join(os.path.expanduser(data_dir), "parsl", name)})})
        if name != "default" and not cs.slurm.work_dir:
            # And each cluster's sbatch plane its own job files.
            cs = cs.model_copy(update={"slurm": cs.slurm.model_copy(update={
                "work_dir": os.path.join(os.path.expanduser(data_dir), "slurm", name)})})
        plane = await asyncio.to_thread(make_control_plane, cs, data_dir)
        self.planes.append(plane)
        agents = cs.agents
        if agents.max and relay_url is None:
            log.warning("tier %s, cluster %s: agents need the relay; they are off", tier, name)
            agents = agents.model_copy(update={"max": 0, "min_warm": 0})
        pool = AgentPool(name, agents, plane, relay_url or "", secret or b"", cs.base_url,
                         cs.api_key_env)
        backend = HPCRelayBackend(
            tier, IdempotentSubmitter(AgentFirstPlane(pool, plane), ttl_s=cs.idempotency_ttl_s),
            relay_url, secret, cs.base_url, deadlines=cs.deadlines, encrypt=cs.encrypt,
            token_ttl_s=cs.token_ttl_s, transport=cs.transport, api_key_env=cs.api_key_env,
            models=cs.models, accounts=cs.accounts,
        )
        self.pools.append(pool)
        return Cluster(name, cs, backend, pool, plane, relay)

    async def _autodetect(self, tier: str) -> TierSettings:
        if tier == "local" and self.settings.server.detect_ollama:
            url = self.settings.server.ollama_url
            models = await _ollama_models(url)
            if models:
                self.origin[tier] = f"Ollama answered at {url}"
                return TierSettings(kind="ollama", base_url=url, models=models)
            self.origin[tier] = f"no Ollama with a pulled model at {url}"
        elif tier == "hpc":
            # The whole dual-channel path on this machine; Parsl is an extra, so without it
            # the jobs go to a local process pool instead.
            if importlib.util.find_spec("parsl") is not None:
                self.origin[tier] = "not configured: local Parsl engine + in-process relay"
                return TierSettings(kind="hpc")
            self.origin[tier] = "not configured, Parsl not installed: process pool + relay"
            return TierSettings.model_validate({"hpc": {"control_plane": "local"}})
        elif tier == "cloud" and os.environ.get("OPENROUTER_API_KEY"):
            self.origin[tier] = "OPENROUTER_API_KEY is set"
            return TierSettings(
                kind="openai",
                base_url=OPENROUTER_URL,
                api_key_env="OPENROUTER_API_KEY",
                models=[OPENROUTER_DEFAULT_MODEL],
            )
        else:
            self.origin[tier] = "not configured"
        return TierSettings(kind="simulator")

    async def _start_simulator(
        self, simulated: dict[str, TierSettings], resolved: dict[str, TierSettings]
    ) -> None:
        models: dict[str, SimModelSettings] = {}
        for tier, ts in simulated.items():
            if ts.clusters:
                # Each cluster without a backend of its own gets its models simulated.
                for cs in ts.clusters.values():
                    if cs.base_url is None:
                        for name in cs.models or [f"sim-{tier}"]:
                            models[name] = cs.simulator or ts.simulator or SIM_PROFILES[tier]
                continue
            names = ts.models or [f"sim-{tier}"]
            spec = ts.simulator or SIM_PROFILES[tier]
            for name in names:
                models[name] = spec
            resolved[tier] = ts.model_copy(update={"models": names})
        self.simulator = Simulator(SimSettings(models=models))
        self._sim_server = ServerTask(self.simulator.app).start()
        url = f"{self._sim_server.url}/v1"
        for tier, ts in simulated.items():
            if ts.clusters:
                clusters = {n: c if c.base_url else c.model_copy(update={
                    "base_url": url, "models": c.models or [f"sim-{tier}"]})
                    for n, c in ts.clusters.items()}
                names = list(dict.fromkeys(m for c in clusters.values() for m in c.models))
                resolved[tier] = resolved[tier].model_copy(update={
                    "clusters": clusters, "models": ts.models or names})
            else:
                resolved[tier] = resolved[tier].model_copy(update={"base_url": url})

    async def probe_all(self) -> None:
        results = await asyncio.gather(*(b.probe() for b in self.backends.values()))
        for tier, result in zip(self.backends, results, strict=True):
            h = self.health[tier]
            h.state = "up" if result.ok else "down"
            h.detail, h.checked_at = result.detail, time.monotonic()
            # Ollama gains models as users pull them, and a tier configured without a model
            # list serves what its backend lists; configured models stay first.
            discover = self.tiers[tier].kind == "ollama" or not self.tiers[tier].models
            if result.ok and discover and result.models:
                known = self.catalogue[tier]
                known.extend(m for m in result.models if m not in known)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.routing.health_interval_s)
            try:
                await self.probe_all()
            except Exception:  # a probe bug must not kill the monitor
                log.exception("tier health probe failed")


def preflight(settings: Settings) -> None:
    """Configuration problems that can be found before starting anything, raised as
    ConfigError so that `serve` can say what is wrong instead of failing in startup (or, worse,
    starting something that can never work)."""
    if settings.server.database_url:
        try:
            checked_url(settings.server.database_url)
        except StoreConfigError as e:
            raise ConfigError(f"server.database_url: {e}") from None
    for name, ts in settings.tiers.items():
        if not (ts.enabled and ts.kind == "hpc" and ts.hpc):
            continue
        for cname, h in ts.cluster_settings().items():
            # Where a setting lives: the tier itself, or one of its clusters.
            where = f"tiers.{name}.clusters.{cname}" if ts.clusters else f"tiers.{name}"
            sect = where if ts.clusters else f"{where}.hpc"
            _preflight_cluster(h, where, sect)


def _preflight_cluster(h: ClusterSettings, where: str, sect: str) -> None:
    remote = h.control_plane == "globus" or (
        h.control_plane == "parsl" and h.parsl.provider != "local"
    )
    if remote and not h.base_url:
        raise ConfigError(
            f"{where}.base_url: jobs on a cluster need the address of its vLLM as the "
            "nodes reach it (only a control plane on this machine can use the simulator)"
        )
    if h.base_url and not h.models:
        raise ConfigError(
            f"{where}.models: list the models the cluster's vLLM serves; the gateway cannot "
            "ask it, it is behind the cluster's firewall"
        )
    if remote and h.transport == "relay" and not h.relay_url:
        raise ConfigError(
            f"{sect}.relay_url: cluster nodes cannot reach a relay on this machine's "
            "loopback; run `streamllm relay` where they can, or set transport: batch"
        )
    extra = {"parsl": ("parsl", "parsl"), "globus": ("globus_compute_sdk", "globus")}
    if h.control_plane in extra:
        module, name_of_extra = extra[h.control_plane]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"{sect}.control_plane {h.control_plane} needs the {module} package: "
                f"pip install 'streamllm[{name_of_extra}]'"
            )
    if h.transport == "relay" and h.relay_url:
        _relay_secret(h.relay_secret_env, h.relay_secret_file, sect)


def _relay_secret(env: str, path: str | None, where: str = "tiers.hpc.hpc") -> bytes:
    if path:
        try:
            secret = open(os.path.expanduser(path), "rb").read().strip()
        except OSError as e:
            raise ConfigError(f"{where}.relay_secret_file: cannot read it: {e}") from None
    else:
        secret = os.environ.get(env, "").encode()
    if len(secret) < 32:
        raise ConfigError(
            f"the hpc tier's relay needs its token secret (at least 32 bytes) in ${env} or "
            f"{where}.relay_secret_file: the same one `streamllm relay` was started with"
        )
    return secret


async def _ollama_models(url: str) -> list[str]:
    try:
        async with httpx2.AsyncClient(timeout=0.5) as client:
            resp = await client.get(f"{url}/models")
            if resp.status_code == 200:
                return [m["id"] for m in resp.json().get("data", [])]
    except (httpx2.HTTPError, ValueError, KeyError, TypeError):
        pass
    return []
