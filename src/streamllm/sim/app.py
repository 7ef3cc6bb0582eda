"""The simulated OpenAI-compatible server: an ASGI app with timing, windows, faults and a log.

It stands in only for model weights: HTTP, SSE framing, usage, errors and timing behave like
vLLM's OpenAI server so that everything in front of it is exercised for real.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from streamllm.config import SimModelSettings, SimSettings
from streamllm.protocol.chat import ChatCompletionRequest
from streamllm.sim import content


class SimulatedDisconnect(Exception):
    """Raised inside the response body to drop the connection mid-stream, as a crashed server."""


@dataclass
class LoggedRequest:
    """One request as the simulated backend saw it; tests read these to prove what arrived."""

    id: int
    model: str
    body: dict[str, Any]
    stream: bool
    received_at: float
    status: int = 200
    outcome: str = "running"  # running | completed | cancelled | error | disconnected
    tokens_sent: int = 0
    finished_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


@dataclass
class ChoicePlan:
    index: int
    tokens: list[str]
    finish_reason: str
    tool_call: dict[str, Any] | None = None


@dataclass
class Plan:
    model: str
    prompt_tokens: int
    choices: list[ChoicePlan]

    @property
    def completion_tokens(self) -> int:
        return sum(
            len(c.tokens) + (content.count_tokens(c.tool_call["arguments"]) if c.tool_call else 0)
            for c in self.choices
        )

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


def _error(status: int, message: str, type_: str, code: Any = None, param: str | None = None):
    return JSONResponse(
        {"error": {"message": message, "type": type_, "param": param, "code": code}},
        status_code=status,
    )


def plan_answer(req: ChatCompletionRequest, body: dict[str, Any], spec: SimModelSettings) -> Plan:
    """Decide tokens, finish reasons and tool calls for a request (pure: no clock, no I/O)."""
    messages = body["messages"]
    prompt = content.prompt_tokens(messages, body.get("tools"))
    limit = req.max_tokens
    if spec.honours_max_completion_tokens and req.max_completion_tokens:
        limit = req.max_completion_tokens
    room = spec.context_window - prompt
    choices = []
    for index in range(req.n or 1):
        want = spec.answer_tokens
        finish = "stop"
        if limit is not None and limit < want:
            want, finish = limit, "length"
        if room < want:
            want, finish = max(room, 0), "length"
        tool_call = None
        forced = req.tool_choice == "required" or not isinstance(req.tool_choice, (str, type(None)))
        if req.tools and forced:
            name = (
                req.tool_choice.function.name  # type: ignore[union-attr]
                if not isinstance(req.tool_choice, str)
                else req.tools[0].function.name
            )
            words = content.answer_tokens(req.model, messages, 3, index, req.seed)
            tool_call = {
                "id": f"call_{index}_{abs(hash(tuple(words))) % 10**8:08d}",
                "name": name,
                "arguments": json.dumps({"query": "".join(words).strip()}),
            }
            choices.append(ChoicePlan(index, [], "tool_calls", tool_call))
            continue
        if spec.reply is not None:
            tokens = content.split_reply(spec.reply)[:want]
        else:
            tokens = content.answer_tokens(req.model, messages, want, index, req.seed)
        tokens, stopped = content.apply_stop(tokens, req.stop)
        if stopped:
            finish = "stop"
        if req.response_format is not None and req.response_format.type != "text":
            text = json.dumps({"answer": "".join(tokens)})
            tokens = [text[i : i + 6] for i in range(0, len(text), 6)]
        choices.append(ChoicePlan(index, tokens, finish))
    return Plan(model=req.model, prompt_tokens=prompt, choices=choices)


async def _client_gone(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _logprobs(tokens: list[str], top: int | None) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": t,
                "logprob": -0.25,
                "bytes": list(t.encode()),
                "top_logprobs": [
                    {"token": t, "logprob": -0.25, "bytes": list(t.encode())}
                ][: top or 0],
            }
            for t in tokens
        ]
    }


class Simulator:
    """Holds the simulator's settings (mutable by tests at run time), fault dice and log."""

    def __init__(self, settings: SimSettings | None = None, log_size: int = 10_000):
        self.settings = settings or SimSettings()
        self.log: deque[LoggedRequest] = deque(maxlen=log_size)
        self._ids = itertools.count(1)
        self._dice = random.Random(self.settings.seed)
        # Tests wait on this (not on sleeps) for a request to reach a given outcome.
        self._changed = threading.Condition()
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
                Route("/sim/requests", self.requests, methods=["GET", "DELETE"]),
            ]
        )

    # -- helpers tests use in process ------------------------------------------------------
    def requests_for(self, model: str | None = None) -> list[LoggedRequest]:
        return [r for r in self.log if model is None or r.model == model]

    def set_model(self, name: str, spec: SimModelSettings) -> None:
        self.settings.models[name] = spec

    def wait_until(self, predicate, timeout: float = 10.0) -> bool:
        """Block until `predicate(log)` holds (re-checked on every request start and end)."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(list(self.log)), timeout)

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    # -- routes ------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> Response:
        data = [
            {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": "simulator",
                "max_model_len": spec.context_window,
            }
            for name, spec in self.settings.models.items()
        ]
        return JSONResponse({"object": "list", "data": data})

    async def requests(self, request: Request) -> Response:
        if request.method == "DELETE":
            self.log.clear()
            return Response(status_code=204)
        return JSONResponse([r.as_dict() for r in self.log])

    async def chat(self, request: Request) -> Response:
        try:
            return await self._chat(request)
        finally:
            self._notify()

    async def _chat(self, request: Request) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw)
            req = ChatCompletionRequest.model_validate(body)
        except (ValueError, ValidationError) as e:
            return _error(400, f"invalid request: {e}", "BadRequestError", 400)
        entry = LoggedRequest(
            id=next(self._ids),
            model=req.model,
            body=body,
            stream=bool(req.stream),
            received_at=time.monotonic(),
        )
        self.log.append(entry)
        self._notify()
        spec = self.settings.models.get(req.model)
        if spec is None:
            entry.status, entry.outcome = 404, "error"
            entry.finished_at = entry.received_at
            return _error(404, f"The model `{req.model}` does not exist.", "NotFoundError", 404)
        draw = self._dice.random()
        if draw < spec.error_rate:
            entry.status, entry.outcome = 500, "error"
            entry.finished_at = entry.received_at
            return _error(500, "simulated internal server error", "InternalServerError", 500)
        if draw < spec.error_rate + spec.rate_limit_rate:
            entry.status, entry.outcome = 429, "error"
            entry.finished_at = entry.received_at
            resp = _error(429, "simulated rate limit", "RateLimitError", 429)
            resp.headers["retry-after"] = "1"
            return resp
        plan = plan_answer(req, body, spec)
        requested = req.max_tokens or 0
        if spec.honours_max_completion_tokens and req.max_completion_tokens:
            requested = req.max_completion_tokens
        if plan.prompt_tokens >= spec.context_window or plan.prompt_tokens + requested > (
            spec.context_window
        ):
            entry.status, entry.outcome = 400, "error"
            entry.finished_at = entry.received_at
            msg = content.context_error_message(spec.context_window, plan.prompt_tokens, requested)
            return _error(400, msg, "BadRequestError", 400, "messages")
        if req.stream:
            return StreamingResponse(
                self._stream(entry, req, plan, spec),
                media_type="text/event-stream",
                headers={"cache-control": "no-cache"},
            )
        return await self._complete(request, entry, req, plan, spec)

    async def _pace(self, start: float, spec: SimModelSettings, emitted: int,
                    prompt_tokens: int = 0) -> None:
        """Sleep until token number `emitted` is due under the model's TTFT, prefill and
        generation rates."""
        due = start + spec.ttft_ms / 1000.0
        if spec.prefill_tokens_per_s > 0:
            due += prompt_tokens / spec.prefill_tokens_per_s
        if spec.tokens_per_s > 0:
            due += emitted / spec.tokens_per_s
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    async def _complete(self, request: Request, entry, req, plan: Plan, spec) -> Response:
        start = time.monotonic()
        total = max((len(c.tokens) for c in plan.choices), default=0)
        # Generating, like a real server, stops when the client goes away.
        generating = asyncio.ensure_future(
            self._pace(start, spec, max(total - 1, 0), plan.prompt_tokens))
        leaving = asyncio.ensure_future(_client_gone(request))
        await asyncio.wait((generating, leaving), return_when=asyncio.FIRST_COMPLETED)
        leaving.cancel()
        if not generating.done():
            generating.cancel()
            entry.outcome, entry.finished_at = "cancelled", time.monotonic()
            return Response(status_code=499)
        choices = []
        for c in plan.choices:
            message: dict[str, Any] = {"role": "assistant", "content": "".join(c.tokens)}
            if c.tool_call:
                message["content"] = None
                message["tool_calls"] = [
                    {
                        "id": c.tool_call["id"],
                        "type": "function",
                        "function": {
                            "name": c.tool_call["name"],
                            "arguments": c.tool_call["arguments"],
                        },
                    }
                ]
            choice: dict[str, Any] = {
                "index": c.index,
                "message": message,
                "finish_reason": c.finish_reason,
                "logprobs": _logprobs(c.tokens, req.top_logprobs) if req.logprobs else None,
            }
            choices.append(choice)
        entry.tokens_sent = plan.completion_tokens
        entry.outcome, entry.finished_at = "completed", time.monotonic()
        return JSONResponse(
            {
                "id": f"chatcmpl-sim{entry.id}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": plan.model,
                "choices": choices,
                "usage": plan.usage(),
            }
        )

    async def _stream(self, entry: LoggedRequest, req, plan: Plan, spec: SimModelSettings):
        start = time.monotonic()
        cid, created = f"chatcmpl-sim{entry.id}", int(time.time())
        with_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
            obj: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": plan.model,
                "choices": choices,
            }
            if with_usage:
                obj["usage"] = usage
            return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"

        try:
            yield chunk(
                [
                    {"index": c.index, "delta": {"role": "assistant", "content": ""},
                     "logprobs": None, "finish_reason": None}
                    for c in plan.choices
                ]
            )
            for c in plan.choices:
                if c.tool_call:
                    yield chunk([{
                        "index": c.index,
                        "delta": {"tool_calls": [{
                            "index": 0, "id": c.tool_call["id"], "type": "function",
                            "function": {"name": c.tool_call["name"], "arguments": ""},
                        }]},
                        "logprobs": None, "finish_reason": None,
                    }])
                    args = c.tool_call["arguments"]
                    for i in range(0, len(args), 8):
                        yield chunk([{
                            "index": c.index,
                            "delta": {"tool_calls": [{
                                "index": 0, "function": {"arguments": args[i : i + 8]}}]},
                            "logprobs": None, "finish_reason": None,
                        }])
            longest = max((len(c.tokens) for c in plan.choices), default=0)
            for step in range(longest):
                if spec.disconnect_after is not None and entry.tokens_sent >= spec.disconnect_after:
                    entry.outcome = "disconnected"
                    raise SimulatedDisconnect(f"after {entry.tokens_sent} tokens")
                if spec.stall_after is not None and entry.tokens_sent == spec.stall_after:
                    await asyncio.sleep(spec.stall_s)
                await self._pace(start, spec, step, plan.prompt_tokens)
                parts = []
                for c in plan.choices:
                    if step < len(c.tokens):
                        tok = c.tokens[step]
                        parts.append({
                            "index": c.index, "delta": {"content": tok},
                            "logprobs": _logprobs([tok], req.top_logprobs) if req.logprobs else None,
                            "finish_reason": None,
                        })
                entry.tokens_sent += 1
                yield chunk(parts)
            yield chunk([
                {"index": c.index, "delta": {}, "logprobs": None, "finish_reason": c.finish_reason}
                for c in plan.choices
            ])
            if with_usage:
                yield chunk([], plan.usage())
            yield b"data: [DONE]\n\n"
            entry.outcome = "completed"
        except (asyncio.CancelledError, GeneratorExit):
            if entry.outcome == "running":
                entry.outcome = "cancelled"
            raise
        finally:
            entry.finished_at = time.monotonic()
            self._notify()
