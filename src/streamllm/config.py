"""Settings: one YAML file plus `STREAMLLM_*` environment overrides, validated in one place.

`docs/configuration.md` documents every field below; keep the two in step.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from streamllm.errors import ConfigError

TierName = Literal["local", "hpc", "cloud"]
Complexity = Literal["LOW", "MEDIUM", "HIGH"]
TIERS: tuple[TierName, ...] = ("local", "hpc", "cloud")
COMPLEXITIES: tuple[Complexity, ...] = ("LOW", "MEDIUM", "HIGH")

Seconds = Annotated[float, Field(gt=0)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class _Strict(BaseModel):
    # A misspelt key in a config file should fail loudly, not be ignored.
    model_config = ConfigDict(extra="forbid")


class Timeouts(_Strict):
    connect: Seconds = 5.0
    first_token: Seconds = 120.0
    between_tokens: Seconds = 60.0
    total: Seconds = 900.0


class SimModelSettings(_Strict):
    """One simulated model: its window, speed, answer length and injected faults."""

    context_window: Annotated[int, Field(ge=16)] = 8192
    ttft_ms: Annotated[float, Field(ge=0)] = 0.0
    tokens_per_s: Annotated[float, Field(ge=0)] = 0.0  # 0 = as fast as possible
    # Reading the prompt before the first token, as real servers do (0 = instantaneous).
    prefill_tokens_per_s: Annotated[float, Field(ge=0)] = 0.0
    answer_tokens: Annotated[int, Field(ge=1)] = 32
    error_rate: Probability = 0.0  # share of requests answered 500
    rate_limit_rate: Probability = 0.0  # share of requests answered 429
    disconnect_after: Annotated[int, Field(ge=0)] | None = None  # drop the stream after N tokens
    stall_after: Annotated[int, Field(ge=0)] | None = None  # stop sending after N tokens...
    stall_s: Annotated[float, Field(ge=0)] = 3600.0  # ...for this long
    honours_max_completion_tokens: bool = True  # False behaves like Ollama
    # A fixed answer instead of the generated one ("" answers nothing): for testing callers
    # that read what a model says, such as the LLM complexity judge.
    reply: str | None = None


class SimSettings(_Strict):
    models: dict[str, SimModelSettings] = Field(
        default_factory=lambda: {"sim-model": SimModelSettings()}
    )
    seed: int = 0  # fault draws are reproducible for a given seed


BackendKind = Literal["openai", "vllm", "ollama", "llamacpp", "simulator", "hpc"]


class HPCDeadlines(_Strict):
    """How long an HPC request may take at each stage before it fails over or ends."""

    producer_connect: Seconds = 60.0  # the worker's first frame (or its result) must come by then
    first_token: Seconds = 300.0
    between_tokens: Seconds = 60.0
    total: Seconds = 1800.0


class ParslSettings(_Strict):
    provider: Literal["local", "slurm", "pbspro"] = "local"
    max_workers: Annotated[int, Field(ge=1)] = 4  # per node
    provider_options: dict[str, Any] = Field(default_factory=dict)  # passed to the provider
    address: str = "127.0.0.1"  # where workers reach the interchange (a login node's address)
    run_dir: str | None = None  # default: <data_dir>/parsl
    heartbeat_s: Annotated[float, Field(ge=1)] = 5.0  # a lost worker's job fails within ~this


class GlobusSettings(_Strict):
    endpoint_id: str | None = None  # the cluster's Globus Compute endpoint (a UUID)
    # For multi-user endpoints: values for the endpoint's config template (account, partition).
    user_endpoint_config: dict[str, Any] = Field(default_factory=dict)
    resource_specification: dict[str, Any] = Field(default_factory=dict)
    amqp_port: int | None = None  # 443 where outbound 5671 is blocked


class SlurmSettings(_Strict):
    """Jobs submitted with `sbatch`, one Slurm job per request, agent or batch chunk, so the
    scheduler sees each as its caller's (docs/hpc-as-api.md). Parsl's `SlurmProvider` instead
    runs every request in shared pilot jobs."""

    partition: str | None = None
    account: str | None = None  # the default account; callers listed in `accounts` use theirs
    walltime: str = "00:30:00"  # per-request and batch jobs (agents: agents.walltime_s)
    options: list[str] = Field(default_factory=list)  # more sbatch options: --gres=gpu:1, --qos=
    python: str | None = None  # the nodes' interpreter with streamllm installed; default: ours
    # Shell lines the job runs first (activate an environment, export the vLLM key from a file).
    setup: str = ""
    # The gateway's environment variables a job gets (sbatch --export); nothing else of it:
    # a gateway's environment holds secrets (cloud keys) that have no business on a node.
    export: list[str] = Field(default_factory=lambda: ["SSL_CERT_FILE", "SSL_CERT_DIR"])
    work_dir: str | None = None  # job calls, outputs and results, on the cluster's filesystem
    # Prefixed to every scheduler command (sbatch, squeue, scancel, and cat for results):
    # ["ssh", "login1.hpc.example.edu"] from a gateway outside the cluster; none: run here.
    # The command is then given as one shell-quoted string, as ssh passes it to a shell.
    login_command: list[str] = Field(default_factory=list)
    poll_s: Seconds = 2.0  # one squeue for all of our jobs this often
    command_timeout_s: Seconds = 30.0  # one scheduler command; a login node slower is unwell
    # A job that ended well may show its result this much later (a shared filesystem's cache).
    result_wait_s: Seconds = 15.0


class AgentSettings(_Strict):
    """Warm agents: long-running workers started through the control plane that take requests
    over the relay, so a request pays no job dispatch (docs/federation.md). Off by default."""

    min_warm: Annotated[int, Field(ge=0)] = 0  # kept running even when idle
    max: Annotated[int, Field(ge=0)] = 0  # 0: no agents, every request is its own job
    max_concurrency: Annotated[int, Field(ge=1)] = 32  # requests one agent serves at once
    idle_timeout_s: Seconds = 900.0  # an agent above min_warm idle this long is stopped
    walltime_s: Seconds = 3600.0  # the batch job's walltime: the agent exits by then...
    replace_before_s: Seconds = 300.0  # ...and is replaced this long before it does
    heartbeat_s: Seconds = 5.0
    launch_timeout_s: Seconds = 900.0  # an agent not ready by then is given up (queue, load)
    backend_wait_s: Seconds = 900.0  # how long an agent waits for the cluster's vLLM to load
    # A lost connection (relay restart, dropped flow) moves both ends to a new channel, at most
    # `reconnects` times per agent, each within `reconnect_s`; then the agent is replaced.
    reconnects: Annotated[int, Field(ge=0, le=1000)] = 16
    reconnect_s: Seconds = 120.0

    @model_validator(mode="after")
    def _bounds(self) -> AgentSettings:
        if self.min_warm > self.max:
            raise ValueError("agents.min_warm cannot exceed agents.max")
        if self.replace_before_s >= self.walltime_s:
            raise ValueError("agents.replace_before_s must be shorter than agents.walltime_s")
        return self


class HPCSettings(_Strict):
    """How the `hpc` tier reaches its cluster: a control plane for jobs, a relay for tokens."""

    control_plane: Literal["parsl", "globus", "local", "slurm"] = "parsl"
    globus: GlobusSettings = Field(default_factory=GlobusSettings)
    parsl: ParslSettings = Field(default_factory=ParslSettings)
    slurm: SlurmSettings = Field(default_factory=SlurmSettings)
    # Whose allocation a caller's jobs are charged to: caller (key) name -> scheduler account.
    # Callers not listed use the control plane's default account (slurm.account).
    accounts: dict[str, str] = Field(default_factory=dict)
    local_workers: Annotated[int, Field(ge=1)] = 4  # with control_plane: local
    transport: Literal["relay", "batch"] = "relay"
    relay_url: str | None = None  # ws:// or wss://; none: an in-process relay on loopback
    relay_secret_env: str = "STREAMLLM_RELAY_SECRET"  # same secret as `streamllm relay`
    relay_secret_file: str | None = None  # or read it from this file
    encrypt: bool = True
    token_ttl_s: Seconds = 120.0  # how long a relay capability token stays valid
    idempotency_ttl_s: Seconds = 600.0  # a retry within this joins the running job
    deadlines: HPCDeadlines = Field(default_factory=HPCDeadlines)
    agents: AgentSettings = Field(default_factory=AgentSettings)
    # While a cluster is starting (no agent ready and its control plane not warm): "fallback"
    # lets `auto` move on to the next tier at once; "wait" holds the request until the
    # cluster is ready, for up to cold_start_wait_s (then the next cluster or tier is tried).
    cold_start: Literal["fallback", "wait"] = "fallback"
    cold_start_wait_s: Seconds = 900.0

    @model_validator(mode="after")
    def _complete(self) -> HPCSettings:
        if self.control_plane == "globus" and not self.globus.endpoint_id:
            raise ValueError("control_plane: globus needs globus.endpoint_id")
        if self.accounts and self.control_plane != "slurm":
            # Parsl's pilot jobs and a Globus endpoint's workers are shared by every caller.
            raise ValueError("accounts (per-caller scheduler accounts) need control_plane: "
                             "slurm, which submits each request as a job of its own")
        if self.relay_url and not self.relay_url.startswith(("ws://", "wss://")):
            raise ValueError("relay_url must start with ws:// or wss://")
        return self


class ClusterSettings(HPCSettings):
    """One cluster of a federated `hpc` tier: its control plane, relay and models."""

    base_url: str | None = None  # the cluster's vLLM as its nodes reach it; none: simulated
    models: list[str] = Field(default_factory=list)
    api_key_env: str | None = None  # read on the cluster node, never sent
    simulator: SimModelSettings | None = None  # when simulated


class Price(_Strict):
    input_per_mtok: Annotated[float, Field(ge=0)] = 0.0
    output_per_mtok: Annotated[float, Field(ge=0)] = 0.0


class TierSettings(_Strict):
    """How one tier is reached. `kind: simulator` (or no `base_url`) means the embedded simulator."""

    enabled: bool = True  # false removes the tier entirely (no simulator stands in)
    kind: BackendKind = "simulator"
    base_url: str | None = None
    api_key_env: str | None = None  # name of the environment variable holding the key
    models: list[str] = Field(default_factory=list)  # first one is the tier's default
    timeouts: Timeouts = Field(default_factory=Timeouts)
    drop_params: list[str] = Field(default_factory=list)  # request fields this backend rejects
    # Tokens the tier's models hold (prompt + answer); none: unknown, never skipped for size.
    context_window: Annotated[int, Field(ge=16)] | None = None
    # A local HuggingFace `tokenizer.json` (needs the `tokenizers` package) or a local GGUF
    # model file, `.gguf` (needs llama-cpp-python; its vocabulary and chat template only) for
    # exact counts; none: estimates calibrated from the token counts the backend reports.
    tokenizer: str | None = None
    # USD per million tokens, by model name ("*" for any other model of the tier).
    prices: dict[str, Price] = Field(default_factory=dict)
    max_connections: Annotated[int, Field(ge=1)] = 256
    # "auto": streamed completions over plain http:// (with no proxy in the environment for
    # that host) use STREAM's lean HTTP/1.1 client; "httpx" always uses httpx2.
    stream_client: Literal["auto", "httpx"] = "auto"
    simulator: SimModelSettings | None = None  # per-tier simulator behaviour when simulated
    # kind: hpc only. base_url is then the cluster's vLLM as its worker nodes reach it; with
    # no base_url the embedded simulator stands in for it.
    hpc: HPCSettings | None = None
    # kind: hpc only. Several clusters behind one model namespace; when given, each cluster
    # has its own control plane, relay and models, and `hpc`/`base_url` are not used.
    clusters: dict[str, ClusterSettings] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _url_implies_openai(cls, data: Any) -> Any:
        # With no kind, an hpc section means the HPC path, and a base_url "an OpenAI-compatible
        # server"; neither ever means "simulate it".
        if isinstance(data, dict) and "kind" not in data:
            if data.get("hpc") is not None or data.get("clusters"):
                return {**data, "kind": "hpc"}
            if data.get("base_url"):
                return {**data, "kind": "openai"}
        return data

    @model_validator(mode="after")
    def _needs_url(self) -> TierSettings:
        if self.kind not in ("simulator", "hpc") and not self.base_url:
            raise ValueError(f"kind '{self.kind}' needs a base_url")
        if self.hpc is not None and self.kind != "hpc":
            raise ValueError("the hpc section belongs to a tier of kind 'hpc'")
        if self.clusters and self.kind != "hpc":
            raise ValueError("clusters belong to a tier of kind 'hpc'")
        if self.kind == "hpc" and self.hpc is None:
            self.hpc = HPCSettings()
        if self.clusters and not self.models:
            self.models = list(dict.fromkeys(m for c in self.clusters.values()
                                             for m in c.models))
        return self

    def cluster_settings(self) -> dict[str, ClusterSettings]:
        """The clusters behind a kind hpc tier: as configured, or the one `hpc` section."""
        if self.clusters:
            return dict(self.clusters)
        assert self.hpc is not None
        return {"default": ClusterSettings(**self.hpc.model_dump(), base_url=self.base_url,
                                           models=list(self.models),
                                           api_key_env=self.api_key_env,
                                           simulator=self.simulator)}

    @property
    def simulated(self) -> bool:
        """Answers are synthetic: the simulator is the backend (or the cluster's backend)."""
        if self.kind == "hpc" and self.clusters:
            return all(c.base_url is None for c in self.clusters.values())
        return self.kind == "simulator" or (self.kind == "hpc" and not self.base_url)

    def price(self, model: str) -> Price | None:
        return self.prices.get(model) or self.prices.get("*")

    @property
    def default_model(self) -> str | None:
        return self.models[0] if self.models else None


class LLMJudgeSettings(_Strict):
    """The language model the `llm` and `cascade` judges ask."""

    tier: TierName = "local"
    model: str | None = None  # default: the tier's default model
    timeout_s: Seconds = 2.0  # after this the classifier decides instead


class JudgeSettings(_Strict):
    kind: Literal["classifier", "llm", "cascade"] = "classifier"
    model_path: str | None = None  # a classifier trained with `streamllm judge train --out`
    cascade_threshold: Probability = 0.6  # classifier confidence below which the LLM is asked
    llm: LLMJudgeSettings = Field(default_factory=LLMJudgeSettings)
    context_turns: Annotated[int, Field(ge=0, le=10)] = 2  # earlier user turns shown to it
    cache_size: Annotated[int, Field(ge=0)] = 4096


class PrivacySettings(_Strict):
    """Requests that carry personal data or secrets stay on in-house tiers (local, hpc)."""

    detect: bool = True
    kinds: list[Literal["email", "phone", "national_id", "card", "api_key", "private_key"]] = (
        Field(default_factory=lambda: ["email", "phone", "national_id", "card", "api_key",
                                       "private_key"]))
    patterns: dict[str, str] = Field(default_factory=dict)  # name -> regular expression

    @model_validator(mode="after")
    def _patterns_compile(self) -> PrivacySettings:
        for name, pattern in self.patterns.items():
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"patterns.{name} is not a valid regular expression: {e}")
        return self


