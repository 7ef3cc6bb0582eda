"""The `hpc` tier as a federation: several clusters behind one model namespace.

Each cluster has its own control plane, relay, models and (optionally) warm agents. A request
for a model goes to a cluster that serves it, chosen by state (ready before starting before
queued; offline last), recent failure and load (requests in flight). If a cluster fails before
the first token, the next one takes over, invisibly to the client; after it, the stream ends
with an error event as on any tier.

While no cluster for the model is ready, the cluster's `cold_start` setting decides: `fallback`
fails over at once (the router moves to the next tier, reason `fallback:hpc-starting`), `wait`
holds the request until the cluster is ready (up to `cold_start_wait_s`), then sends it, and
says where it stood in `x-stream-queue-position` and `x-stream-estimated-wait-s`. A request
sent to a cold cluster is never dispatched before the cluster is ready: its job would only meet
a server that is still loading.

A request carrying an idempotency key goes to the cluster that took the first request with that
key (while it is not offline), so that a retry joins the job already running there instead of
starting a second one on another cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from streamllm.config import ClusterSettings
from streamllm.errors import BackendFailed, BackendRejected, ContextTooLong
from streamllm.hpc.control import ControlPlane
from streamllm.relay.server import RelayServer
from streamllm.tiers.agents import AgentPool
from streamllm.tiers.base import Chunk, Dispatch, ProbeResult, waiting_note
from streamllm.tiers.hpc import HPCRelayBackend
from streamllm.tiers.openai_http import has_output

STATE_RANK = {"ready": 0, "starting": 1, "queued": 2, "offline": 3}
FAILED_FOR_S = 10.0  # a cluster that just failed is tried after the others for this long
READY_POLL_S = 0.25  # how often a request held for a cold cluster looks again
# A streamed request held for a cold cluster longer than WAIT_NOTE_AFTER_S gets its response
# started, with the queue headers, and is told where it stands every WAIT_NOTE_EVERY_S (an SSE
# comment), which also keeps proxies and clients from timing out an idle connection. A shorter
# hold (a control plane finishing its warm-up) is not worth losing the headers only known at
# dispatch (`x-stream-dispatch`, `x-stream-transport`).
WAIT_NOTE_AFTER_S = 5.0
WAIT_NOTE_EVERY_S = 15.0
MAX_KEYS = 10_000  # idempotency keys remembered at most (as each cluster's submitter)


class ClusterStarting(BackendFailed):
    """No cluster serving the model is ready yet, and the policy is not to wait."""

    code = "tier_starting"
    reason = "starting"


@dataclass
class Cluster:
    name: str
    settings: ClusterSettings
    backend: HPCRelayBackend
    pool: AgentPool
    plane: ControlPlane
    relay: RelayServer | None = None  # its in-process relay, when it has no relay_url
    plane_state: str = "starting"  # starting (its first job is running) | ready | failed
    relay_ok: bool = True  # its relay answered the last health probe
    detail: str = ""
    inflight: int = 0
    waiting: int = 0  # requests sent while it was not ready (its queue)
    failed_at: float | None = None
    served: int = 0

    @property
    def models(self) -> list[str]:
        return self.backend.models

    def state(self) -> str:
        if self.plane_state == "failed" or not self.relay_ok:
            return "offline"
        if self.pool.enabled and self.pool.settings.min_warm > 0:
            # With warm agents kept, an agent saying ready is the proof that the cluster's
            # backend (which may take many minutes to load a model) answers.
            if self.pool.ready():
                return "ready"
            if self.plane_state == "ready" and self.pool.reconnecting_after_ready():
                # The backend answered before the connection was lost: jobs serve meanwhile.
                return "ready"
            counts = self.pool.counts()
            return "queued" if counts["queued"] and not counts["starting"] else "starting"
        # Agents on demand only (min_warm 0), or none: jobs are the way in, so the control
        # plane's readiness is the cluster's; an agent ready early counts too.
        return "ready" if self.plane_state == "ready" or self.pool.ready() else "starting"

    async def until_ready(self, within: float) -> str:
        """Hold a request until this cluster is ready; its state when the wait ended."""
        # Polled: readiness is made of several parts (the control plane's warm-up, agents'
        # hellos, relay probes), and a start takes minutes, so a quarter second is nothing.
        deadline = time.monotonic() + within
        while (state := self.state()) not in ("ready", "offline") and \
                time.monotonic() < deadline:
            await asyncio.sleep(READY_POLL_S)
        return state

    def recently_failed(self) -> bool:
        return self.failed_at is not None and time.monotonic() - self.failed_at < FAILED_FOR_S

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "state": self.state(),
                               "inflight": self.inflight, "control_plane": self.plane.name,
                               "agents": self.pool.counts()}
        if self.state() != "ready":
            out["queue_position"] = self.waiting
            out["estimated_wait_s"] = round(self.pool.estimated_wait_s())
        if self.detail:
            out["detail"] = self.detail
        return out


@dataclass
class FederatedHPCBackend:
    tier: str
    clusters: list[Cluster]
    name: str = ""
    models: list[str] = field(default_factory=list)
    # idempotency key -> (when, the cluster that took it), oldest first
    _keyed: OrderedDict[str, tuple[float, Cluster]] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        self.name = (f"{len(self.clusters)} clusters: " if len(self.clusters) > 1 else "") + \
            ", ".join(f"{c.name} ({c.backend.name})" for c in self.clusters)
        self.models = list(dict.fromkeys(m for c in self.clusters for m in c.models))

    # -- placement ---------------------------------------------------------------------------
    def serving(self, model: str) -> list[Cluster]:
        return [c for c in self.clusters if model in c.models]

    def candidates(self, model: str) -> list[Cluster]:
        return sorted(self.serving(model), key=lambda c: (
            STATE_RANK[c.state()], c.recently_failed(), c.inflight))

    def model_state(self, model: str) -> str:
        found = self.serving(model)
        return min((c.state() for c in found), key=STATE_RANK.__getitem__) if found \
            else "offline"

    def endpoints(self, model: str) -> list[dict[str, Any]]:
        return [c.describe() for c in self.serving(model)]

    def _took(self, key: str | None) -> Cluster | None:
        """The cluster a request with this idempotency key went to, within its TTL."""
        if key is None:
            return None
        now = time.monotonic()
        while self._keyed:
            oldest, (at, cluster) = next(iter(self._keyed.items()))
            if now - at <= cluster.settings.idempotency_ttl_s and len(self._keyed) <= MAX_KEYS:
                break
            del self._keyed[oldest]
        found = self._keyed.get(key)
        return found[1] if found else None

    def _taken_by(self, dispatch: Dispatch, cluster: Cluster) -> None:
        if dispatch.idempotency_key:
            self._keyed.pop(dispatch.idempotency_key, None)
            self._keyed[dispatch.idempotency_key] = (time.monotonic(), cluster)

    def _plan(self, model: str, dispatch: Dispatch) -> list[Cluster]:
        ordered = self.candidates(model)
        took = self._took(dispatch.idempotency_key)
        if took in ordered and took.state() != "offline":
            # A retry: the job it may join runs there (the cluster's submitter decides).
            ordered.remove(took)
            ordered.insert(0, took)
        if not ordered:
            raise BackendFailed(f"{self.tier}: no cluster serves {model}", tier=self.tier)
        ready = [c for c in ordered if c.state() == "ready"]
        # A cold cluster is waited for when its policy says so, or when nothing else could
        # take the request anyway.
        waiting = [c for c in ordered if c.state() not in ("ready", "offline")
                   and (c.settings.cold_start == "wait" or not dispatch.may_fall_back)]
        if ready:
            return ready + waiting
        if not waiting:
            first = ordered[0]
            raise ClusterStarting(
                f"{self.tier}: no cluster serving {model} is ready ({first.name} is "
                f"{first.state()}, about {round(first.pool.estimated_wait_s())} s)",
                tier=self.tier)
        first = waiting[0]
        dispatch.headers["x-stream-queue-position"] = str(first.waiting + 1)
        dispatch.headers["x-stream-estimated-wait-s"] = str(round(
            first.pool.estimated_wait_s()))
        return waiting

    # -- requests -----------------------------------------------------------------------------
    async def _hold(self, cluster: Cluster, notes: bool) -> AsyncIterator[str]:
        """Hold a request for a cold cluster until it is ready, offline, or `cold_start_wait_s`
        has passed, in the cluster's queue meanwhile. With `notes`, a note on where it stands
        comes after WAIT_NOTE_AFTER_S and then every WAIT_NOTE_EVERY_S."""
        if cluster.state() == "ready":
            return
        cluster.waiting += 1
        try:
            deadline = time.monotonic() + cluster.settings.cold_start_wait_s
            step = WAIT_NOTE_AFTER_S
            while True:
                left = deadline - time.monotonic()
                state = await cluster.until_ready(min(left, step) if notes else left)
                if state in ("ready", "offline") or time.monotonic() >= deadline:
                    return
                yield (f"waiting for cluster {cluster.name} ({state}), about "
                       f"{round(cluster.pool.estimated_wait_s())} s")
                step = WAIT_NOTE_EVERY_S
        finally:
            cluster.waiting -= 1

    @staticmethod
    def _still_cold(cluster: Cluster) -> str | None:
        """Why a held request cannot go to `cluster` after all; None when it is ready."""
        state = cluster.state()
        if state == "ready":
            return None
        if state == "offline":
            return f"{cluster.name}: went offline while the request waited for it"
        return (f"{cluster.name}: still {state} after "
                f"{cluster.settings.cold_start_wait_s:.0f} s (cold_start_wait_s)")

    async def stream(self, body: dict[str, Any],
                     dispatch: Dispatch | None = None) -> AsyncIterator[list[Chunk]]:
        dispatch = dispatch or Dispatch()
        failures: list[str] = []
        for cluster in self._plan(body.get("model", ""), dispatch):
            cluster.inflight += 1
            stream = None
            held: list[Chunk] = []
            try:
                # Closed with this stream (a client that leaves while it waits), so that it
                # leaves the cluster's queue at once.
                async with contextlib.aclosing(self._hold(cluster, notes=True)) as notes:
                    async for note in notes:
                        # The response starts here (the client sees the queue headers now):
                        # the request is this tier's from here on.
                        dispatch.headers["x-stream-cluster"] = cluster.name
                        yield [waiting_note(note)]
                if (cold := self._still_cold(cluster)) is not None:
                    failures.append(cold)
                    continue
                self._taken_by(dispatch, cluster)
                stream = cluster.backend.stream(body, dispatch)
                try:
                    async for batch in stream:
                        held.extend(batch)
                        if any(has_output(chunk.data) for chunk in batch):
                            break
                except (BackendRejected, ContextTooLong):
                    raise  # the request itself is at fault: another cluster will not help
                except BackendFailed as e:
                    cluster.failed_at = time.monotonic()
                    failures.append(f"{cluster.name}: {e.message}")
                    continue
                dispatch.headers["x-stream-cluster"] = cluster.name
                cluster.failed_at = None
                cluster.served += 1
                if held:
                    yield held
                async for batch in stream:
                    yield batch
                return
            finally:
                cluster.inflight -= 1
                if stream is not None:
                    await stream.aclose()
        raise BackendFailed(f"{self.tier}: every cluster failed: " + "; ".join(failures),
                            tier=self.tier)

    async def complete(self, body: dict[str, Any],
                       dispatch: Dispatch | None = None) -> dict[str, Any]:
        dispatch = dispatch or Dispatch()
        failures: list[str] = []
        for cluster in self._plan(body.get("model", ""), dispatch):
            cluster.inflight += 1
            try:
                async for _ in self._hold(cluster, notes=False):
                    pass
                if (cold := self._still_cold(cluster)) is not None:
                    failures.append(cold)
                    continue
                self._taken_by(dispatch, cluster)
                result = await cluster.backend.complete(body, dispatch)
            except (BackendRejected, ContextTooLong):
                raise
            except BackendFailed as e:
                cluster.failed_at = time.monotonic()
                failures.append(f"{cluster.name}: {e.message}")
                continue
            finally:
                cluster.inflight -= 1
            dispatch.headers["x-stream-cluster"] = cluster.name
            cluster.failed_at = None
            cluster.served += 1
            return result
        raise BackendFailed(f"{self.tier}: every cluster failed: " + "; ".join(failures),
                            tier=self.tier)

    async def probe(self) -> ProbeResult:
        results = await asyncio.gather(*(c.backend.probe() for c in self.clusters))
        for cluster, result in zip(self.clusters, results, strict=True):
            cluster.detail = result.detail
            cluster.relay_ok = result.ok
        ok = any(r.ok for r in results)
        detail = "; ".join(f"{c.name}: {c.state()}" for c in self.clusters)
        return ProbeResult(ok=ok, detail=detail, models=self.models,
                           latency_ms=max(r.latency_ms for r in results))

    async def aclose(self) -> None:
        pass  # the runtime owns control planes, relays and agent pools
