"""A warm agent: one long-running job on a cluster node that serves many requests.

Started once through the control plane, it dials its own relay channel as producer and waits
there for requests, which the gateway sends up the channel sealed with the agent's key
(delivered at launch, through the control plane only). Each request is a `run_completion` job
(its own channel, key and tokens), served on a thread, so one agent streams many requests to
its vLLM at once; when a request is done the agent sends its whole result back on its own
channel, the backstop that a control-plane job would have returned. Requests therefore pay no
job dispatch.

It says hello when it starts (`starting`) and again once the cluster's backend answers
(`ready`), beats every few seconds, stops taking requests when asked to drain or when its
walltime is near, and exits once its last request is done. Imports are kept as small as the
worker's: it runs where the worker runs.

A connection can be lost (a relay restart, a firewall that drops a long-lived connection, a
gateway that stopped beating). Both ends then move to the agent's next *epoch*: a fresh relay
channel with a key of its own, derived from the launch key, and a producer token for it that
came with the launch. The agent says hello again there, naming the requests it holds, and
sends again every result the gateway has not confirmed (the gateway's beats carry how many of
the agent's frames it has read). So a lost connection costs neither a new job nor a model
load, and a result is never lost; the gateway ignores one that arrives twice.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import json
import os
import threading
import time
import urllib.parse
from typing import Any

from streamllm.hpc.batch_worker import run_batch_chunk
from streamllm.hpc.worker import run_completion
from streamllm.relay.crypto import Opener, Sealer, derive_key
from streamllm.relay.frames import Direction, FrameType

RESULT_LIMIT = 900_000  # bytes of result per frame: under the relay's 1 MiB frame limit
WORK = {"completion": run_completion, "batch_chunk": run_batch_chunk}
SILENT_BEATS = 3  # a side that hears nothing for this many heartbeats counts the link lost


def epoch_channel(channel: str, epoch: int) -> str:
    """The relay channel of an agent's `epoch`th connection (the first is the launch one)."""
    return channel if epoch == 0 else f"{channel}-{epoch}"


def epoch_key(key: bytes, channel: str, epoch: int) -> bytes:
    """Each epoch's channel has its own key: sequence numbers (nonces) restart on it."""
    return key if epoch == 0 else derive_key(key, epoch_channel(channel, epoch))


def _backend_up(backend_url: str, api_key_env: str | None, timeout: float = 5.0) -> bool:
    url = urllib.parse.urlsplit(backend_url.rstrip("/") + "/models")
    cls = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    conn = cls(url.hostname, url.port, timeout=timeout)
    headers = {}
    if api_key_env and os.environ.get(api_key_env):
        headers["authorization"] = f"Bearer {os.environ[api_key_env]}"
    try:
        conn.request("GET", url.path, headers=headers)
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


