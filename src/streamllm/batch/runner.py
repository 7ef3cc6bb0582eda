"""Chunk runners: what runs a chunk of a batch's lines, and the one that uses the tiers' backends.

The interface every runner implements (the batch service knows nothing else):

    class ChunkRunner(Protocol):
        name: str
        def parallel(self) -> int: ...
        def run_chunk(self, chunk: Chunk, cancel: asyncio.Event) -> AsyncIterator[LineResult]: ...

- `parallel()`: how many chunks the runner takes at once, across every batch of the gateway
  (the service holds a semaphore of that size per runner name).
- `run_chunk(chunk, cancel)` is an async generator (`async def` with `yield`): it yields one
  `LineResult` per line as soon as the line has one, in any order. A line's result is final
  when it is yielded: the service stores it (exactly once per custom_id) and writes its ledger
  row (from `usage`, `tier`, `model`) before it asks for the next, so a runner may hold a
  budget reservation until then. Lines carry the caller: route them with `route_line` so the
  caller's tiers, cloud use and privacy rules hold, and reserve budgets as this runner does.
- A retried chunk (`attempt` 2) holds lines that may already be running from the first
  attempt: derive idempotency keys from (batch_id, custom_id) to join them, not start again.
- `cancel` set: the batch was cancelled. Start nothing new, stop the work in flight (abort the
  backend requests), return soon; results already finished may still be yielded.
- `chunk.draining` set: the gateway is shutting down. Start nothing new, but let lines in flight
  finish and yield them; the service cuts off what is still running after `batch.drain_s`.
- A line the runner cannot serve is a result, not an exception: a `LineResult` with its
  `status_code` (404, 429, 502 ...), the OpenAI error envelope as `body`, and `error`.
- An exception out of `run_chunk` (or returning without a result for some lines) means the
  chunk died: the results yielded so far are kept, the other lines are given to the runner once
  more in a new chunk (`attempt` 2), and after that they fail with `runner_failed`.

`BackendChunkRunner` runs lines through the gateway's own tier backends, like
`POST /v1/chat/completions` without streaming: routing by the policy (the judge for `auto`),
privacy, allowed tiers, budgets, fallback before output. It reaches the gateway only through
`BatchHost`, so this package does not import `gateway`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import ValidationError

from streamllm.caller import Caller
from streamllm.config import BatchSettings, Settings, TierSettings
from streamllm.context.tokens import estimate_messages
from streamllm.errors import (
    BackendFailed,
    BackendRateLimited,
    BackendRejected,
    BudgetExhausted,
    ContextTooLong,
    InvalidRequest,
    StreamError,
    TierUnavailable,
)
from streamllm.protocol.chat import ChatCompletionRequest
from streamllm.protocol.errors import ErrorEnvelope
from streamllm.routing.judge import Judge
from streamllm.routing.policy import RequestFacts, Route, RoutingPolicy
from streamllm.routing.privacy import SensitiveDataDetector
from streamllm.tiers.adapt import backend_body
from streamllm.tiers.base import Backend, Dispatch

log = logging.getLogger("streamllm.batch")


@dataclass(frozen=True)
class BatchLine:
    custom_id: str
    body: dict[str, Any]  # the line's chat completion request, as the input file has it


@dataclass
class Chunk:
    """Lines of one batch that name the same model, handed to one runner together."""

    batch_id: str
    model: str
    lines: list[BatchLine]
    caller: Caller | None = None  # whose batch: allowed tiers, cloud use, budget
    attempt: int = 1  # 2 when these lines are retried after the chunk died
    draining: asyncio.Event = field(default_factory=asyncio.Event)  # shutdown: finish, no new


@dataclass(frozen=True)
class LineError:
    code: str
    message: str


@dataclass(frozen=True)
class LineResult:
    custom_id: str
    status_code: int | None  # the HTTP status the line's request got; None: it got none
    body: dict[str, Any] | None  # chat.completion (200) or OpenAI's error envelope
    error: LineError | None  # set for every line that did not succeed
    usage: dict[str, Any] | None  # the backend's usage, for the ledger
    tier: str | None  # where it ran; None: it reached no tier
    model: str | None
    complexity: str | None = None  # the judge's label, for `auto` lines
    route_reason: str | None = None
    fallbacks: int = 0
    duration_ms: float = 0.0

    @classmethod
    def failed(cls, custom_id: str, err: StreamError, *, tier: str | None = None,
               model: str | None = None, **kw: Any) -> LineResult:
        """The result of a line that got `err`, as `POST /v1/chat/completions` would answer."""
        code = err.code or err.type
        body = ErrorEnvelope.of(err.message, err.type, err.param, code).model_dump()
        return cls(custom_id, err.status, body, LineError(str(code), err.message), None, tier,
                   model, **kw)


class ChunkRunner(Protocol):
    name: str

    def parallel(self) -> int:
        """How many chunks this runner takes at once."""
        ...

    def run_chunk(self, chunk: Chunk, cancel: asyncio.Event) -> AsyncIterator[LineResult]:
        ...


class Budgets(Protocol):
    """The gateway's accounting, as much of it as a runner needs."""

    async def reserve(self, caller: Caller | None, usd: float) -> Any: ...

    def settle(self, reservation: Any) -> None: ...