class BudgetSettings(_Strict):
    """A cloud budget for all callers together, per calendar month (UTC), from the usage
    ledger. Keys may have budgets of their own."""

    usd: Annotated[float, Field(gt=0)] | None = None  # none: no budget for everyone
    soft_start: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.5  # share spent where it starts to bite


class RoutingSettings(_Strict):
    allow_cloud: bool = True
    judge: JudgeSettings = Field(default_factory=JudgeSettings)
    # `auto` sends a request to the HIGH tier only when the judge's P(HIGH) reaches this;
    # a budget being spent raises it smoothly towards 1.
    high_threshold: Probability = 0.5
    privacy: PrivacySettings = Field(default_factory=PrivacySettings)
    budget: BudgetSettings = Field(default_factory=BudgetSettings)
    tier_for: dict[Complexity, TierName] = Field(
        default_factory=lambda: {"LOW": "local", "MEDIUM": "hpc", "HIGH": "cloud"}
    )
    fallback: dict[Complexity, list[TierName]] = Field(
        default_factory=lambda: {
            "LOW": ["local", "hpc", "cloud"],
            "MEDIUM": ["hpc", "cloud", "local"],
            "HIGH": ["cloud", "hpc", "local"],
        }
    )
    fallback_on_explicit: bool = False  # an explicit tier is honoured strictly by default
    health_interval_s: Seconds = 15.0
    unhealthy_for_s: Seconds = 10.0  # a tier that just failed is tried last for this long

    @model_validator(mode="before")
    @classmethod
    def _labels_any_case(cls, data: Any) -> Any:
        # Environment overrides arrive lower-cased (STREAMLLM_ROUTING__TIER_FOR__LOW=hpc).
        if isinstance(data, dict):
            data = dict(data)
            for key in ("tier_for", "fallback"):
                if isinstance(data.get(key), dict):
                    data[key] = {str(k).upper(): v for k, v in data[key].items()}
        return data

    @model_validator(mode="after")
    def _complete_chains(self) -> RoutingSettings:
        for level in COMPLEXITIES:
            chain = self.fallback.get(level)
            if chain is not None and len(set(chain)) != len(chain):
                raise ValueError(f"fallback.{level} names a tier twice: {chain}")
            if chain is None:
                self.fallback[level] = list(TIERS)
        return self

    def chain(self, level: Complexity) -> list[TierName]:
        """Tiers to try for a label: its `tier_for` tier first, then its fallback order."""
        first = self.tier_for.get(level)
        rest = [t for t in self.fallback[level] if t != first]
        return ([first] if first else []) + rest


