"""`POST /v1/chat/completions`: parse, route, dispatch with fallback, stream back.

Fallback is allowed only until the first user-visible chunk: chunks are held back until a
backend has produced output, so a backend that fails before that is replaced invisibly. After
that, a failure ends the stream with an OpenAI-style error event; no text is ever repeated.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from pydantic import ValidationError
from starlette.responses import JSONResponse, Response

from streamllm.caller import Caller
from streamllm.context.manager import Outcome
from streamllm.context.tokens import estimate_messages
from streamllm.errors import (
    BackendFailed,
    BackendRateLimited,
    BudgetExhausted,
    ContextTooLong,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    StreamError,
    TierUnavailable,
)
from streamllm.gateway.disconnect import ClientWatch, RelayResponse
from streamllm.gateway.errors import envelope
from streamllm.gateway.runtime import Runtime
from streamllm.gateway.ticket import Ticket
from streamllm.protocol.chat import ChatCompletionRequest
from streamllm.protocol.sse import DONE, encode
from streamllm.routing.policy import Candidate, RequestFacts, Route
from streamllm.tiers.adapt import backend_body
from streamllm.tiers.base import WAITING, Chunk, Dispatch, is_waiting_note
from streamllm.tiers.openai_http import has_output

log = logging.getLogger("streamllm.gateway")

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


async def read_json_body(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is larger than the {limit}-byte limit")
    chunks, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise PayloadTooLarge(f"request body is larger than the {limit}-byte limit")
        chunks.append(part)
    raw = b"".join(chunks)
    if not raw.strip():
        raise InvalidRequest("request body is empty; expected a JSON object")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"request body is not valid JSON: {e}") from None


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}
_PART_TYPES = {"text", "image_url", "input_audio", "file", "refusal"}


def param_path(loc: tuple[int | str, ...]) -> str:
    """`messages[0].content` from a pydantic location, without its union-member tags."""
    out: list[str] = []
    for i, seg in enumerate(loc):
        if isinstance(seg, int):
            out.append(f"[{seg}]")
            continue
        tag = (
            seg in _TYPE_TAGS or "[" in seg or "-" in seg or seg[:1].isupper()
            # the discriminator value of a content part follows its index
            or (seg in _PART_TYPES and i >= 2 and isinstance(loc[i - 1], int)
                and loc[i - 2] == "content")
        )
        if not tag:
            out.append(f".{seg}")
    return "".join(out).lstrip(".")


def _most_telling(errors: list) -> dict:
    # For a union, pydantic reports one error per member; "wrong type for member 1" is the
    # least useful of them when another member got further (e.g. a list that is too long).
    specific = [e for e in errors if not e["type"].endswith("_type")]
    return (specific or errors)[0]


def parse_request(body: Any) -> ChatCompletionRequest:
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        first = _most_telling(e.errors())
        param = param_path(first["loc"])
        msg = first["msg"]
        if first["type"] == "missing":
            msg = f"'{param}' is a required property"
        raise InvalidRequest(f"Invalid value for '{param}': {msg}", param=param or None) from None


def idempotency_key(request: Request) -> str | None:
    """The client's `Idempotency-Key`: a retry carrying it joins the job the first try started."""
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not 1 <= len(key) <= 255 or not key.isprintable():
        raise InvalidRequest("Idempotency-Key must be 1 to 255 printable characters",
                             param="Idempotency-Key")
    # Scoped to the caller's credentials: one user's key never joins another user's job.
    caller = hashlib.sha256(request.headers.get("authorization", "").encode()).hexdigest()[:16]
    return f"{caller}:{key}"


def _client_allows_cloud(req: ChatCompletionRequest, request: Request,
                         caller: Caller | None) -> bool:
    if caller is not None and not caller.allow_cloud:
        return False
    header = request.headers.get("x-stream-allow-cloud")
    if header is not None and header.strip().lower() in ("0", "false", "no", "off"):
        return False
    return req.allow_cloud is not False