class BatchHost(Protocol):
    """What the batch package needs of a running gateway (the gateway's Runtime)."""

    settings: Settings
    tiers: dict[str, TierSettings]
    backends: dict[str, Backend]
    policy: RoutingPolicy | None
    judge: Judge | None
    detector: SensitiveDataDetector | None
    accounts: Any  # Budgets, and record(UsageRow)

    def healthy(self, tier: str) -> bool: ...

    def mark_failed(self, tier: str, detail: str) -> None: ...

    def mark_ok(self, tier: str) -> None: ...

    def cost(self, tier: str | None, model: str | None, usage: dict | None) -> float: ...

    async def high_threshold(self, caller: Caller | None) -> float: ...

    def batch_runner_for(self, model: str) -> ChunkRunner: ...


def parse_body(body: Mapping[str, Any]) -> ChatCompletionRequest:
    """A line's body as a chat request, or InvalidRequest saying what is wrong (the message
    `POST /v1/chat/completions` would give)."""
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        errors = e.errors()
        # For a union pydantic reports every member; a wrong type is the least telling.
        first = next((x for x in errors if not x["type"].endswith("_type")), errors[0])
        param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}"
                        for p in first["loc"] if not _union_tag(p)).lstrip(".") or None
        msg = (f"'{param}' is a required property" if first["type"] == "missing"
               else first["msg"])
        raise InvalidRequest(f"Invalid value for '{param}': {msg}", param=param) from None


def _union_tag(part: Any) -> bool:
    return isinstance(part, str) and (part[:1].isupper() or "[" in part or "-" in part or
                                      part in ("str", "int", "float", "bool", "list", "dict"))


