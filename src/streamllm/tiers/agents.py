"""Warm agents on one cluster, seen from the gateway: launch, route to, replace, scale, retire.

An agent (hpc/agent.py) is a job started once through the cluster's control plane that keeps a
relay channel of its own open and takes requests up that channel. `AgentFirstPlane` puts the
pool in front of the control plane: a request goes to a ready agent with room, else it becomes
a job of its own as before, so the HPC backend's streaming, deadlines and backstop work
unchanged. The agent returns each request's complete result on its channel; that is the
backstop for requests it serves.

The pool's manager keeps `min_warm` agents, adds agents while the ready ones are busy
(up to `max`), stops agents idle past `idle_timeout_s` above `min_warm`, and replaces each agent
`replace_before_s` before its walltime: the replacement is launched first, the old agent is
told to drain (it takes no new requests, finishes the ones it has) and then exits. No stream is
dropped by a replacement.

When an agent's connection is lost (the relay restarted, or the agent fell silent while its job
runs), both ends move to the agent's next epoch channel (hpc/agent.py) instead of giving the
agent up: it is `reconnecting` meanwhile, takes no requests, and counts as live, so no
replacement is launched for a blip. Its hello on the new channel names the requests it holds;
any other request sent to it is settled as lost (it never arrived), and its results come again
until our beats confirm them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from streamllm.config import AgentSettings
from streamllm.errors import RelayError, TokenRejected
from streamllm.hpc.agent import SILENT_BEATS, epoch_channel, epoch_key, run_agent
from streamllm.hpc.batch_worker import run_batch_chunk
from streamllm.hpc.control import ControlPlane, DispatchKind, JobGone, JobOptions, StartedJob
from streamllm.hpc.worker import run_completion
from streamllm.relay.client import RelayLink, dial
from streamllm.relay.crypto import Opener, Sealer, new_key
from streamllm.relay.frames import Direction, FrameType
from streamllm.relay.tokens import mint

log = logging.getLogger("streamllm.hpc")

LOST_GRACE_S = 10.0  # after an agent's channel dies, its requests' own channels may still end
RECONNECT_BACKOFF_S = (0.2, 2.0)  # first and longest pause between dials of a relay that is away
MANAGE_EVERY_S = 0.5
OVERFLOW_WINDOW_S = 10.0  # requests that found no room this recently ask for more agents
AGENT_EXIT_S = 120.0  # a scheduler's limit beyond the agent's walltime, to drain and report
# The work an agent can take, by the name it knows it by (hpc/agent.py).
AGENT_WORK: dict[Callable[..., Any], str] = {run_completion: "completion",
                                             run_batch_chunk: "batch_chunk"}


class AgentLost(Exception):
    """The agent serving a request went away before reporting its result."""


@dataclass
class Agent:
    id: str
    channel: str  # its first relay channel; later epochs' are derived from it
    key: bytes  # delivered at launch; later epochs' keys are derived from it
    launched_at: float
    walltime_s: float
    phase: str = "queued"  # queued | starting | ready | draining | reconnecting | gone
    link: RelayLink | None = None
    job: concurrent.futures.Future[Any] | None = None
    job_id: str | None = None  # the scheduler's id of its job, where the plane has one
    ready_at: float | None = None
    last_busy: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    requests: dict[str, concurrent.futures.Future[Any]] = field(default_factory=dict)
    served: int = 0
    replaced: bool = False  # a successor has been launched for it
    pid: int | None = None  # its process on the node, as it said hello
    host: str | None = None
    beats: int = 0
    sending: asyncio.Lock = field(default_factory=asyncio.Lock)
    epoch: int = 0  # how many times its connection has moved to a new channel
    resumed: int = 0  # reconnections that it came back from
    phase_before: str = "queued"  # while reconnecting: the phase to go back to
    lost_at: float | None = None  # when its connection was lost, while reconnecting
    retiring: bool = False  # we closed its link on purpose: do not reconnect
    beat_sent: float = 0.0  # when we last told it we are here (and what we have read)
    sealer: Sealer = field(init=False, repr=False)  # for the current epoch's channel
    opener: Opener = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.move_to(self.epoch)

    def move_to(self, epoch: int) -> str:
        """Use `epoch`'s channel from now on (its own key; sequence numbers from 0); its name."""
        self.epoch = epoch
        name = epoch_channel(self.channel, epoch)
        key = epoch_key(self.key, self.channel, epoch)
        self.sealer = Sealer(key, name, Direction.UP)
        self.opener = Opener(key, name, Direction.DOWN, require_sealed=True)
        return name

    @property
    def inflight(self) -> int:
        return len(self.requests)