class ChatHandler:
    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.settings = runtime.settings

    async def __call__(self, request: Request) -> Response:
        body = await read_json_body(request, self.settings.server.max_body_bytes)
        req = parse_request(body)
        idem = idempotency_key(request)
        request_id = request.state.request_id
        if self.settings.server.log_prompts:
            log.info("request %s prompt: %r", request_id, req.latest_user_text())
        if req.unknown_fields():
            log.debug("passing on unknown request fields: %s", ", ".join(req.unknown_fields()))
        caller: Caller | None = getattr(request.state, "caller", None)
        conversation = await self._conversation(request, caller)
        # Over its rate or concurrency limit, a caller is refused before any work is done.
        ticket = Ticket(self.runtime, request_id, caller, self.runtime.accounts.admit(caller),
                        conversation=conversation, user_text=req.latest_user_text())
        arrived = ticket.arrived
        watch = ClientWatch(request)
        handed_over = False
        try:
            route = ticket.route = await self._route(req, request, caller)
            headers = request.state.stream_headers
            _explain(headers, route)
            headers["x-stream-overhead-ms"] = f"{(time.perf_counter() - arrived) * 1000:.3f}"
            if req.wants_stream:
                cand, stream, held, failures, dispatch, fit = await self._open(
                    body, req, route, idem, ticket)
                self._label(headers, cand, failures, route, fit)
                headers.update(dispatch.headers)
                handed_over = True  # from here the response owns the watch and the ticket
                return RelayResponse(
                    self._relay(req, body, cand, stream, held, ticket, fit), watch,
                    SSE_HEADERS)
            return await self._complete(body, req, route, headers, idem, ticket)
        except asyncio.CancelledError:
            ticket.close("cancelled")
            if not watch.absorb():
                raise
            log.info("request %s: client left before the answer began", request_id)
            return Response(status_code=499)
        except StreamError as e:
            ticket.close("rejected" if e.status < 500 else "failed")
            raise
        finally:
            if not handed_over:
                watch.stop()
                ticket.close("failed")  # a no-op when an outcome was already recorded

    async def _conversation(self, request: Request, caller: Caller | None) -> str | None:
        """The web chat conversation this exchange is to be kept in, if the caller owns it."""
        wanted = request.headers.get("x-stream-conversation")
        if not wanted:
            return None
        if not await self.runtime.owns_conversation(caller, wanted):
            raise NotFound(f"No conversation `{wanted}` exists for this caller.",
                           param="x-stream-conversation")
        return wanted

    async def _route(self, req: ChatCompletionRequest, request: Request,
                     caller: Caller | None) -> Route:
        runtime = self.runtime
        assert runtime.policy is not None
        found = runtime.detector.first(req.all_texts()) if runtime.detector else None
        output = req.output_limit or 0
        whole = estimate_messages(req.all_texts(), req.attachment_count())
        # What no summary can remove: system messages, and the latest user turn onwards.
        users = [i for i, m in enumerate(req.messages) if m.role == "user"]
        kept = [m for m in req.messages if m.role in ("system", "developer")]
        kept += [m for m in req.messages[users[-1] if users else 0:]
                 if m.role not in ("system", "developer")]
        least = estimate_messages([m.text() for m in kept])
        facts = RequestFacts(
            allow_cloud=_client_allows_cloud(req, request, caller),
            allowed_tiers=caller.allow_tiers if caller else None,
            sensitive=found.kind if found else None,
            prompt_tokens=whole + output,
            min_tokens=least + output if self.settings.context.summarize else None,
            full_context=_wants_full_context(req, request),
            high_threshold=await runtime.high_threshold(caller),
        )
        judgement = None
        if runtime.policy.needs_judgement(req.model):
            judge = runtime.judge_for(request.headers.get("x-stream-judge-kind"))
            judgement = await judge.judge(
                req.latest_user_text(),
                req.earlier_user_texts(self.settings.routing.judge.context_turns))
            runtime.metrics.judge.labels(judgement.judge.split("->")[0]).observe(
                judgement.latency_ms / 1000)
        return runtime.policy.route(req.model, facts, judgement, healthy=runtime.healthy)

    # -- shared fallback loop ------------------------------------------------------------------
    def _give_up(self, route: Route, failures: list[StreamError]) -> StreamError:
        # Too long for every tier tried is the client's to fix (400); too long for some while
        # others were down may succeed later, so it stays a 503 below. Likewise a budget that
        # covers none of the tiers is a 429 the caller can act on.
        for kind in (ContextTooLong, BackendRateLimited, BudgetExhausted):
            if failures and all(isinstance(f, kind) for f in failures):
                return failures[-1]
        return TierUnavailable(
            "no tier could serve this request: " + "; ".join(f.message for f in failures)
        )

    def _note_failure(self, cand: Candidate, err: StreamError) -> None:
        if isinstance(err, BackendFailed):
            self.runtime.mark_failed(cand.tier, err.message)
            self.runtime.metrics.fallbacks.labels(cand.tier).inc()
        log.warning("tier %s (%s) failed before output: %s", cand.tier, cand.model, err.message)

    async def _prepare(self, body: dict, req: ChatCompletionRequest, cand: Candidate,
                       ticket: Ticket) -> tuple[dict, Outcome]:
        """The body with its messages fitted to the candidate's window (or ContextTooLong),
        and the request's cost on this tier reserved from the budgets (or BudgetExhausted)."""
        runtime = self.runtime
        window = runtime.windows.get(cand.tier)
        owner = ticket.caller.name if ticket.caller else None
        outcome = await runtime.context.fit(
            body["messages"], cand.tier, cand.model, window, req.output_limit, owner)
        if outcome is None:
            raise ContextTooLong(
                f"The conversation does not fit the {cand.tier} tier's context window of "
                f"{window} tokens, even with older turns summarised: the system messages and "
                "the latest user message alone are too long.", param="messages")
        if ticket.reservation is not None:
            runtime.accounts.settle(ticket.reservation)
        estimate = runtime.cost(cand.tier, cand.model, {
            "prompt_tokens": outcome.fitted.tokens_after,
            "completion_tokens": req.output_limit or self.settings.context.reserve_output_tokens,
        })
        ticket.reservation = await runtime.accounts.reserve(ticket.caller, estimate)
        ticket.prompt_estimate = outcome.fitted.tokens_after
        if outcome.fitted.action != "full":
            body = {**body, "messages": outcome.fitted.messages}
        return body, outcome

    def _after(self, req: ChatCompletionRequest, body: dict, cand: Candidate, fit: Outcome,
               usage: dict | None, answer: str, caller: Caller | None) -> None:
        """Learn from a finished answer: calibrate the model's token counts on what was sent,
        and prepare the summaries the conversation's next turn will need."""
        context = self.runtime.context
        context.observe(cand.model, fit.fitted.messages, (usage or {}).get("prompt_tokens"))
        conversation = [*body["messages"], {"role": "assistant", "content": answer}]
        owner = caller.name if caller else None
        for tier in dict.fromkeys((cand.tier, "local")):
            model = (cand.model if tier == cand.tier
                     else (self.runtime.catalogue.get(tier) or [None])[0])
            if model is not None:
                context.prepare_ahead(conversation, tier, model, self.runtime.windows.get(tier),
                                      req.output_limit, owner)

    @staticmethod
    def _label(headers: dict[str, str], cand: Candidate, failures: list[StreamError],
               route: Route, fit: Outcome) -> None:
        headers["x-stream-tier"] = cand.tier
        headers["x-stream-model"] = cand.model
        f = fit.fitted
        headers["x-stream-context"] = f.action
        headers["x-stream-context-tokens-before"] = str(f.tokens_before)
        headers["x-stream-context-tokens-after"] = str(f.tokens_after)
        if fit.summary_id:
            headers["x-stream-summary-id"] = fit.summary_id
            # "new": this request waited for the summary to be written; "stored": it was ready.
            headers["x-stream-summary"] = "new" if fit.summarized_now else "stored"
            if fit.summarized_now:
                headers["x-stream-summary-ms"] = f"{fit.summary_ms:.1f}"
        if failures:
            headers["x-stream-fallbacks"] = str(len(failures))
            # The tiers tried before this one failed for this very request.
            served = route.candidates.index(cand)
            extra = [f"fallback:{c.tier}-{getattr(f, 'reason', 'down')}"
                     for c, f in zip(route.candidates[:served], failures, strict=False)]
            headers["x-stream-route-reason"] = ",".join([*route.reasons, *extra])

    # -- non-streaming -------------------------------------------------------------------------
    async def _complete(self, body, req: ChatCompletionRequest, route: Route, headers, idem,
                        ticket: Ticket) -> Response:
        failures: list[StreamError] = []
        for cand in route.candidates:
            tier = self.runtime.tiers[cand.tier]
            dispatch = Dispatch(idempotency_key=idem,
                                caller=ticket.caller.name if ticket.caller else None,
                                may_fall_back=cand is not route.candidates[-1])
            try:
                fitted, fit = await self._prepare(body, req, cand, ticket)
                result = await self.runtime.backends[cand.tier].complete(
                    backend_body(fitted, cand.model, tier, stream=False), dispatch
                )
            except (BackendFailed, ContextTooLong, BudgetExhausted) as e:
                failures.append(e)
                self._note_failure(cand, e)
                continue
            self.runtime.mark_ok(cand.tier)
            self._label(headers, cand, failures, route, fit)
            headers.update(dispatch.headers)
            ticket.tier, ticket.model, ticket.fallbacks = cand.tier, cand.model, len(failures)
            ticket.output()
            ticket.usage = result.get("usage")
            answer = _answer_of(result)
            ticket.answer = [answer]
            self._after(req, body, cand, fit, ticket.usage, answer, ticket.caller)
            await ticket.keep("completed")
            ticket.close("completed")
            result["id"] = f"chatcmpl-{ticket.request_id}"
            return JSONResponse(result)
        ticket.fallbacks = len(failures)
        raise self._give_up(route, failures)

    # -- streaming -----------------------------------------------------------------------------
    async def _open(
        self, body, req: ChatCompletionRequest, route: Route, idem: str | None, ticket: Ticket,
    ) -> tuple[Candidate, AsyncIterator, list, list, Dispatch, Outcome]:
        """Start candidates in order until one produces output; return it with held chunks."""
        failures: list[StreamError] = []
        for cand in route.candidates:
            tier = self.runtime.tiers[cand.tier]
            dispatch = Dispatch(idempotency_key=idem,
                                caller=ticket.caller.name if ticket.caller else None,
                                may_fall_back=cand is not route.candidates[-1])
            try:
                fitted, fit = await self._prepare(body, req, cand, ticket)
            except (ContextTooLong, BudgetExhausted) as e:
                failures.append(e)
                self._note_failure(cand, e)
                continue
            stream = self.runtime.backends[cand.tier].stream(
                backend_body(fitted, cand.model, tier, stream=True), dispatch
            )
            held: list[Chunk] = []
            try:
                async for batch in stream:
                    held.extend(batch)
                    # A waiting note (a cluster still starting) starts the response too: the
                    # tier has taken the request and holds it in its queue.
                    if any(has_output(chunk.data) or is_waiting_note(chunk) for chunk in batch):
                        break
            except (BackendFailed, ContextTooLong) as e:
                await stream.aclose()
                failures.append(e)
                self._note_failure(cand, e)
                continue
            except BaseException:
                await stream.aclose()
                raise
            self.runtime.mark_ok(cand.tier)
            ticket.tier, ticket.model, ticket.fallbacks = cand.tier, cand.model, len(failures)
            return cand, stream, held, failures, dispatch, fit
        ticket.fallbacks = len(failures)
        raise self._give_up(route, failures)

    async def _relay(
        self, req: ChatCompletionRequest, body: dict, cand: Candidate, stream, held,
        ticket: Ticket, fit: Outcome,
    ) -> AsyncIterator[bytes]:
        chunk_id = f"chatcmpl-{ticket.request_id}"
        include_usage = req.wants_usage_chunk
        outcome = "completed"
        answer = ticket.answer  # the first choice's text: for the next turn and the web chat
        try:
            ticket.usage = _usage_in(held) or ticket.usage
            _collect(held, answer)
            if not _only_waiting(held):
                ticket.output()
            yield _for_client(held, chunk_id, include_usage)
            async for batch in stream:
                ticket.usage = _usage_in(batch) or ticket.usage
                _collect(batch, answer)
                out = _for_client(batch, chunk_id, include_usage)
                if out:
                    if not _only_waiting(batch):
                        ticket.output()
                    yield out
            await ticket.keep("completed")
            # In the ledger before the client sees the end: its next request may ask for it.
            ticket.close(outcome)
            yield DONE
            self._after(req, body, cand, fit, ticket.usage, "".join(answer), ticket.caller)
        except StreamError as e:  # after output, every failure ends the stream as an event
            outcome = "failed"
            if isinstance(e, BackendFailed):
                self.runtime.mark_failed(cand.tier, e.message)
            log.warning("tier %s failed mid-stream: %s", cand.tier, e.message)
            yield encode(envelope(e))
        except BaseException:
            outcome = "cancelled"
            raise
        finally:
            await stream.aclose()
            # What was generated is paid for, whether or not the client stayed to read it.
            ticket.close(outcome)