class BackendChunkRunner:
    """Runs a chunk's lines through the tiers' backends, `lines_at_once` at a time."""

    name = "tiers"

    def __init__(self, host: BatchHost, settings: BatchSettings):
        self.host = host
        self.settings = settings

    def parallel(self) -> int:
        return self.settings.chunks_at_once

    async def run_chunk(self, chunk: Chunk, cancel: asyncio.Event) -> AsyncIterator[LineResult]:
        finished: asyncio.Queue[tuple[LineResult, Any] | None] = asyncio.Queue()
        room = asyncio.Semaphore(self.settings.lines_at_once)  # FIFO: lines start in order

        async def run(line: BatchLine) -> None:
            async with room:
                if cancel.is_set() or chunk.draining.is_set():
                    await finished.put(None)  # not started, stays pending
                    return
                try:
                    item = await self._line(chunk, line)
                except Exception as e:  # a bug here must cost one line, not the chunk
                    log.exception("batch %s line %s failed", chunk.batch_id, line.custom_id)
                    item = (LineResult.failed(line.custom_id, StreamError(
                        f"internal error in the STREAM gateway: {type(e).__name__}")), None)
                await finished.put(item)

        tasks = [asyncio.create_task(run(line)) for line in chunk.lines]
        stop = asyncio.create_task(cancel.wait())
        try:
            for _ in tasks:
                get = asyncio.create_task(finished.get())
                await asyncio.wait({get, stop}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    break
                item = get.result()
                if item is not None:
                    result, hold = item
                    try:
                        yield result
                    finally:
                        self._settle(hold)
            else:
                return
            # Cancelled: abort what is running, then hand over what had already finished.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            while not finished.empty():
                item = finished.get_nowait()
                if item is not None:
                    try:
                        yield item[0]
                    finally:
                        self._settle(item[1])
        finally:
            stop.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(stop, *tasks, return_exceptions=True)
            while not finished.empty():
                item = finished.get_nowait()
                if item is not None:
                    self._settle(item[1])

    def _settle(self, hold: Any) -> None:
        if hold is not None:
            self.host.accounts.settle(hold)

    async def _line(self, chunk: Chunk, line: BatchLine) -> tuple[LineResult, Any]:
        """One line, start to end: its result, and the budget reservation it holds."""
        started = time.perf_counter()
        try:
            req = parse_body(line.body)
            route = await route_line(self.host, req, chunk.caller)
        except StreamError as e:
            named = line.body.get("model")
            return LineResult.failed(line.custom_id, e,
                                     model=named if isinstance(named, str) else None), None
        host = self.host
        failures: list[StreamError] = []
        reasons = ",".join(["batch", *route.reasons])
        prompt = estimate_messages(req.all_texts(), req.attachment_count())
        output = req.output_limit or host.settings.context.reserve_output_tokens
        tried: tuple[str, str] | None = None  # the last (tier, model) a backend was asked
        for cand in route.candidates:
            ts = host.tiers[cand.tier]
            estimate = host.cost(cand.tier, cand.model,
                                 {"prompt_tokens": prompt, "completion_tokens": output})
            try:
                hold = await host.accounts.reserve(chunk.caller, estimate)
            except BudgetExhausted as e:
                failures.append(e)
                continue
            body = backend_body(line.body, cand.model, ts, stream=False)
            dispatch = Dispatch(idempotency_key=f"{chunk.batch_id}:{line.custom_id}")
            common: dict[str, Any] = {
                "tier": cand.tier, "model": cand.model, "complexity": route.complexity,
                "route_reason": reasons, "fallbacks": len(failures)}
            tried = (cand.tier, cand.model)
            try:
                result = await host.backends[cand.tier].complete(body, dispatch)
            except (BackendFailed, ContextTooLong) as e:
                host.accounts.settle(hold)
                failures.append(e)
                if isinstance(e, BackendFailed):
                    host.mark_failed(cand.tier, e.message)
                continue
            except BackendRejected as e:
                host.accounts.settle(hold)
                return LineResult.failed(
                    line.custom_id, e, duration_ms=_ms(started), **common), None
            except BaseException:
                host.accounts.settle(hold)
                raise
            host.mark_ok(cand.tier)
            return LineResult(line.custom_id, 200, result, None, result.get("usage"),
                              duration_ms=_ms(started), **common), hold
        return LineResult.failed(line.custom_id, _give_up(failures),
                                 tier=tried[0] if tried else None,
                                 model=tried[1] if tried else None,
                                 complexity=route.complexity, route_reason=reasons,
                                 fallbacks=len(failures), duration_ms=_ms(started)), None



async def route_line(host: BatchHost, req: ChatCompletionRequest, caller: Caller | None) -> Route:
    """Where a batch line may run, as for a chat request from its caller: the policy (the judge
    for `auto`), privacy, the caller's tiers and cloud use; nothing is summarised, so the
    whole line must fit. Raises what the chat endpoint would answer (ModelNotFound, ...).
    Any runner should route (or at least check) its lines with it."""
    assert host.policy is not None
    found = host.detector.first(req.all_texts()) if host.detector else None
    allow_cloud = (caller is None or caller.allow_cloud) and req.allow_cloud is not False
    facts = RequestFacts(
        allow_cloud=allow_cloud,
        allowed_tiers=caller.allow_tiers if caller else None,
        sensitive=found.kind if found else None,
        prompt_tokens=estimate_messages(req.all_texts(), req.attachment_count())
        + (req.output_limit or 0),
        min_tokens=None,
        full_context=True,
        high_threshold=await host.high_threshold(caller),
    )
    judgement = None
    if host.policy.needs_judgement(req.model):
        assert host.judge is not None
        judgement = await host.judge.judge(
            req.latest_user_text(),
            req.earlier_user_texts(host.settings.routing.judge.context_turns))
    return host.policy.route(req.model, facts, judgement, healthy=host.healthy)


def _give_up(failures: list[StreamError]) -> StreamError:
    """What a line that no candidate served answers: as the chat endpoint would."""
    if len(failures) == 1:
        return failures[0]
    for kind in (ContextTooLong, BackendRateLimited, BudgetExhausted):
        if failures and all(isinstance(f, kind) for f in failures):
            return failures[-1]
    return TierUnavailable(
        "no tier could serve this request: " + "; ".join(f.message for f in failures))


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000