class ApiKeySettings(_Strict):
    """One API key given in the configuration, and what it may do. Keys made with
    `streamllm keys create` live in the store instead and have the same rights."""

    key: Annotated[str, Field(min_length=8)]
    name: str | None = None  # for logs and budgets; default: a short digest of the key
    admin: bool = False  # may see everyone's usage
    allow_cloud: bool = True  # false keeps this key's requests on local and hpc
    allow_tiers: list[TierName] | None = None  # none: every tier
    budget_usd: Annotated[float, Field(gt=0)] | None = None  # per calendar month (UTC)
    rpm: Annotated[int, Field(ge=1)] | None = None  # requests per minute
    max_concurrent: Annotated[int, Field(ge=1)] | None = None  # requests in flight at once

    @property
    def holder(self) -> str:
        return self.name or "key-" + hashlib.sha256(self.key.encode()).hexdigest()[:8]


class SummarizerSettings(_Strict):
    """The model that writes rolling summaries; the extractive summarizer stands in for it."""

    tier: TierName = "local"
    model: str | None = None  # default: the tier's default model
    timeout_s: Seconds = 60.0  # after this the extractive summary is used


class ContextSettings(_Strict):
    """Fitting conversations to each tier's context window (docs/context.md)."""

    summarize: bool = True  # false: a conversation too long for a tier skips that tier
    reserve_output_tokens: Annotated[int, Field(ge=16)] = 512  # when a request gives no limit
    # After older turns are summarised, the recent turns kept word for word take at most this
    # share of the window, so that the next several turns fit without summarising again.
    verbatim_share: Annotated[float, Field(gt=0.1, lt=0.9)] = 0.5
    summary_share: Annotated[float, Field(gt=0.0, le=0.5)] = 0.25  # most a summary may take
    summary_max_tokens: Annotated[int, Field(ge=64)] = 1024
    prepare_ahead: bool = True  # write the next turn's summary after a response
    prepare_at: Annotated[float, Field(gt=0.0, le=1.0)] = 0.7  # ... once this full
    summarizer: SummarizerSettings = Field(default_factory=SummarizerSettings)