def _collect(batch: list[Chunk], answer: list[str]) -> None:
    for chunk in batch:
        for choice in chunk.data.get("choices") or ():
            if choice.get("index", 0) == 0:
                text = (choice.get("delta") or {}).get("content")
                if isinstance(text, str):
                    answer.append(text)


def _answer_of(result: dict) -> str:
    try:
        text = result["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return ""
    return text if isinstance(text, str) else ""


def _wants_full_context(req: ChatCompletionRequest, request: Request) -> bool:
    header = request.headers.get("x-stream-full-context", "")
    return req.full_context is True or header.strip().lower() in ("1", "true", "yes", "on")


def _usage_in(batch: list[Chunk]) -> dict | None:
    for chunk in batch:
        usage = chunk.data.get("usage")
        if usage:
            return usage
    return None


def _explain(headers: dict[str, str], route: Route) -> None:
    """Why the request went where it did, in response headers (never in the SSE stream,
    which standard clients must be able to parse)."""
    headers["x-stream-complexity"] = route.complexity or "none"
    headers["x-stream-route-reason"] = route.reason
    j = route.judgement
    if j is not None:
        headers["x-stream-judge"] = j.judge
        headers["x-stream-judge-confidence"] = f"{j.confidence:.3f}"
        headers["x-stream-judge-ms"] = f"{j.latency_ms:.3f}"


def _only_waiting(batch: list[Chunk]) -> bool:
    """Nothing but waiting notes: no output yet, for time to first token and gaps."""
    return all(is_waiting_note(chunk) for chunk in batch)


def _for_client(batch: list[Chunk], chunk_id: str, include_usage: bool) -> bytes:
    """Backend chunks as one SSE write for the client: our id, and no usage unless asked."""
    out = []
    for chunk in batch:
        data = chunk.data
        if is_waiting_note(chunk):
            out.append(b": " + str(data[WAITING]).replace("\n", " ").encode() + b"\n\n")
            continue
        if not include_usage and not data.get("choices") and data.get("usage") is not None:
            continue  # the usage chunk we asked for on our own account
        out.append(b"data: " + _rewrite(chunk, chunk_id, include_usage).encode() + b"\n\n")
    return b"".join(out)


def _rewrite(chunk: Chunk, chunk_id: str, include_usage: bool) -> str:
    """The chunk's JSON with our id (and without `usage: null` if the client did not ask for
    usage), patched into the backend's own text when it has the usual compact form, which
    saves encoding every chunk again; re-encoded otherwise."""
    data, text = chunk.data, chunk.raw
    backend_id = data.get("id")
    if isinstance(backend_id, str):
        needle = f'"id":"{backend_id}"'
        if needle in text:
            text = text.replace(needle, f'"id":"{chunk_id}"', 1)
            if include_usage or "usage" not in data:
                return text
            if data["usage"] is None and ',"usage":null' in text:
                return text.replace(',"usage":null', "", 1)
    data = dict(data)
    data["id"] = chunk_id
    if not include_usage:
        data.pop("usage", None)
    return encode(data)[len(b"data: ") : -2].decode()
