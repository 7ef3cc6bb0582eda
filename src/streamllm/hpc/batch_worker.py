"""The function that runs one chunk of a batch on a cluster node.

It dials the relay as producer (like the streaming worker), sends each line's request to the
node's vLLM (not streamed: one completion per line, a few at a time), and seals each line's
result into one frame as soon as it is done, so results flow back while the chunk runs. A
CANCEL from the gateway stops the lines not started and aborts the ones running. What the
control plane returns is a short summary, plus the results themselves only when the relay
could not carry them and they fit in a control-plane result (which is capped at 10 MB).

Imports are the worker's: the standard library, `cryptography`, `websockets` and STREAM's pure
relay modules.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import threading
import time
import urllib.parse
from typing import Any

from streamllm.hpc.worker import _abort, _Relay
from streamllm.relay.frames import FrameType

RESULT_CAP = 9 * 1024 * 1024  # bytes of results the control plane may carry back


def _post(job: dict[str, Any], body: dict[str, Any],
          conns: list[http.client.HTTPConnection]) -> tuple[int, dict[str, Any]]:
    url = urllib.parse.urlsplit(job["backend_url"].rstrip("/") + "/chat/completions")
    cls = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    conn = cls(url.hostname, url.port, timeout=job.get("backend_timeout_s", 600.0))
    conns.append(conn)
    headers = {"content-type": "application/json"}
    key_env = job.get("api_key_env")
    if key_env and os.environ.get(key_env):
        headers["authorization"] = f"Bearer {os.environ[key_env]}"
    try:
        payload = {**body, "stream": False}
        payload.pop("stream_options", None)
        conn.request("POST", url.path, body=json.dumps(payload).encode(), headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = {"error": {"message": raw.decode("utf-8", "replace")[:2000],
                             "type": "upstream_error", "code": "backend_error"}}
        return resp.status, doc
    finally:
        conn.close()


def run_batch_chunk(job: dict[str, Any]) -> dict[str, Any]:
    """Run `job["lines"]` ([{custom_id, body}]) against the node's backend.

    `job`: relay_url, channel, producer_token, key, backend_url, lines, concurrency,
    optional api_key_env, backend_timeout_s, start_by.
    """
    started = time.monotonic()
    if job.get("start_by") is not None and time.time() > job["start_by"]:
        return {"done": 0, "failed": 0, "skipped": len(job["lines"]),
                "error": "chunk started after the gateway had given up on it"}
    relay = _Relay(job)
    send_lock = threading.Lock()
    conns: list[http.client.HTTPConnection] = []
    kept: list[dict[str, Any]] = []  # for the control plane, when the relay is gone
    kept_bytes = 0
    counts = {"done": 0, "failed": 0}

    def abort_all() -> None:
        for conn in conns:
            _abort(conn)

    relay.on_cancel = abort_all

    def one(line: dict[str, Any]) -> None:
        nonlocal kept_bytes
        if relay.cancelled.is_set():
            return
        began = time.monotonic()
        try:
            status, doc = _post(job, line["body"], conns)
        except Exception as e:
            if relay.cancelled.is_set():
                return
            status, doc = 502, {"error": {"message": f"{type(e).__name__}: {e}",
                                          "type": "upstream_error", "code": "backend_error"}}
        result = {"custom_id": line["custom_id"], "status_code": status, "body": doc,
                  "duration_ms": round((time.monotonic() - began) * 1000, 1)}
        with send_lock:
            counts["done" if status == 200 else "failed"] += 1
            relay.send(FrameType.DATA, result)
            if relay.error:
                size = len(json.dumps(result))
                if kept_bytes + size <= RESULT_CAP:
                    kept.append(result)
                    kept_bytes += size

    with concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, job.get("concurrency", 8)), thread_name_prefix="batch-line") as pool:
        list(pool.map(one, job["lines"]))
    with send_lock:
        relay.send(FrameType.FINAL, {"cancelled": relay.cancelled.is_set(), **counts})
        frames = relay.frames_sent
        error = relay.error
    relay.close()
    out: dict[str, Any] = {**counts, "cancelled": relay.cancelled.is_set(), "frames": frames,
                           "relay_error": error, "seconds": round(time.monotonic() - started, 3)}
    if error:
        # The relay could not carry them: what fits comes back through the control plane.
        out["results"] = kept
    return out