class _Channel:
    """The agent's end of its channel: sealed messages down, sealed requests up; moved to the
    next epoch's channel when the connection is lost."""

    def __init__(self, spec: dict[str, Any]):
        self._spec = spec
        self._lock = threading.Lock()
        self._tokens = [spec["producer_token"], *spec.get("reconnect_tokens", [])]
        # Results sent but not yet confirmed by the gateway: (epoch, sequence number, message).
        self._unconfirmed: list[tuple[int, int, dict[str, Any]]] = []
        self._connect(0)
        self.heard = self.connected  # when the gateway last sent anything, on any channel

    def _connect(self, epoch: int) -> None:
        """Dial `epoch`'s channel; from then on it is the one used (raises if it cannot be)."""
        from websockets.sync.client import connect

        spec, name = self._spec, epoch_channel(self._spec["channel"], epoch)
        conn = connect(
            f"{spec['relay_url'].rstrip('/')}/v1/channels/{name}",
            additional_headers={"authorization": f"Bearer {self._tokens[epoch]}",
                                "x-stream-role": "producer"},
            open_timeout=spec.get("relay_connect_s", 30.0), compression=None,
            max_size=None,
        )
        # Entered as a context (websockets warns otherwise); left by close().
        self._conn = conn.__enter__()
        key = epoch_key(spec["key"], spec["channel"], epoch)
        self._sealer = Sealer(key, name, Direction.DOWN)
        self._opener = Opener(key, name, Direction.UP, require_sealed=True)
        self.epoch = epoch
        self.connected = time.monotonic()

    def _send_locked(self, message: dict[str, Any], final: bool, keep: bool) -> bool:
        data = json.dumps(message, separators=(",", ":")).encode()
        if keep:
            self._unconfirmed.append((self.epoch, self._sealer.seq, message))
        try:
            frame = self._sealer.final(data) if final else self._sealer.seal(FrameType.DATA, data)
            self._conn.send(frame)
            return True
        except Exception:
            return False

    def send(self, message: dict[str, Any], final: bool = False, keep: bool = False) -> bool:
        """Send `message`; with `keep`, it is sent again after a reconnect until confirmed."""
        with self._lock:  # beats, results and hellos come from several threads
            return self._send_locked(message, final, keep)

    def receive(self, timeout: float) -> dict[str, Any] | None:
        """The next request or instruction, None on timeout; raises when the channel is gone."""
        try:
            frame = self._conn.recv(timeout=timeout)
        except TimeoutError:
            return None
        if not isinstance(frame, bytes):
            return None
        ftype, payload = self._opener.open(frame)
        self.heard = time.monotonic()
        if ftype is FrameType.CANCEL:
            return {"t": "drain"}
        message = json.loads(payload)
        if message.get("t") == "beat":
            # The gateway has read `got` of this epoch's frames: results before that are safe.
            got = int(message.get("got", 0))
            with self._lock:
                self._unconfirmed = [u for u in self._unconfirmed
                                     if u[0] != self.epoch or u[1] >= got]
            return None
        return message

    def silent_for(self) -> float:
        """How long this connection has carried nothing from the gateway."""
        return time.monotonic() - max(self.heard, self.connected)

    def unheard_for(self) -> float:
        """How long the gateway has said nothing, on any channel."""
        return time.monotonic() - self.heard

    def reconnect(self, hello: dict[str, Any], serving: list[str]) -> bool:
        """Move to the next epoch's channel (retrying while the relay is away, for at most
        `reconnect_s`), say `hello` there with the requests held, and send again every result
        not yet confirmed. False when no epoch is left or the relay stays away."""
        deadline = time.monotonic() + self._spec.get("reconnect_s", 120.0)
        with self._lock:  # senders wait: what they send goes out on the new channel
            with contextlib.suppress(Exception):
                self._conn.close()
            epoch, delay = self.epoch + 1, 0.2
            while True:
                if epoch >= len(self._tokens):
                    return False
                try:
                    self._connect(epoch)
                    break
                except Exception as e:
                    if _refused(e):
                        # Its token was spent on a handshake that failed halfway: that epoch
                        # is gone, try the next.
                        epoch += 1
                        continue
                # Unreachable (a relay restarting, say): the same epoch again, after a pause.
                if time.monotonic() + delay > deadline:
                    return False
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
            held = {u[2]["channel"] for u in self._unconfirmed}
            self._send_locked({**hello, "resync": True,
                               "serving": sorted(held | set(serving))}, False, False)
            again, self._unconfirmed = self._unconfirmed, []
            for _, _, message in again:
                self._send_locked(message, False, True)
            return True

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._conn.close()


def _refused(error: Exception) -> bool:
    """The relay answered with an HTTP status and said no (as opposed to not answering, or
    dropping the connection halfway, as a relay that is stopping or starting can)."""
    from websockets.exceptions import InvalidStatus

    return isinstance(error, InvalidStatus)


