"""Batch chunks on the HPC tier: one job per chunk, results streamed back through the relay.

A chunk goes to a cluster that serves its model, the least busy one that is not offline, as
one job (`hpc/batch_worker.run_batch_chunk`) through that cluster's control plane, or to one of
its warm agents. The job runs the chunk's lines against the cluster's vLLM a few at a time and
seals each line's result into a frame as soon as it is done; this runner yields them as they
arrive. If the relay fails, the results it could not carry come back in the job's result
(which the control plane caps at 10 MB); lines with no result at all are left for the batch
service to retry. Cancelling sends CANCEL up the channel: the job starts no more lines and
aborts the ones running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from streamllm.batch.runner import Chunk, LineError, LineResult
from streamllm.errors import RelayError, TierNotAllowed, TierUnavailable
from streamllm.hpc.batch_worker import run_batch_chunk
from streamllm.relay.crypto import Opener, Sealer
from streamllm.relay.frames import Direction, FrameType
from streamllm.tiers.federation import Cluster, FederatedHPCBackend

log = logging.getLogger("streamllm.batch")

START_SLACK_S = 30.0
RELAY_GRACE_S = 5.0  # after the job has returned, its last frames get this long to arrive


async def _frames_while(link: Any, job: asyncio.Future[Any], within: float) -> AsyncIterator[bytes]:
    """The chunk channel's frames, for as long as they can still come: not after the job has
    failed (an agent lost, a job refused: its producer may never connect), not long after it
    has returned, and not past `within` seconds in all."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    grace_until: float | None = None
    frames = link.frames().__aiter__()
    pending: asyncio.Future[bytes] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(frames.__anext__())
            watched: set[asyncio.Future[Any]] = {pending}
            if grace_until is None:
                watched.add(job)
            limit = (grace_until if grace_until is not None else deadline) - loop.time()
            done, _ = await asyncio.wait(watched, timeout=max(limit, 0.0),
                                         return_when=asyncio.FIRST_COMPLETED)
            if pending in done:
                arrived, pending = pending, None
                try:
                    frame = arrived.result()
                except StopAsyncIteration:
                    return
                yield frame
                continue
            if grace_until is None and job.done():
                if job.cancelled() or job.exception() is not None:
                    return  # nothing more will come; the caller reads the job's failure
                grace_until = min(deadline, loop.time() + RELAY_GRACE_S)
                continue
            return  # out of time
    finally:
        if pending is not None:
            pending.cancel()


class HPCChunkRunner:
    name = "hpc"

    def __init__(self, tier: str, federation: FederatedHPCBackend,
                 resolve: Callable[[str], str], chunks_per_cluster: int = 2,
                 lines_at_once: int = 8, start_within_s: float = 3600.0):
        self.tier = tier
        self.federation = federation
        self.resolve = resolve  # a batch line's model name -> the name the clusters serve
        self.chunks_per_cluster = chunks_per_cluster
        self.lines_at_once = lines_at_once
        self.start_within_s = start_within_s  # a chunk that has not started by then is dropped
        self.placed: dict[str, int] = {}  # chunks per cluster, for tests and the benchmark

    def parallel(self) -> int:
        return self.chunks_per_cluster * len(self.federation.clusters)

    def _place(self, model: str) -> Cluster | None:
        usable = [c for c in self.federation.candidates(model) if c.state() != "offline"]
        return min(usable, key=lambda c: (c.state() != "ready", c.inflight)) if usable else None

    async def run_chunk(self, chunk: Chunk, cancel: asyncio.Event) -> AsyncIterator[LineResult]:
        model = self.resolve(chunk.model)
        if chunk.caller is not None and not chunk.caller.may_use(self.tier):
            denied = TierNotAllowed(f"your API key may not use the {self.tier} tier")
            for line in chunk.lines:
                yield LineResult.failed(line.custom_id, denied, model=model)
            return
        cluster = self._place(model)
        if cluster is None:
            err = TierUnavailable(f"no cluster of the {self.tier} tier serves {model} "
                                  "right now")
            for line in chunk.lines:
                yield LineResult.failed(line.custom_id, err, tier=self.tier, model=model)
            return
        backend = cluster.backend
        job = backend.new_channel()
        job.update({
            "backend_url": backend.cluster_backend_url, "api_key_env": backend.api_key_env,
            "lines": [{"custom_id": line.custom_id,
                       "body": {**line.body, "model": model}} for line in chunk.lines],
            "concurrency": self.lines_at_once,
            "backend_timeout_s": backend.deadlines.total,
            "start_by": time.time() + self.start_within_s + START_SLACK_S,
        })
        wanted = {line.custom_id for line in chunk.lines}
        seen: set[str] = set()
        cluster.inflight += 1
        self.placed[cluster.name] = self.placed.get(cluster.name, 0) + 1
        link = None
        watcher = None
        try:
            options = backend.job_options(chunk.caller.name if chunk.caller else None)
            started = await asyncio.to_thread(backend.submitter.plane.start, run_batch_chunk,
                                              job, options=options)
            future = started.future
            result = asyncio.wrap_future(future)
            link = await backend.dial(job)
            if link is not None:
                if job["key"] is not None:
                    opener = Opener(job["key"], job["channel"], Direction.DOWN)
                    up = Sealer(job["key"], job["channel"], Direction.UP)
                else:
                    opener = Opener(None, job["channel"], Direction.DOWN, require_sealed=False)
                    up = Sealer(None, job["channel"], Direction.UP)

                async def watch_cancel() -> None:
                    await cancel.wait()
                    try:
                        await link.send(up.seal(FrameType.CANCEL, b""))
                    except RelayError:
                        pass

                watcher = asyncio.create_task(watch_cancel())
                try:
                    async with contextlib.aclosing(
                            _frames_while(link, result, backend.deadlines.total)) as frames:
                        async for frame in frames:
                            ftype, payload = opener.open(frame)
                            if ftype is FrameType.DATA:
                                line = json.loads(payload)
                                if line["custom_id"] in wanted and \
                                        line["custom_id"] not in seen:
                                    seen.add(line["custom_id"])
                                    yield self._result(line, model)
                            elif ftype in (FrameType.FINAL, FrameType.ERROR):
                                break
                except RelayError as e:
                    log.warning("batch %s chunk on %s: relay lost (%s); taking results from "
                                "the job", chunk.batch_id, cluster.name, e.message)
            try:
                outcome = await asyncio.wait_for(result, backend.deadlines.total)
            except TimeoutError:
                log.warning("batch %s chunk on %s: no result in %.0f s", chunk.batch_id,
                            cluster.name, backend.deadlines.total)
                return  # the lines without results are retried by the batch service
            for line in outcome.get("results") or ():
                if line["custom_id"] in wanted and line["custom_id"] not in seen:
                    seen.add(line["custom_id"])
                    yield self._result(line, model)
            # Lines with no result (the relay died, the job was cut off) are retried by the
            # batch service, which is told by their absence.
        finally:
            cluster.inflight -= 1
            if watcher is not None:
                watcher.cancel()
            if link is not None:
                await link.close()

    def _result(self, line: dict[str, Any], model: str) -> LineResult:
        status = int(line.get("status_code") or 502)
        body = line.get("body")
        error = None
        if status != 200:
            detail = (body or {}).get("error") or {}
            code = str(detail.get("code") or detail.get("type") or "backend_error")
            error = LineError(code, str(detail.get("message") or f"HTTP {status}"))
        return LineResult(line["custom_id"], status, body, error,
                          (body or {}).get("usage") if status == 200 else None, self.tier,
                          model, duration_ms=float(line.get("duration_ms") or 0.0))
