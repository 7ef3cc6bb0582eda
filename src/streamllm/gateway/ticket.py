"""One chat request's accounting, from admission to its ledger row.

The handler tells the ticket what happened (routed, dispatched to a tier, first output, usage,
how it ended); `close` then writes the ledger row, settles the budget reservation, frees the
caller's concurrency slot, updates the metrics and stores the exchange in a web chat
conversation when the request named one. Closing twice does nothing, so every exit path may
close it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from streamllm.caller import Caller
from streamllm.gateway.accounting import Reservation
from streamllm.routing.policy import Route
from streamllm.store.usage import UsageRow

if TYPE_CHECKING:
    from streamllm.gateway.runtime import Runtime

log = logging.getLogger("streamllm.gateway")


@dataclass
class Ticket:
    runtime: Runtime
    request_id: str
    caller: Caller | None
    release: Callable[[], None]
    arrived: float = field(default_factory=time.perf_counter)
    started_at: float = field(default_factory=time.time)
    route: Route | None = None
    tier: str | None = None
    model: str | None = None
    fallbacks: int = 0
    first_output: float | None = None
    last_output: float | None = None
    usage: dict[str, Any] | None = None
    answer: list[str] = field(default_factory=list)
    reservation: Reservation | None = None
    conversation: str | None = None  # the web chat conversation this exchange belongs to
    user_text: str = ""
    prompt_estimate: int = 0  # what fitting counted for the prompt sent: used without usage
    closed: bool = False
    kept: bool = False  # the exchange is in its web chat conversation already

    def output(self) -> None:
        now = time.perf_counter()
        if self.first_output is None:
            self.first_output = now
            if self.tier:
                self.runtime.metrics.ttft.labels(self.tier).observe(now - self.arrived)
        elif self.tier:
            self.runtime.metrics.gap.labels(self.tier).observe(now - (self.last_output or now))
        self.last_output = now

    def counted_usage(self) -> dict[str, Any]:
        """The backend's usage; for a stream cut short, which has none, what was sent: the
        prompt as counted when it was fitted and one token per streamed delta."""
        usage = dict(self.usage or {})
        if usage.get("prompt_tokens") is None:
            usage["prompt_tokens"] = self.prompt_estimate
        if usage.get("completion_tokens") is None:
            usage["completion_tokens"] = len(self.answer)
        return usage

    async def keep(self, outcome: str) -> None:
        """Store the exchange in its web chat conversation (awaited before a stream's end, so
        a page reloaded right after the answer finds it)."""
        if self.kept or not self.conversation or not self.tier:
            return
        self.kept = True
        route = self.route
        usage = self.counted_usage()
        meta = {"request_id": self.request_id, "tier": self.tier, "model": self.model,
                "complexity": route.complexity if route else None,
                "confidence": route.judgement.confidence if route and route.judgement else None,
                "route_reason": route.reason if route else None,
                "ttft_ms": (self.first_output - self.arrived) * 1000
                if self.first_output else None,
                "duration_ms": (time.perf_counter() - self.arrived) * 1000,
                "prompt_tokens": usage["prompt_tokens"],
                "completion_tokens": usage["completion_tokens"],
                "cost_usd": self.runtime.cost(self.tier, self.model, usage),
                "fallbacks": self.fallbacks, "outcome": outcome}
        await self.runtime.remember(self.conversation, self.user_text, "".join(self.answer),
                                    meta)

    def close(self, outcome: str) -> None:
        """outcome: completed | failed | cancelled | rejected."""
        if self.closed:
            return
        self.closed = True
        runtime = self.runtime
        self.release()
        usage = self.counted_usage()
        cost = runtime.cost(self.tier, self.model, usage)
        if self.reservation is not None:
            runtime.accounts.settle(self.reservation)
        completion = usage["completion_tokens"]
        route = self.route
        row = UsageRow(
            request_id=self.request_id, caller=self.caller.name if self.caller else None,
            key_id=self.caller.key_id if self.caller else None, tier=self.tier,
            model=self.model, complexity=route.complexity if route else None,
            route_reason=(route.reason if route else None), fallbacks=self.fallbacks,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(completion), cost_usd=cost,
            ttft_ms=(self.first_output - self.arrived) * 1000 if self.first_output else None,
            duration_ms=(time.perf_counter() - self.arrived) * 1000, outcome=outcome,
            created_at=self.started_at)
        if runtime.settings.server.log_prompts:
            row.prompt_text = self.user_text
            row.answer_text = "".join(self.answer)
        runtime.accounts.record(row)
        metrics = runtime.metrics
        metrics.requests.labels(self.tier or "none", outcome).inc()
        if self.tier:
            metrics.tokens.labels(self.tier, "prompt").inc(row.prompt_tokens)
            metrics.tokens.labels(self.tier, "completion").inc(row.completion_tokens)
            if cost:
                metrics.cost.labels(self.tier).inc(cost)
        if not self.kept and self.conversation and self.tier and outcome != "rejected":
            runtime.in_background(self.keep(outcome))
        log.info("request %s caller=%s tier=%s model=%s outcome=%s", self.request_id,
                 row.caller or "-", self.tier or "-", self.model or "-", outcome)