def run_agent(spec: dict[str, Any]) -> dict[str, Any]:
    """Serve requests until drained, out of walltime, or cut off; return a summary.

    `spec`: relay_url, channel, producer_token, key (the agent's channel key), backend_url,
    api_key_env, max_concurrency, walltime_s, heartbeat_s, backend_wait_s, agent_id, and for
    reconnecting reconnect_tokens (one producer token per later epoch) and reconnect_s.
    """
    started = time.monotonic()
    deadline = started + spec["walltime_s"]
    served = failed = 0
    try:
        channel = _Channel(spec)
    except Exception as e:
        return {"agent_id": spec.get("agent_id"), "error": f"relay unreachable: {e}",
                "served": 0}
    ident = {"agent_id": spec.get("agent_id"), "pid": os.getpid(),
             "host": os.uname().nodename}
    channel.send({"t": "hello", "phase": "starting", **ident})
    inflight: dict[str, concurrent.futures.Future[Any]] = {}  # by the request's channel
    lock = threading.Lock()
    stop_beats = threading.Event()
    phase = "starting"
    silent_after = SILENT_BEATS * spec.get("heartbeat_s", 5.0)

    def hear(timeout: float) -> dict[str, Any] | None:
        """The next message, or None; a lost or silent link is first moved to the next epoch,
        and _LinkLost raised when that fails."""
        try:
            message = channel.receive(timeout=timeout)
            if message is not None or channel.silent_for() < silent_after:
                return message
        except Exception:
            pass
        if channel.unheard_for() > spec.get("reconnect_s", 120.0):
            raise _LinkLost  # the gateway is gone (restarted, say): nobody will come
        with lock:
            serving = list(inflight)
        if not channel.reconnect({"t": "hello", "phase": phase, **ident}, serving):
            raise _LinkLost
        return None

    def beat() -> None:
        # Beats run from the first hello: an agent waiting minutes for its backend (or stuck
        # in one slow probe of it) must not look lost and be replaced.
        while not stop_beats.wait(spec.get("heartbeat_s", 5.0)):
            with lock:
                n = len(inflight)
            channel.send({"t": "beat", "inflight": n})

    beats = threading.Thread(target=beat, daemon=True, name="agent-beat")
    beats.start()
    # A node may come up before the cluster's vLLM has loaded its weights: say so, and wait.
    wait_until = time.monotonic() + spec.get("backend_wait_s", 900.0)
    while not _backend_up(spec["backend_url"], spec.get("api_key_env")):
        gone = None
        if time.monotonic() > wait_until or time.monotonic() > deadline:
            gone = "backend never came up"
        else:
            # Listen while waiting: a gateway that stops (or drains us) must not leave this
            # job holding its node until backend_wait_s runs out.
            try:
                message = hear(1.0)
            except _LinkLost:
                message, gone = None, "relay lost while waiting for the backend"
            if message is not None and message.get("t") == "job":
                channel.send({"t": "refused", "channel": message["job"]["channel"]})
            elif message is not None and message.get("t") == "drain":
                gone = "drained while waiting for the backend"
        if gone is not None:
            stop_beats.set()
            channel.send({"t": "bye", "reason": gone}, final=True)
            channel.close()
            return {**ident, "error": gone, "served": 0}
    phase = "ready"
    channel.send({"t": "hello", "phase": phase, **ident})
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=spec["max_concurrency"],
                                                 thread_name_prefix="agent-request")

    def serve(job: dict[str, Any], fn: str) -> None:
        nonlocal served, failed
        result = WORK[fn](job)
        message = {"t": "done", "channel": job["channel"], "result": result}
        if len(json.dumps(result)) > RESULT_LIMIT:
            # One frame must carry it: what does not fit is left out, and the gateway heals
            # or retries without it.
            message["result"] = {**result, "choices": [], "results": [], "truncated": True}
        with lock:
            if result.get("error"):
                failed += 1
            else:
                served += 1
        channel.send(message, keep=True)

    reason = "drained"
    draining = False
    try:
        while True:
            if time.monotonic() > deadline:
                reason, draining = "walltime", True
            with lock:
                idle = not inflight
            if draining and idle:
                break
            phase = "draining" if draining else "ready"
            try:
                message = hear(0.5)
            except _LinkLost:
                reason = "channel closed"
                break
            if message is None:
                continue
            if message.get("t") == "drain":
                draining = True
            elif message.get("t") == "job" and not draining:
                job = message["job"]
                if job.get("key"):
                    job["key"] = bytes.fromhex(job["key"])
                with lock:
                    future = pool.submit(serve, job, message.get("fn", "completion"))
                    inflight[job["channel"]] = future
                future.add_done_callback(
                    lambda _f, c=job["channel"]: _discard(lock, inflight, c))
            elif message.get("t") == "job":
                # Taken after a drain began: refuse it, so the gateway sends it elsewhere.
                channel.send({"t": "refused", "channel": message["job"]["channel"]})
    finally:
        pool.shutdown(wait=True)  # requests already taken are finished, never dropped
        stop_beats.set()
        channel.send({"t": "bye", "reason": reason, "served": served}, final=True)
        channel.close()
    return {**ident, "served": served, "failed": failed, "reason": reason,
            "seconds": round(time.monotonic() - started, 3)}


class _LinkLost(Exception):
    """The agent's channel is gone and no later epoch could be reached."""


def _discard(lock: threading.Lock, inflight: dict, channel: str) -> None:
    with lock:
        inflight.pop(channel, None)