class BatchSettings(_Strict):
    """The Batch API (docs/batch.md): uploaded files, and how a batch's lines are run."""

    max_file_bytes: Annotated[int, Field(ge=1)] = 200 * 1024 * 1024  # one upload; over: 413
    max_lines: Annotated[int, Field(ge=1)] = 50_000  # lines in one batch's input file
    chunk_size: Annotated[int, Field(ge=1)] = 50  # lines handed to a runner at a time
    chunks_at_once: Annotated[int, Field(ge=1)] = 4  # chunks the tiers' runner takes at once
    lines_at_once: Annotated[int, Field(ge=1)] = 8  # requests in flight within one chunk
    # On shutdown, requests in flight get this long to finish (and be kept) before they are
    # cut off; the rest of the batch resumes at the next start.
    drain_s: Annotated[float, Field(ge=0)] = 10.0
    # A gateway holds each batch it runs for this long, renewed while it runs; a batch whose
    # gateway died is taken over by another (or by the next start) once this has passed.
    lease_s: Seconds = 60.0


class OAuthSettings(_Strict):
    """Institutional login: bearer tokens checked by OAuth token introspection (RFC 7662),
    as Globus Auth provides it."""

    introspection_url: str
    client_id: str
    client_secret_env: str = "STREAMLLM_OAUTH_CLIENT_SECRET"  # never the secret itself
    allowed_domains: list[str] = Field(default_factory=list)
    allowed_groups: list[str] = Field(default_factory=list)
    groups_claim: str = "groups"
    required_scope: str | None = None
    cache_s: Seconds = 60.0
    allow_cloud: bool = True  # for every signed-in user
    budget_usd: Annotated[float, Field(gt=0)] | None = None  # per user and calendar month


