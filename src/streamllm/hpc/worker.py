"""The function that runs on a cluster node for one HPC request.

It dials the relay as producer (on a thread, while the backend request is opened), streams the
completion from the node's vLLM (or any OpenAI-compatible server), seals every chunk into a
frame, stops when the consumer cancels, and returns the whole completion through the control
plane as the backstop.

Imports are kept to the standard library, `cryptography`, `websockets` and STREAM's own pure
relay modules, so the function runs on a node that has nothing else installed and survives
Globus Compute's serializer. It is synchronous: control planes call plain functions.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import threading
import time
import urllib.parse
from typing import Any

from streamllm.relay.crypto import Opener, Sealer
from streamllm.relay.frames import Direction, FrameType


class _Relay:
    """The producer side of a channel; a relay failure never fails the job (the backstop
    result still carries the answer)."""

    def __init__(self, job: dict[str, Any]):
        self.error: str | None = None
        self.cancelled = threading.Event()
        self.on_cancel: Any = None  # set once the backend request is open
        self._conn: Any = None
        self._stack = contextlib.ExitStack()
        self._dialled = threading.Event()  # set once the dial has succeeded or failed
        key = job.get("key")
        self._sealer = Sealer(key, job["channel"], Direction.DOWN)
        self._opener = Opener(key, job["channel"], Direction.UP, require_sealed=key is not None)
        # Dialled on a thread of its own while the caller opens the backend request: the
        # WebSocket handshake (a millisecond or more) is then off the first token's path.
        threading.Thread(target=self._dial, args=(job,), daemon=True,
                         name="relay-producer").start()

    def _dial(self, job: dict[str, Any]) -> None:
        try:
            from websockets.sync.client import connect

            self._conn = self._stack.enter_context(connect(
                f"{job['relay_url'].rstrip('/')}/v1/channels/{job['channel']}",
                additional_headers={
                    "authorization": f"Bearer {job['producer_token']}",
                    "x-stream-role": "producer",
                },
                open_timeout=job.get("relay_connect_s", 10.0),
                compression=None,
            ))
        except Exception as e:  # any failure to reach the relay: fall back to backstop only
            self.error = f"relay unreachable: {e}"
            return
        finally:
            self._dialled.set()
        self._listen()

    def _listen(self) -> None:
        try:
            for message in self._conn:
                if isinstance(message, bytes):
                    ftype, _ = self._opener.open(message)
                    if ftype is FrameType.CANCEL:
                        self.cancelled.set()
                        if self.on_cancel is not None:
                            self.on_cancel()
                        return
        except Exception:  # the consumer's side going away is not our failure
            pass

    def send(self, ftype: FrameType, payload: dict[str, Any]) -> None:
        self._dialled.wait()
        if self._conn is None or self.error:
            return
        data = json.dumps(payload, separators=(",", ":")).encode()
        try:
            if ftype is FrameType.FINAL:
                self._conn.send(self._sealer.final(data))
            else:
                self._conn.send(self._sealer.seal(ftype, data))
        except Exception as e:
            self.error = f"relay send failed: {e}"

    def close(self) -> None:
        self._dialled.wait()
        try:
            self._stack.close()
        except Exception:
            pass

    @property
    def frames_sent(self) -> int:
        return self._sealer.seq


class Backstop:
    """Everything the stream said, put together: text, tool calls, finish reasons, usage."""

    def __init__(self) -> None:
        self.choices: dict[int, dict[str, Any]] = {}
        self.usage: dict[str, Any] | None = None
        self.model: str | None = None

    def add(self, chunk: dict[str, Any]) -> None:
        self.model = chunk.get("model", self.model)
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            slot = self.choices.setdefault(
                choice.get("index", 0), {"content": "", "tool_calls": {}, "finish_reason": None}
            )
            delta = choice.get("delta") or {}
            slot["content"] += delta.get("content") or ""
            for call in delta.get("tool_calls") or ():
                entry = slot["tool_calls"].setdefault(
                    call.get("index", 0), {"id": None, "name": "", "arguments": ""}
                )
                entry["id"] = call.get("id") or entry["id"]
                fn = call.get("function") or {}
                entry["name"] += fn.get("name") or ""
                entry["arguments"] += fn.get("arguments") or ""
            if choice.get("finish_reason"):
                slot["finish_reason"] = choice["finish_reason"]

    def result(self, **extra: Any) -> dict[str, Any]:
        choices = [
            {
                "index": i,
                "content": c["content"],
                "finish_reason": c["finish_reason"],
                "tool_calls": [c["tool_calls"][k] for k in sorted(c["tool_calls"])],
            }
            for i, c in sorted(self.choices.items())
        ]
        return {"model": self.model, "choices": choices, "usage": self.usage, **extra}


def _open_backend(job: dict[str, Any]) -> tuple[http.client.HTTPConnection, Any]:
    url = urllib.parse.urlsplit(job["backend_url"].rstrip("/") + "/chat/completions")
    cls = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    conn = cls(url.hostname, url.port, timeout=job.get("backend_timeout_s", 600.0))
    body = dict(job["body"])
    body["stream"] = True
    body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    headers = {"content-type": "application/json", "accept": "text/event-stream"}
    key_env = job.get("api_key_env")
    if key_env and os.environ.get(key_env):
        headers["authorization"] = f"Bearer {os.environ[key_env]}"
    conn.request("POST", url.path, body=json.dumps(body).encode(), headers=headers)
    return conn, conn.getresponse()


def _abort(conn: http.client.HTTPConnection) -> None:
    """Close the backend connection under the reading thread: vLLM then stops the request."""
    import socket

    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def ping() -> dict[str, Any]:
    """A job that does nothing: gets a control plane's workers started before real requests
    arrive, and measures dispatch on its own."""
    import sys

    return {"pid": os.getpid(), "python": sys.version.split()[0], "at": time.time()}


def run_completion(job: dict[str, Any]) -> dict[str, Any]:
    """Run one streamed completion on this node; return the backstop result.

    `job`: relay_url, channel, producer_token, key (32 bytes, or None for an unencrypted
    channel), backend_url, body (the chat request), optional api_key_env, backend_timeout_s,
    start_by (wall-clock time after which the job is not worth starting).
    """
    started = time.monotonic()
    started_at = time.time()  # wall clock, so the gateway can tell dispatch from generation
    start_by = job.get("start_by")
    if start_by is not None and started_at > start_by:
        # The job sat in the cluster's queue past the point where its client gave up: nobody
        # will read this answer, so do not spend the GPU on it.
        return Backstop().result(
            error={"status": 408, "message": "job started after its client had given up"},
            cancelled=True, relay_error=None, frames=0, seconds=0.0,
            started_at=started_at, first_chunk_at=None,
        )
    first_chunk_at: float | None = None
    relay = _Relay(job)
    backstop = Backstop()
    error: dict[str, Any] | None = None
    conn = None
    try:
        conn, resp = _open_backend(job)
        relay.on_cancel = lambda: _abort(conn)
        if relay.cancelled.is_set():
            _abort(conn)
        if resp.status != 200:
            text = resp.read().decode("utf-8", "replace")[:2000]
            error = {"status": resp.status, "message": text}
        else:
            data_lines: list[str] = []
            for raw in resp:
                if relay.cancelled.is_set():
                    break
                line = raw.decode("utf-8").rstrip("\r\n")
                if line.startswith("data:"):
                    data_lines.append(line[5:].lstrip(" "))
                    continue
                if line or not data_lines:
                    continue
                data, data_lines = "\n".join(data_lines), []
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if first_chunk_at is None:
                    first_chunk_at = time.time()
                backstop.add(chunk)
                relay.send(FrameType.DATA, chunk)
    except Exception as e:  # the backend failed: say so on both channels
        if not relay.cancelled.is_set():  # (an abort we caused ourselves is no failure)
            error = {"status": 502, "message": f"{type(e).__name__}: {e}"}
    finally:
        if conn is not None:
            conn.close()  # on cancel this is what tells vLLM to stop generating
    cancelled = relay.cancelled.is_set()
    if error is not None:
        relay.send(FrameType.ERROR, {"error": error})
    else:
        relay.send(FrameType.FINAL, {"cancelled": cancelled})
    frames = relay.frames_sent
    relay.close()
    return backstop.result(
        error=error,
        cancelled=cancelled,
        relay_error=relay.error,
        frames=frames,
        seconds=round(time.monotonic() - started, 3),
        started_at=started_at,
        first_chunk_at=first_chunk_at,
    )
