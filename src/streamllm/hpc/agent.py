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
from streamllm.relay.crypto import Opener, Sealer
from streamllm.relay.frames import Direction, FrameType

RESULT_LIMIT = 900_000  # bytes of result per frame: under the relay's 1 MiB frame limit
WORK = {"completion": run_completion, "batch_chunk": run_batch_chunk}


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
    """The agent's end of its channel: sealed messages down, sealed requests up."""

    def __init__(self, spec: dict[str, Any]):
        from websockets.sync.client import connect

        self._lock = threading.Lock()
        self._sealer = Sealer(spec["key"], spec["channel"], Direction.DOWN)
        self._opener = Opener(spec["key"], spec["channel"], Direction.UP, require_sealed=True)
        self._conn = connect(
            f"{spec['relay_url'].rstrip('/')}/v1/channels/{spec['channel']}",
            additional_headers={"authorization": f"Bearer {spec['producer_token']}",
                                "x-stream-role": "producer"},
            open_timeout=spec.get("relay_connect_s", 30.0), compression=None,
            max_size=None,
        )

    def send(self, message: dict[str, Any], final: bool = False) -> bool:
        data = json.dumps(message, separators=(",", ":")).encode()
        try:
            with self._lock:  # beats, results and hellos come from several threads
                frame = self._sealer.final(data) if final else self._sealer.seal(
                    FrameType.DATA, data)
                self._conn.send(frame)
            return True
        except Exception:
            return False

    def receive(self, timeout: float) -> dict[str, Any] | None:
        """The next request or instruction, None on timeout; raises when the channel is gone."""
        try:
            frame = self._conn.recv(timeout=timeout)
        except TimeoutError:
            return None
        if not isinstance(frame, bytes):
            return None
        ftype, payload = self._opener.open(frame)
        if ftype is FrameType.CANCEL:
            return {"t": "drain"}
        return json.loads(payload)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._conn.close()


def run_agent(spec: dict[str, Any]) -> dict[str, Any]:
    """Serve requests until drained, out of walltime, or cut off; return a summary.

    `spec`: relay_url, channel, producer_token, key (the agent's channel key), backend_url,
    api_key_env, max_concurrency, walltime_s, heartbeat_s, backend_wait_s, agent_id.
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
    inflight: set[concurrent.futures.Future[Any]] = set()
    lock = threading.Lock()
    stop_beats = threading.Event()

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
                message = channel.receive(timeout=1.0)
            except Exception:
                message = {"t": "drain"}
            if message is not None and message.get("t") == "job":
                channel.send({"t": "refused", "channel": message["job"]["channel"]})
            elif message is not None and message.get("t") == "drain":
                gone = "drained while waiting for the backend"
        if gone is not None:
            stop_beats.set()
            channel.send({"t": "bye", "reason": gone}, final=True)
            channel.close()
            return {**ident, "error": gone, "served": 0}
    channel.send({"t": "hello", "phase": "ready", **ident})
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
        channel.send(message)

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
            try:
                message = channel.receive(timeout=0.5)
            except Exception:
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
                future = pool.submit(serve, job, message.get("fn", "completion"))
                with lock:
                    inflight.add(future)
                future.add_done_callback(lambda f: _discard(lock, inflight, f))
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


def _discard(lock: threading.Lock, inflight: set, future: concurrent.futures.Future) -> None:
    with lock:
        inflight.discard(future)