class ServerSettings(_Strict):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    max_body_bytes: Annotated[int, Field(ge=1024)] = 10 * 1024 * 1024
    log_prompts: bool = False
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    detect_ollama: bool = True  # with no local tier configured, use Ollama if it answers
    ollama_url: str = "http://127.0.0.1:11434/v1"  # where detection looks for Ollama
    data_dir: str = Field(default_factory=lambda: _default_data_dir())
    # "hpc-as-api": serve only the hpc tier's models, and require API keys.
    profile: Literal["stream", "hpc-as-api"] = "stream"
    # Accepted Bearer keys (none: open, loopback only): a key, or a key with its limits.
    api_keys: list[str | ApiKeySettings] = Field(default_factory=list)
    api_keys_file: str | None = None  # one key per line; '#' starts a comment
    # Where STREAM keeps what must survive a restart; none: SQLite in data_dir.
    database_url: str | None = None
    oauth: OAuthSettings | None = None
    key_cache_s: Annotated[float, Field(ge=0)] = 10.0  # a revoked key stops within this
    session_hours: Annotated[float, Field(gt=0)] = 12.0  # web chat sign-in lifetime
    log_format: Literal["text", "json"] = "text"
    metrics: bool = True  # serve /metrics (Prometheus) without a key

    def load_api_keys(self) -> list[ApiKeySettings]:
        keys = [k if isinstance(k, ApiKeySettings) else ApiKeySettings(key=k)
                for k in self.api_keys if k]
        if self.api_keys_file:
            try:
                lines = Path(self.api_keys_file).expanduser().read_text().splitlines()
            except OSError as e:
                raise ConfigError(f"server.api_keys_file: cannot read it: {e}") from None
            for ln in lines:
                key = ln.split("#", 1)[0].strip()
                if not key:
                    continue
                if len(key) < 8:
                    raise ConfigError("server.api_keys_file: a key is shorter than 8 characters")
                keys.append(ApiKeySettings(key=key))
        return keys