class AgentPool:
    def __init__(self, cluster: str, settings: AgentSettings, plane: ControlPlane,
                 relay_url: str, secret: bytes, backend_url: str,
                 api_key_env: str | None = None, clock: Callable[[], float] = time.monotonic):
        self.cluster = cluster
        self.settings = settings
        self.plane = plane
        self.relay_url = relay_url
        self._secret = secret
        self.backend_url = backend_url
        self.api_key_env = api_key_env
        self.clock = clock
        self.agents: dict[str, Agent] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._manager: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.launched = 0
        self.startup_seconds: float | None = None  # launch to ready, smoothed: the wait estimate
        self._overflow: deque[float] = deque()  # when requests found no agent with room
        self._stopping = False

    # -- lifecycle ------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self.settings.max > 0

    def start(self) -> None:
        if not self.enabled:
            return
        self._loop = asyncio.get_running_loop()
        self._manager = asyncio.create_task(self._manage(), name=f"agents-{self.cluster}")

    async def stop(self) -> None:
        self._stopping = True
        if self._manager is not None:
            self._manager.cancel()
            await asyncio.gather(self._manager, return_exceptions=True)
        for agent in list(self.agents.values()):
            await self._drain(agent)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for agent in self.agents.values():
            if agent.link is not None:
                await agent.link.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- what the gateway sees -------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        out = {"queued": 0, "starting": 0, "ready": 0, "draining": 0, "reconnecting": 0}
        for a in self.agents.values():
            if a.phase in out:
                out[a.phase] += 1
        return out

    def ready(self) -> list[Agent]:
        return [a for a in self.agents.values() if a.phase == "ready"]

    def reconnecting_after_ready(self) -> bool:
        """An agent that had said ready is reconnecting: the cluster's backend was up."""
        return any(a.phase == "reconnecting" and a.ready_at is not None
                   for a in self.agents.values())

    def pick(self) -> Agent | None:
        """The ready agent with the most room, or None when every ready agent is full."""
        room = [a for a in self.ready() if a.inflight < self.settings.max_concurrency]
        return min(room, key=lambda a: a.inflight) if room else None

    def overflowed(self) -> None:
        """A request found no ready agent with room (it became a job of its own)."""
        self._overflow.append(self.clock())

    def recent_overflow(self) -> int:
        now = self.clock()
        while self._overflow and now - self._overflow[0] > OVERFLOW_WINDOW_S:
            self._overflow.popleft()
        return len(self._overflow)

    def estimated_wait_s(self) -> float:
        """How long until an agent is likely ready: the usual start time (60 s before any
        agent has started), less what the agent furthest along has already taken; 0 when it
        is taking longer than usual."""
        usual = self.startup_seconds if self.startup_seconds is not None else 60.0
        coming = [a.launched_at for a in self.agents.values()
                  if a.phase in ("queued", "starting")]
        if not coming:
            return usual
        return max(0.0, usual - (self.clock() - min(coming)))

    # -- requests ---------------------------------------------------------------------------------
    def dispatch(self, agent: Agent, job: dict[str, Any],
                 fn: Callable[..., Any] = run_completion) -> concurrent.futures.Future[Any]:
        """Send one request (or batch chunk) to `agent`; the future is its result, as a job's
        would be."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        agent.requests[job["channel"]] = future
        agent.last_busy = self.clock()
        # Keys are bytes; on the wire (sealed) they travel as hex.
        wire = {**job, "key": job["key"].hex() if job.get("key") else None}
        message = json.dumps({"t": "job", "fn": AGENT_WORK[fn], "job": wire},
                             separators=(",", ":")).encode()
        assert self._loop is not None and agent.link is not None
        epoch = agent.epoch

        async def send() -> None:
            try:
                await self._send(agent, message, epoch)
            except RelayError as e:
                self._settle(agent, job["channel"], error=AgentLost(str(e)))

        self._loop.call_soon_threadsafe(lambda: self._spawn(send()))
        return future

    def _settle(self, agent: Agent, channel: str, result: dict[str, Any] | None = None,
                error: Exception | None = None) -> None:
        future = agent.requests.pop(channel, None)
        agent.last_busy = self.clock()
        if future is None or future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            agent.served += 1
            future.set_result(result)

    # -- launching and listening ----------------------------------------------------------------------
    @property
    def _token_ttl(self) -> float:
        # An agent's tokens must outlive it: it dials when its job starts, whenever that is,
        # and again after each lost connection.
        return self.settings.walltime_s + self.settings.launch_timeout_s

    async def launch(self) -> Agent:
        s, ttl = self.settings, self._token_ttl
        channel = "agent-" + secrets.token_hex(12)
        key = new_key()
        spec = {
            "agent_id": channel, "relay_url": self.relay_url, "channel": channel,
            "producer_token": mint(self._secret, channel, "producer", ttl), "key": key,
            "backend_url": self.backend_url, "api_key_env": self.api_key_env,
            "max_concurrency": s.max_concurrency, "walltime_s": s.walltime_s,
            "heartbeat_s": s.heartbeat_s, "backend_wait_s": s.backend_wait_s,
            # One token per later epoch: a token is good for one connection.
            "reconnect_tokens": [mint(self._secret, epoch_channel(channel, n), "producer", ttl)
                                 for n in range(1, s.reconnects + 1)],
            "reconnect_s": s.reconnect_s,
        }
        agent = Agent(channel, channel, key, launched_at=self.clock(), walltime_s=s.walltime_s)
        self.agents[agent.id] = agent
        self.launched += 1
        try:
            agent.link = await dial(self.relay_url, channel, "consumer",
                                    mint(self._secret, channel, "consumer", ttl), resume_from=0)
            # The scheduler may hold it a little past its own walltime, to drain and report.
            options = JobOptions(walltime_s=s.walltime_s + AGENT_EXIT_S,
                                 comment=f"streamllm agent {channel[6:14]}")
            started = await asyncio.to_thread(self.plane.start, run_agent, spec,
                                              options=options)
            agent.job, agent.job_id = started.future, started.job_id
        except Exception as e:
            log.warning("cluster %s: could not launch an agent: %s", self.cluster, e)
            agent.phase = "gone"
            self.agents.pop(agent.id, None)
            if agent.link is not None:
                await agent.link.close()
            raise
        loop = asyncio.get_running_loop()

        def ended(job: concurrent.futures.Future[Any]) -> None:
            try:
                loop.call_soon_threadsafe(self._job_ended, agent, job)
            except RuntimeError:
                pass  # the gateway's loop is closed: a plane shut down after it

        agent.job.add_done_callback(ended)
        self._spawn(self._listen(agent))
        log.info("cluster %s: agent %s… launched%s", self.cluster, channel[6:14],
                 f" as job {agent.job_id}" if agent.job_id else "")
        return agent

    def _job_ended(self, agent: Agent, job: concurrent.futures.Future[Any]) -> None:
        """The scheduler says the agent's job is gone (cancelled, out of time, its node lost):
        the requests it held fail now, naming the job, rather than after a silence. Any other
        end is left to the listener and its grace: a job that ended well has sent its results
        on its channel first, and a lost heartbeat does not prove the agent gone."""
        error = job.exception()
        if not isinstance(error, JobGone) or self._stopping:
            return
        named = f"job {agent.job_id}" if agent.job_id else "job"
        log.warning("cluster %s: agent %s…'s %s failed: %s", self.cluster, agent.id[6:14],
                    named, error)
        # Nothing more may be sent to it (a retry would be lost with it); its listener,
        # whose link is closed here, forgets it.
        agent.phase = "gone"
        self._spawn(self._retire(agent, None))
        for channel in list(agent.requests):
            self._settle(agent, channel, error=AgentLost(
                f"the warm agent serving it stopped: {error}"))

    async def _listen(self, agent: Agent) -> None:
        try:
            while await self._hear(agent) and await self._reconnect(agent):
                pass
        except Exception:
            log.exception("cluster %s: agent %s… could not be reconnected", self.cluster,
                          agent.id[6:14])
        finally:
            agent.phase = "gone"
            self.agents.pop(agent.id, None)
            if agent.requests:
                # Their own channels may still finish them; if not, they fail, not hang.
                self._spawn(self._fail_later(agent))

    async def _hear(self, agent: Agent) -> bool:
        """Read the agent's channel until it ends. True when the connection was lost (rather
        than ended by the agent's goodbye, by a bad frame, or by us on purpose)."""
        assert agent.link is not None
        try:
            async for frame in agent.link.frames():
                ftype, payload = agent.opener.open(frame)
                agent.last_seen = self.clock()
                self._on_message(agent, json.loads(payload) if payload else {})
                if ftype is FrameType.FINAL:
                    return False
        except RelayError as e:
            log.warning("cluster %s: agent %s… channel lost: %s", self.cluster, agent.id[6:14],
                        e.message)
        except Exception as e:  # a frame that does not open is an attack or a bug: drop it
            log.warning("cluster %s: agent %s… sent a bad frame: %s", self.cluster,
                        agent.id[6:14], type(e).__name__)
            return False
        return not agent.retiring and not self._stopping

    def _on_message(self, agent: Agent, message: dict[str, Any]) -> None:
        kind = message.get("t")
        if kind == "hello":
            agent.pid, agent.host = message.get("pid"), message.get("host")
            if agent.phase == "reconnecting":
                self._resumed(agent, message)
            elif agent.phase in ("queued", "starting"):
                agent.phase = "starting"
                if message.get("phase") == "ready":
                    self._became_ready(agent)
        elif kind == "beat":
            agent.beats += 1
        elif kind == "done":
            self._settle(agent, message["channel"], result=message["result"])
        elif kind == "refused":
            self._settle(agent, message["channel"], error=AgentLost("the agent was draining"))

    def _became_ready(self, agent: Agent) -> None:
        agent.phase = "ready"
        if agent.ready_at is not None:
            return
        agent.ready_at = self.clock()
        took = agent.ready_at - agent.launched_at
        self.startup_seconds = took if self.startup_seconds is None else (
            0.7 * self.startup_seconds + 0.3 * took)
        log.info("cluster %s: agent %s… ready in %.1f s", self.cluster, agent.id[6:14], took)

    def _resumed(self, agent: Agent, hello: dict[str, Any]) -> None:
        """The agent is back, on its new channel."""
        agent.lost_at = None
        if hello.get("resync"):
            # Requests it does not name never reached it: they fail now (and go elsewhere)
            # rather than wait for a result that will not come.
            held = set(hello.get("serving") or ())
            # (listed first: dispatching threads may add to it meanwhile)
            for channel in [c for c in list(agent.requests) if c not in held]:
                self._settle(agent, channel,
                             error=AgentLost("the request was lost with the agent's connection"))
            agent.resumed += 1
            log.info("cluster %s: agent %s… back on a new channel (epoch %d)", self.cluster,
                     agent.id[6:14], agent.epoch)
        said = hello.get("phase")
        if agent.phase_before == "draining" and said != "draining":
            agent.phase = "draining"  # our drain was lost with the connection: say it again
            self._spawn(self._say_drain(agent))
        elif said == "draining":
            agent.phase = "draining"
        elif said == "ready":
            self._became_ready(agent)
        else:
            agent.phase = "starting"

    async def _reconnect(self, agent: Agent) -> bool:
        """Move our end of the agent's link to its next epoch's channel, where the agent will
        come too (an agent not yet heard from has not dialled: it will dial its first one).
        Dials until the relay answers, within `reconnect_s`."""
        s = self.settings
        if agent.phase != "reconnecting":
            agent.phase_before, agent.lost_at = agent.phase, self.clock()
            agent.phase = "reconnecting"
        epoch = agent.epoch if agent.phase_before == "queued" else agent.epoch + 1
        if epoch > s.reconnects:
            return False
        name = agent.move_to(epoch)
        if agent.link is not None:
            await agent.link.close()
        pause, longest = RECONNECT_BACKOFF_S
        while True:
            try:
                agent.link = await dial(self.relay_url, name, "consumer",
                                        mint(self._secret, name, "consumer", self._token_ttl),
                                        resume_from=0)
                break
            except (RelayError, TokenRejected) as e:
                gave_up = agent.retiring or self._stopping or isinstance(e, TokenRejected) or \
                    self.clock() - (agent.lost_at or 0.0) > s.reconnect_s
                if gave_up:
                    return False
                await asyncio.sleep(pause)
                pause = min(pause * 2, longest)
        agent.last_seen = self.clock()
        log.info("cluster %s: agent %s… connection lost; waiting for it on channel epoch %d",
                 self.cluster, agent.id[6:14], agent.epoch)
        return True

    async def _say_drain(self, agent: Agent) -> None:
        try:
            await self._send(agent, b'{"t":"drain"}')
        except RelayError:
            pass

    async def _beat(self, agent: Agent) -> None:
        """We are here, and have read this many of its frames on this channel (so it need not
        keep their results to send again)."""
        message = json.dumps({"t": "beat", "got": agent.opener.next_seq}).encode()
        try:
            await self._send(agent, message, agent.epoch)
        except RelayError:
            pass

    async def _fail_later(self, agent: Agent) -> None:
        await asyncio.sleep(LOST_GRACE_S)
        for channel in list(agent.requests):
            self._settle(agent, channel, error=AgentLost("the agent went away"))

    async def _drain(self, agent: Agent) -> None:
        if agent.phase == "reconnecting":
            agent.phase_before = "draining"  # told once it is back
            return
        if agent.phase in ("gone", "draining") or agent.link is None:
            return
        agent.phase = "draining"
        await self._say_drain(agent)

    async def _send(self, agent: Agent, message: bytes, epoch: int | None = None) -> None:
        """Send `message` on the agent's channel; with `epoch`, only if that channel is still
        the agent's (a request or a beat made for a lost connection is not for its successor:
        the agent's hello there has already said what it holds)."""
        # The agent opens frames strictly in sequence and drops its channel on a gap, and
        # dispatches come from several threads (batch chunks): number and send each frame
        # under one lock, on the loop, so the order sealed is the order sent.
        async with agent.sending:
            if agent.phase == "reconnecting" or agent.link is None or \
                    (epoch is not None and epoch != agent.epoch):
                raise RelayError("the agent's connection is being re-established")
            await agent.link.send(agent.sealer.seal(FrameType.DATA, message))

    # -- the manager ---------------------------------------------------------------------------------
    async def _manage(self) -> None:
        while True:
            try:
                await self._adjust()
            except Exception:
                log.exception("cluster %s: managing agents failed", self.cluster)
            await asyncio.sleep(MANAGE_EVERY_S)

    def _live(self) -> list[Agent]:
        return [a for a in self.agents.values()
                if a.phase in ("queued", "starting", "ready", "reconnecting")]

    def desired(self) -> int:
        """Agents wanted now: enough ready room for what is in flight and waiting."""
        s = self.settings
        busy = sum(a.inflight for a in self._live()) + self.recent_overflow()
        wanted = math.ceil(busy / s.max_concurrency) if busy else 0
        return max(s.min_warm, min(s.max, wanted))

    async def _adjust(self) -> None:
        s, now = self.settings, self.clock()
        for agent in list(self.agents.values()):
            # An agent whose job ended is gone; so is one lost that did not come back in time.
            ended = agent.job is not None and agent.job.done()
            stuck = agent.phase == "reconnecting" and agent.lost_at is not None and \
                now - agent.lost_at > s.reconnect_s
            if ended or stuck:
                await self._retire(agent, "ended" if ended else
                                   "did not come back after its connection was lost")
                continue
            # A connection can die without either end being told (a process killed on its
            # node, a firewall dropping an idle flow): silence is the signal. Our end moves to
            # the agent's next channel, where the agent, not hearing us either, comes too.
            if agent.phase in ("starting", "ready", "draining") and \
                    now - agent.last_seen > SILENT_BEATS * s.heartbeat_s:
                log.warning("cluster %s: agent %s… stopped beating", self.cluster,
                            agent.id[6:14])
                if agent.link is not None:
                    await agent.link.close()  # its listener then reconnects
                continue
            if agent.phase in ("starting", "ready", "draining") and \
                    now - agent.beat_sent >= s.heartbeat_s:
                agent.beat_sent = now
                self._spawn(self._beat(agent))
            if agent.phase in ("queued", "starting") and now - agent.launched_at > \
                    s.launch_timeout_s:
                log.warning("cluster %s: agent %s… not ready after %.0f s; giving up on it",
                            self.cluster, agent.id[6:14], now - agent.launched_at)
                await self._drain(agent)
                await self._retire(agent, None)
                if agent.job_id:  # still queued, perhaps: it must not start later for nobody
                    await asyncio.to_thread(self.plane.cancel, agent.job_id)
            # Replace before the walltime ends: successor first, then drain the old one.
            elif agent.phase == "ready" and now - agent.launched_at > \
                    agent.walltime_s - s.replace_before_s and not agent.replaced:
                agent.replaced = True
                log.info("cluster %s: replacing agent %s… before its walltime", self.cluster,
                         agent.id[6:14])
                self._spawn(self._replace(agent))
        live = self._live()
        unreplaced = [a for a in live if not a.replaced]
        if len(unreplaced) < self.desired():
            self._spawn(self._launch_quietly())
            return
        # Scale down: an idle agent above min_warm, past the idle timeout.
        ready = [a for a in self.ready() if not a.replaced]
        if len(unreplaced) > max(s.min_warm, self.desired()):
            idle = [a for a in ready if a.inflight == 0 and now - a.last_busy > s.idle_timeout_s]
            if idle:
                log.info("cluster %s: agent %s… idle; stopping it", self.cluster,
                         idle[0].id[6:14])
                await self._drain(idle[0])

    async def _retire(self, agent: Agent, why: str | None) -> None:
        """Close the agent's link for good; its listener then forgets it."""
        if agent.retiring:
            return
        agent.retiring = True
        if why:
            log.warning("cluster %s: agent %s… %s", self.cluster, agent.id[6:14], why)
        if agent.link is not None:
            await agent.link.close()

    async def _launch_quietly(self) -> None:
        try:
            await self.launch()
        except Exception:
            pass

    async def _replace(self, old: Agent) -> None:
        try:
            new = await self.launch()
        except Exception:
            old.replaced = False
            return
        # Wait for the successor (or for the old one's end), then retire the old one.
        while new.phase in ("queued", "starting") and old.phase == "ready":
            await asyncio.sleep(MANAGE_EVERY_S)
        await self._drain(old)


class AgentFirstPlane:
    """The control plane with the agent pool in front: requests go to a ready agent with room,
    everything else (and every request when no agent is ready) to the control plane."""

    def __init__(self, pool: AgentPool, plane: ControlPlane):
        self.pool = pool
        self.plane = plane
        self.name = plane.name

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        return self.start(fn, *args).future

    def start(self, fn: Callable[..., Any], *args: Any,
              options: JobOptions | None = None) -> StartedJob:
        # Agents run under the cluster's default account: a caller charged to an account of
        # their own gets a job of their own, so that the scheduler shows who ran it.
        own_account = options is not None and options.account is not None
        if fn in AGENT_WORK and self.pool.enabled and not own_account:
            agent = self.pool.pick()
            if agent is not None:
                return StartedJob(self.pool.dispatch(agent, args[0], fn), DispatchKind.AGENT,
                                  agent.job_id)
            self.pool.overflowed()
        return self.plane.start(fn, *args, options=options)

    def cancel(self, job_id: str) -> None:
        self.plane.cancel(job_id)

    def shutdown(self) -> None:
        self.plane.shutdown()
