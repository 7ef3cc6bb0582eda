"""The HPC backend: a job through the control plane, its tokens back through the relay.

Per request: a fresh channel and 256-bit key, a producer token for the worker (delivered with
the key through the control plane only), a consumer token for us. We read the relay and watch
the control-plane future at the same time. If the relay fails or lies mid-stream, the rest of
the answer is taken from the future's result (the backstop) at the exact offset already sent,
so the client gets every token once. If nothing arrives in time, the request fails over.

`transport="batch"` skips the relay: the whole answer arrives as the control-plane result, for
sites with no relay and for comparison. A relay that cannot be reached degrades to the same.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import httpx2

from streamllm.config import HPCDeadlines
from streamllm.errors import BackendFailed, RelayError
from streamllm.hpc.control import IdempotentSubmitter, JobOptions
from streamllm.hpc.worker import Backstop, run_completion
from streamllm.relay.client import RelayLink, dial
from streamllm.relay.crypto import Opener, Sealer, new_key
from streamllm.relay.frames import Direction, FrameType
from streamllm.relay.tokens import mint
from streamllm.tiers.base import Chunk, Dispatch, ProbeResult
from streamllm.tiers.openai_http import classify_status

log = logging.getLogger("streamllm.hpc")

Transport = Literal["relay", "batch"]


START_SLACK_S = 30.0  # clock difference we tolerate between the gateway and cluster nodes
RELAY_GRACE_S = 2.0  # how long the relay may lag behind a finished job's result

_RESULT = object()  # queued when the control-plane future completes
_LOST = object()  # queued when the relay connection ends without a final frame


class HPCRelayBackend:
    def __init__(
        self,
        tier: str,
        submitter: IdempotentSubmitter,
        relay_url: str | None,
        relay_secret: bytes | None,
        cluster_backend_url: str,
        deadlines: HPCDeadlines | None = None,
        encrypt: bool = True,
        token_ttl_s: float = 120.0,
        transport: Transport = "relay",
        api_key_env: str | None = None,
        models: list[str] | None = None,
        accounts: dict[str, str] | None = None,
    ):
        if transport == "relay" and (not relay_url or not relay_secret):
            raise ValueError("the relay transport needs a relay URL and secret")
        self.tier = tier
        self.submitter = submitter
        self.relay_url = relay_url
        self._secret = relay_secret
        self.cluster_backend_url = cluster_backend_url
        self.deadlines = deadlines or HPCDeadlines()
        self.encrypt = encrypt
        self._ttl = token_ttl_s
        self.transport = transport
        self.api_key_env = api_key_env
        self.models = list(models or [])
        self.accounts = dict(accounts or {})  # caller -> the scheduler account to charge
        self.healed = 0  # streams completed from the backstop after the relay failed
        self.last_heal_reason = ""  # why the last one was, for logs and diagnosis
        self.rejected: dict[str, int] = {}  # frames refused, by error type (tampered, ...)
        via = f"relay at {relay_url}" if transport == "relay" else "batch results"
        self.name = f"{submitter.plane.name} control plane, {via}"

    def _failed(self, what: str) -> BackendFailed:
        return BackendFailed(f"{self.tier} backend {what}", tier=self.tier)

    def _job_error(self, error: dict[str, Any]) -> Exception:
        status = error.get("status") or 502
        return classify_status(self.tier, int(status), str(error.get("message") or ""))

    # -- submission ------------------------------------------------------------------------------
    def _submit(self, body: dict[str, Any], dispatch: Dispatch) -> tuple[Any, dict[str, Any], bool]:
        channel = secrets.token_hex(16)
        job: dict[str, Any] = {
            "channel": channel,
            "key": new_key() if self.encrypt else None,
            "backend_url": self.cluster_backend_url,
            "body": body,
            "api_key_env": self.api_key_env,
            "backend_timeout_s": self.deadlines.total,
        }
        if self.transport == "relay":
            # Past the producer deadline we have given up (unless a retry joins, within the
            # same window), so a job that starts later only burns GPU time; slack for clocks.
            job["start_by"] = time.time() + self.deadlines.producer_connect + START_SLACK_S
            job["relay_url"] = self.relay_url
            job["producer_token"] = mint(self._secret, channel, "producer", self._ttl)  # type: ignore[arg-type]
        if dispatch.idempotency_key:
            # The same key with a different body is a different request, not a retry.
            digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
            key = f"{dispatch.idempotency_key}:{digest}"
        else:
            key = channel
        try:
            sub = self.submitter.submit(key, run_completion, job,
                                        options=self.job_options(dispatch.caller))
        except Exception as e:  # the control plane is down or refused the job outright
            raise self._failed(f"control plane {self.submitter.plane.name} refused the job: "
                               f"{type(e).__name__}: {e}") from None
        # A warm agent or a job of its own: the header says which (joined jobs keep theirs).
        dispatch.headers["x-stream-dispatch"] = sub.kind.value
        if sub.job_id:
            # The scheduler's id of the job (or of the agent's job): what `squeue`,
            # `scontrol show job` and the site's accounting call it.
            dispatch.headers["x-stream-hpc-job"] = sub.job_id
        return sub.future, sub.args[0], sub.started

    def job_options(self, caller: str | None) -> JobOptions:
        """What the scheduler is told of a job for `caller`: who, and the account to charge."""
        return JobOptions(caller=caller, account=self.accounts.get(caller or ""))

    def new_channel(self) -> dict[str, Any]:
        """A fresh relay channel for a job of another kind (a batch chunk): its id, key,
        relay and producer token, ready to go in the job."""
        channel = secrets.token_hex(16)
        job: dict[str, Any] = {"channel": channel, "key": new_key() if self.encrypt else None}
        if self.transport == "relay":
            job["relay_url"] = self.relay_url
            job["producer_token"] = mint(self._secret, channel, "producer", self._ttl)  # type: ignore[arg-type]
        return job

    async def dial(self, job: dict[str, Any]) -> RelayLink | None:
        """The consumer's end of a job's channel; None when there is no relay to reach."""
        return await self._dial(job)

    async def _dial(self, job: dict[str, Any]) -> RelayLink | None:
        if "relay_url" not in job:
            return None
        channel = job["channel"]
        token = mint(self._secret, channel, "consumer", self._ttl)  # type: ignore[arg-type]
        try:
            # From frame 0 even when joining a job already running: its frames are retained.
            return await dial(job["relay_url"], channel, "consumer", token, resume_from=0)
        except RelayError as e:
            log.warning("relay unavailable for channel %s…: %s; answering from the job result",
                        channel[:8], e.message)
            return None

    # -- streaming ------------------------------------------------------------------------------
    async def stream(
        self, body: dict[str, Any], dispatch: Dispatch | None = None
    ) -> AsyncIterator[list[Chunk]]:
        dispatch = dispatch or Dispatch()
        loop = asyncio.get_running_loop()
        started = loop.time()
        d = self.deadlines
        # In a thread: a control plane may run a command to submit (`sbatch`, over SSH even).
        future, job, _ = await asyncio.to_thread(self._submit, body, dispatch)
        result = asyncio.wrap_future(future)
        link = None if future.done() else await self._dial(job)
        dispatch.headers["x-stream-transport"] = "relay" if link is not None else "batch"
        opener = Opener(job["key"], job["channel"], Direction.DOWN,
                        require_sealed=job["key"] is not None)
        delivered = Backstop()  # what the client has been given so far, to heal at its end
        seen_output = False
        queue: asyncio.Queue[Any] = asyncio.Queue()
        result.add_done_callback(lambda _: queue.put_nowait(_RESULT))
        reader = asyncio.create_task(_read(link, queue)) if link is not None else None
        why = ""  # why the rest comes from the job's result, when it does
        try:
            heal = link is None
            relay_grace: float | None = None  # the job is done: the relay gets until then
            while not heal:
                if relay_grace is not None:
                    limit = relay_grace - loop.time()
                elif not seen_output:
                    limit = started + min(d.first_token, d.total) - loop.time()
                    if opener.next_seq == 0:
                        limit = min(limit, started + d.producer_connect - loop.time())
                else:
                    limit = min(d.between_tokens, started + d.total - loop.time())
                try:
                    async with asyncio.timeout(max(limit, 0)):
                        items = [await queue.get()]
                except TimeoutError:
                    if relay_grace is not None:
                        why = "the relay lagged behind the job's result"
                        break  # the relay is slower than the result: heal from it
                    phase = "between tokens" if seen_output else (
                        "before the worker connected" if opener.next_seq == 0 else
                        "before the first token"
                    )
                    raise self._failed(f"stalled {phase}") from None
                while not queue.empty():  # everything that arrived together goes out together
                    items.append(queue.get_nowait())
                batch: list[Chunk] = []
                done = False
                for item in items:
                    if heal or done:
                        continue
                    if item is _LOST:
                        try:
                            opener.end()  # a relay that hangs up early truncated the stream
                        except RelayError as e:
                            self._reject(e, job)
                        heal, why = True, "the relay connection ended early"
                        continue
                    if item is _RESULT:
                        # The worker has sent its last frame; it may still be on its way
                        # (results can overtake the relay), so wait briefly for the relay.
                        if _relay_has_nothing_more(result, opener.next_seq):
                            heal, why = True, _worker_relay_error(result) or (
                                "the job ended with nothing more on the relay")
                        else:
                            relay_grace = loop.time() + RELAY_GRACE_S
                        continue
                    try:
                        ftype, payload = opener.open(item)
                    except RelayError as e:
                        self._reject(e, job)
                        heal, why = True, f"a frame was rejected: {type(e).__name__}"
                        continue
                    if ftype is FrameType.DATA:
                        chunk = json.loads(payload)
                        delivered.add(chunk)
                        batch.append(Chunk(chunk, payload.decode()))
                    elif ftype is FrameType.ERROR:
                        if batch:
                            yield batch
                        raise self._job_error(json.loads(payload).get("error") or {})
                    elif ftype is FrameType.FINAL:
                        done = True
                if batch:
                    seen_output = True
                    yield batch
                if done:
                    return
            if link is not None:
                self.last_heal_reason = why
                log.warning("relay channel %s…: %s; the rest comes from the job's result",
                            job["channel"][:8], why)
            async for batch in self._heal(result, delivered, started, relayed=link is not None):
                yield batch
        except BaseException:
            # A client that may retry with the same idempotency key would rejoin this job, so
            # only a request without one stops the GPU work when it goes away.
            if link is not None and not future.done() and not dispatch.idempotency_key:
                await _cancel(link, job)
            raise
        finally:
            if reader is not None:
                reader.cancel()
            if link is not None:
                await link.close()

    def _reject(self, err: RelayError, job: dict[str, Any]) -> None:
        kind = type(err).__name__
        self.rejected[kind] = self.rejected.get(kind, 0) + 1
        log.warning("relay channel %s… rejected: %s; healing from the job result",
                    job["channel"][:8], err.message)

    async def _heal(
        self, result: asyncio.Future[Any], delivered: Backstop, started: float, relayed: bool
    ) -> AsyncIterator[list[Chunk]]:
        remaining = self.deadlines.total - (asyncio.get_running_loop().time() - started)
        try:
            outcome = await asyncio.wait_for(asyncio.shield(result), max(remaining, 0))
        except TimeoutError:
            raise self._failed("gave no result in time") from None
        except Exception as e:
            raise self._failed(f"job failed in the control plane: {e}") from None
        if outcome.get("error"):
            raise self._job_error(outcome["error"])
        sent = delivered.result()["choices"]
        if relayed:
            self.healed += 1
        base = {"id": "hpc-backstop", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": outcome.get("model") or ""}
        batch = []
        for choice in outcome["choices"]:
            delta = _rest(choice, next((c for c in sent if c["index"] == choice["index"]), None))
            if not delta and sent and _finished(sent, choice["index"]):
                continue  # the relay brought this choice completely
            data = {**base, "choices": [{"index": choice["index"], "delta": delta,
                                         "finish_reason": choice["finish_reason"]}]}
            batch.append(Chunk(data, json.dumps(data)))
        if outcome.get("usage") and not delivered.usage:
            usage = {**base, "choices": [], "usage": outcome["usage"]}
            batch.append(Chunk(usage, json.dumps(usage)))
        if batch:
            yield batch

    # -- non-streaming -------------------------------------------------------------------------
    async def complete(
        self, body: dict[str, Any], dispatch: Dispatch | None = None
    ) -> dict[str, Any]:
        whole = Backstop()
        async for batch in self.stream({**body, "stream": True}, dispatch):
            for chunk in batch:
                whole.add(chunk.data)
        r = whole.result()
        choices = []
        for c in r["choices"]:
            message: dict[str, Any] = {"role": "assistant", "content": c["content"] or None}
            if c["tool_calls"]:
                message["tool_calls"] = [
                    {"id": t["id"], "type": "function",
                     "function": {"name": t["name"], "arguments": t["arguments"]}}
                    for t in c["tool_calls"]
                ]
            elif message["content"] is None:
                message["content"] = ""
            choices.append({"index": c["index"], "message": message, "logprobs": None,
                            "finish_reason": c["finish_reason"]})
        out: dict[str, Any] = {"id": "hpc", "object": "chat.completion",
                               "created": int(time.time()), "model": r["model"] or "",
                               "choices": choices}
        if r["usage"]:
            out["usage"] = r["usage"]
        return out

    # -- health ---------------------------------------------------------------------------------
    async def probe(self) -> ProbeResult:
        """The relay must answer its health check; the cluster itself is not reachable from
        here (that is the point of the relay), so jobs are what prove it."""
        if self.transport == "batch":
            return ProbeResult(ok=True, detail=self.name, models=self.models)
        started = time.perf_counter()
        url = self.relay_url.replace("ws", "http", 1).rstrip("/") + "/health"  # type: ignore[union-attr]
        try:
            async with httpx2.AsyncClient(timeout=2.0) as client:
                resp = await client.get(url)
            ok = resp.status_code == 200
            detail = "relay ok" if ok else f"relay health answered {resp.status_code}"
        except httpx2.HTTPError as e:
            ok, detail = False, f"relay unreachable: {type(e).__name__}"
        return ProbeResult(ok=ok, detail=detail, models=self.models,
                           latency_ms=(time.perf_counter() - started) * 1000)

    async def aclose(self) -> None:
        pass  # the runtime owns the control plane and the relay


def _relay_has_nothing_more(result: asyncio.Future[Any], received: int) -> bool:
    if result.exception() is not None:
        return True
    outcome = result.result()
    return bool(outcome.get("relay_error")) or outcome.get("frames", 0) <= received


def _worker_relay_error(result: asyncio.Future[Any]) -> str | None:
    if result.exception() is not None:
        return f"the job failed: {result.exception()}"
    error = result.result().get("relay_error")
    return f"the worker's relay link failed: {error}" if error else None


async def _read(link: RelayLink, queue: asyncio.Queue[Any]) -> None:
    try:
        async for frame in link.frames():
            queue.put_nowait(frame)
    except RelayError:
        pass
    queue.put_nowait(_LOST)


async def _cancel(link: RelayLink, job: dict[str, Any]) -> None:
    try:
        await link.send(Sealer(job["key"], job["channel"], Direction.UP).seal(FrameType.CANCEL, b""))
    except RelayError:
        pass


def _rest(full: dict[str, Any], sent: dict[str, Any] | None) -> dict[str, Any]:
    """The part of a choice the client has not been given yet, as one delta."""
    sent = sent or {"content": "", "tool_calls": []}
    delta: dict[str, Any] = {}
    content, had = full["content"] or "", sent["content"] or ""
    if content.startswith(had) and len(content) > len(had):
        delta["content"] = content[len(had):]
    calls = []
    for i, call in enumerate(full.get("tool_calls") or ()):
        before = sent["tool_calls"][i] if i < len(sent["tool_calls"]) else None
        if before is None:
            calls.append({"index": i, "id": call["id"], "type": "function",
                          "function": {"name": call["name"], "arguments": call["arguments"]}})
        elif call["arguments"].startswith(before["arguments"]) and (
            len(call["arguments"]) > len(before["arguments"])
        ):
            calls.append({"index": i, "function": {
                "arguments": call["arguments"][len(before["arguments"]):]}})
    if calls:
        delta["tool_calls"] = calls
    return delta


def _finished(sent: list[dict[str, Any]], index: int) -> bool:
    return any(c["index"] == index and c["finish_reason"] for c in sent)