def _default_data_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(base) / "streamllm")


class Settings(_Strict):
    server: ServerSettings = Field(default_factory=ServerSettings)
    tiers: dict[TierName, TierSettings] = Field(default_factory=dict)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    context: ContextSettings = Field(default_factory=ContextSettings)
    batch: BatchSettings = Field(default_factory=BatchSettings)
    aliases: dict[str, str] = Field(default_factory=dict)  # name -> tier or tier/model

    @model_validator(mode="after")
    def _aliases_resolve(self) -> Settings:
        for start in self.aliases:
            seen, name = [start], self.aliases[start]
            while name in self.aliases:
                if name in seen:
                    raise ValueError(f"aliases form a cycle: {' -> '.join(seen + [name])}")
                seen.append(name)
                name = self.aliases[name]
        return self

    @model_validator(mode="after")
    def _apply_profile(self) -> Settings:
        # HPC-as-API: the cluster alone behind the OpenAI API; nothing may fall back elsewhere.
        if self.server.profile == "hpc-as-api":
            for other in ("local", "cloud"):
                self.tiers[other] = TierSettings(enabled=False)  # type: ignore[index]
            if "hpc" not in self.tiers:
                self.tiers["hpc"] = TierSettings(kind="hpc")
            elif self.tiers["hpc"].kind != "hpc":
                raise ValueError("server.profile hpc-as-api needs tiers.hpc to be of kind 'hpc'")
            self.routing.allow_cloud = False
            self.routing.tier_for = {level: "hpc" for level in COMPLEXITIES}
            self.routing.fallback = {level: ["hpc"] for level in COMPLEXITIES}
        return self

    def tier(self, name: str) -> TierSettings | None:
        return self.tiers.get(name)  # type: ignore[call-overload]


ENV_PREFIX = "STREAMLLM_"
SERVER_SHORTHANDS = ("host", "port", "log_level")
# STREAMLLM_ variables that are not settings: the config file's path, the relay's secret.
NOT_OVERRIDES = {ENV_PREFIX + "CONFIG", ENV_PREFIX + "RELAY_SECRET"}


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    """`STREAMLLM_ROUTING__ALLOW_CLOUD=false` -> {"routing": {"allow_cloud": False}}.

    Values are parsed as YAML scalars/flow collections so lists and booleans can be given.
    """
    tree: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or key in NOT_OVERRIDES:
            continue
        path = [p.lower() for p in key[len(ENV_PREFIX) :].split("__") if p]
        if len(path) == 1 and path[0] in SERVER_SHORTHANDS:
            path = ["server", path[0]]  # STREAMLLM_PORT means STREAMLLM_SERVER__PORT
        if not path:
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: conflicts with another STREAMLLM_ variable")
        node[path[-1]] = value
    return tree


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _describe(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {where}: {e['msg']}")
    return "\n".join(lines)


def load_settings(
    path: str | os.PathLike[str] | None = None, environ: dict[str, str] | None = None
) -> Settings:
    """Read the YAML file (argument, else `STREAMLLM_CONFIG`, else none) and apply env overrides."""
    environ = dict(os.environ if environ is None else environ)
    path = path or environ.get(ENV_PREFIX + "CONFIG") or None
    data: dict[str, Any] = {}
    source = "defaults"
    if path:
        p = Path(path)
        source = str(p)
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"configuration file not found: {p}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"configuration file {p} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"configuration file {p} must hold a mapping at the top level")
        data = loaded
    overrides = _env_overrides(environ)
    if overrides:
        source += " + STREAMLLM_* environment"
    try:
        return Settings.model_validate(_merge(data, overrides))
    except ValidationError as e:
        raise ConfigError(_describe(e, source)) from None
