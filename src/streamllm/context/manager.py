"""Fitting requests to tiers at run time: summaries from the store or the summarizer, token
counts calibrated from what backends report, and summaries prepared ahead of need.

The pure decisions are in fit.py; this module does the waiting: it reads and writes the store,
asks the summarizing model (the local tier's, by default) and falls back to the extractive
summarizer when that model fails or is slow, and runs the look-ahead in the background.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from streamllm.config import ContextSettings
from streamllm.context.fit import (
    FitParams,
    FitPlan,
    Fitted,
    assemble,
    budget_for,
    minimum_tokens,
    plan_fit,
    prefix_hashes,
    split,
)
from streamllm.context.summarize import (
    SummaryFailed,
    extractive_summary,
    parse_summary,
    summary_request,
)
from streamllm.context.tokens import Calibration, TokenCounter
from streamllm.errors import StreamError
from streamllm.store import Store, SummaryRecord, TokenCalibration

log = logging.getLogger("streamllm.context")

Complete = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
CALIBRATION_SAVE_EVERY = 10  # observations between writes of a model's calibration
SUMMARY_PROMPT_TOKENS = 600  # the summarizer's instructions and framing (~1,900 characters)


@dataclass(frozen=True)
class Outcome:
    """What fitting did to one request for one tier."""

    fitted: Fitted
    summary_id: str | None = None  # "<tier>.<prefix hash>" of the summary used, if any
    summary_method: str | None = None  # model | extractive
    summarized_now: bool = False  # the client waited for a summary to be written
    summary_ms: float = 0.0  # how long it waited


class ContextManager:
    def __init__(self, settings: ContextSettings, store: Store | None,
                 summarizer: Complete | None = None, summarizer_model: str | None = None,
                 tokenizers: Mapping[str, Any] | None = None,
                 summarizer_window: int | None = None):
        self.settings = settings
        self.store = store
        self.summarizer = summarizer
        self.summarizer_model = summarizer_model
        self.summarizer_window = summarizer_window
        self.tokenizers = dict(tokenizers or {})  # model -> exact tokenizer
        self.counters: dict[str, TokenCounter] = {}
        self._unsaved: dict[str, int] = {}
        self._inflight: dict[tuple[str, str], asyncio.Task[SummaryRecord]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self.model_summaries = 0  # summaries the model wrote (for tests and metrics)
        self.extractive_summaries = 0

    async def start(self) -> None:
        if self.store is None:
            return
        for model, cal in (await self.store.calibrations()).items():
            self.counter(model).calibration = Calibration(
                cal.tokens_per_char, cal.tokens_per_message, cal.samples)

    async def aclose(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for model in [m for m, n in self._unsaved.items() if n]:
            await self._save_calibration(model)

    def counter(self, model: str) -> TokenCounter:
        found = self.counters.get(model)
        if found is None:
            found = self.counters[model] = TokenCounter(tokenizer=self.tokenizers.get(model))
        return found

    def reserve_for(self, window: int, requested: int | None) -> int:
        if requested:
            return requested
        return min(self.settings.reserve_output_tokens, window // 4)

    def minimum(self, messages: Sequence[Mapping[str, Any]], model: str) -> int:
        return minimum_tokens(messages, self.counter(model))

    # -- fitting -------------------------------------------------------------------------------
    async def fit(self, messages: Sequence[Mapping[str, Any]], tier: str, model: str,
                  window: int | None, requested_output: int | None,
                  owner: str | None) -> Outcome | None:
        """The request's messages fitted to the tier, or None if they cannot be."""
        counter = self.counter(model)
        if window is None:
            tokens = counter.count(messages)
            return Outcome(Fitted(list(messages), "full", tokens, tokens))
        reserve = self.reserve_for(window, requested_output)
        if not self.settings.summarize:
            tokens = counter.count(messages)
            if tokens > budget_for(window, reserve, counter):
                return None
            return Outcome(Fitted(list(messages), "full", tokens, tokens))
        plan, cached = await self._plan(messages, tier, model, window, reserve, owner)
        if plan.action != "summarized":
            fitted = assemble(plan, None, counter)
            return Outcome(fitted) if fitted else None
        record, now, waited = cached.get(plan.boundary), False, 0.0
        if record is None:
            started = time.perf_counter()
            record, now = await self._summary_for(plan, cached.get(plan.base), tier, model,
                                                  owner), True
            waited = (time.perf_counter() - started) * 1000
        fitted = assemble(plan, record.text, counter)
        if fitted is None:
            return None
        return Outcome(fitted, f"{tier}.{record.prefix_hash}", record.method, now, waited)

    async def _plan(self, messages: Sequence[Mapping[str, Any]], tier: str, model: str,
                    window: int, reserve: int,
                    owner: str | None) -> tuple[FitPlan, dict[int, SummaryRecord]]:
        _, turns = split(messages)
        hashes = prefix_hashes(turns, owner)
        cached: dict[int, SummaryRecord] = {}
        if self.store is not None and len(turns) > 1:
            found = await self.store.summaries_for(tier, hashes[1:])
            cached = {i: found[h] for i, h in enumerate(hashes) if h in found}
        counter = self.counter(model)
        params = FitParams(self.settings.verbatim_share,
                           self._cap(budget_for(window, reserve, counter)))
        plan = plan_fit(messages, counter, window, reserve,
                        {b: r.tokens for b, r in cached.items()}, params, hashes)
        return plan, cached


    async def _summary_for(self, plan: FitPlan, previous: SummaryRecord | None, tier: str,
                           model: str, owner: str | None) -> SummaryRecord:
        """The summary of turns[:boundary], written once even when requests race for it."""
        key = (tier, plan.summary_hash)
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._write_summary(plan, previous, tier, model, owner))
            self._inflight[key] = task
            task.add_done_callback(lambda _: self._inflight.pop(key, None))
        # A client that goes away does not abandon a summary others may need next turn.
        return await asyncio.shield(task)

    async def _write_summary(self, plan: FitPlan, previous: SummaryRecord | None, tier: str,
                             model: str, owner: str | None) -> SummaryRecord:
        started = time.perf_counter()
        turns = plan.turns[plan.base:plan.boundary]
        cap = self._cap(plan.budget)
        counter = self.counter(model)
        text, method = None, "model"
        if self.summarizer is not None and self.summarizer_model:
            try:
                text = await self._ask_model(previous.text if previous else None, turns, cap)
            except (TimeoutError, StreamError, SummaryFailed) as e:
                log.warning("summarizer failed (%s); using the extractive summary",
                            type(e).__name__)
        if text is None or counter.count_text(text) > cap:
            method = "extractive"
            max_chars = int(cap / max(counter.calibration.tokens_per_char, 0.05))
            text = extractive_summary(previous.text if previous else None, turns, max_chars)
            while text and counter.count_text(text) > cap:  # a tokenizer may count more
                max_chars = int(max_chars * 0.9)
                text = extractive_summary(previous.text if previous else None, turns, max_chars)
        text = text.replace("\x00", "")  # PostgreSQL's text cannot hold NUL
        if method == "model":
            self.model_summaries += 1
        else:
            self.extractive_summaries += 1
        record = SummaryRecord(
            tier=tier, prefix_hash=plan.summary_hash, turns=plan.boundary, text=text,
            tokens=counter.count_text(text), method=method, owner=owner,
            parent_hash=plan.hashes[plan.base] if plan.base else None, created_at=time.time())
        if self.store is not None:
            await self.store.put_summary(record)
        log.info("summary of %d messages for tier %s (%s, %d aged) in %.0f ms", plan.boundary,
                 tier, method, len(turns), (time.perf_counter() - started) * 1000)
        return record

    async def _ask_model(self, previous: str | None, turns: Sequence[Mapping[str, Any]],
                         cap: int) -> str:
        """The model's summary of `previous` extended by `turns`. A block larger than the
        summarizing model's own window goes in parts, each extending the last; a single turn
        too large for it fails (and the extractive summary takes over)."""
        assert self.summarizer is not None and self.summarizer_model is not None
        counter = self.counter(self.summarizer_model)
        room = None
        if self.summarizer_window:
            # A small summarizing model also writes a shorter summary: its answer shares its
            # window with what it reads.
            cap = min(cap, self.summarizer_window // 4)
            room = budget_for(self.summarizer_window, cap, counter) - SUMMARY_PROMPT_TOKENS
        deadline = asyncio.get_running_loop().time() + self.settings.summarizer.timeout_s
        text, start = previous, 0
        while start < len(turns):
            end = len(turns)
            if room is not None:
                base = counter.count_text(text or "")
                end = start
                while end < len(turns) and base + counter.count(turns[start:end + 1]) <= room:
                    end += 1
                if end == start:
                    raise SummaryFailed("a turn is larger than the summarizing model's window")
            reply = await asyncio.wait_for(
                self.summarizer(summary_request(self.summarizer_model, text,
                                                turns[start:end], cap)),
                max(deadline - asyncio.get_running_loop().time(), 0.001))
            text, start = parse_summary(reply), end
        if text is None:
            raise SummaryFailed("nothing to summarise")
        return text

    def _cap(self, budget: int) -> int:
        """The most tokens a summary may take in a prompt budget of `budget`."""
        return max(64, min(self.settings.summary_max_tokens,
                           int(budget * self.settings.summary_share)))

    # -- after the response ----------------------------------------------------------------------
    def observe(self, model: str, messages: Sequence[Mapping[str, Any]],
                prompt_tokens: int | None) -> None:
        if not prompt_tokens or not self.counter(model).observe(messages, prompt_tokens):
            return
        self._unsaved[model] = self._unsaved.get(model, 0) + 1
        if self.store is not None and self._unsaved[model] >= CALIBRATION_SAVE_EVERY:
            self._in_background(self._save_calibration(model))

    async def _save_calibration(self, model: str) -> None:
        if self.store is None:
            return
        self._unsaved[model] = 0
        cal = self.counter(model).calibration
        await self.store.put_calibration(TokenCalibration(
            model, cal.tokens_per_char, cal.tokens_per_message, cal.samples, time.time()))

    def prepare_ahead(self, messages: Sequence[Mapping[str, Any]], tier: str, model: str,
                      window: int | None, requested_output: int | None,
                      owner: str | None) -> bool:
        """When the conversation (with its new answer) fills `prepare_at` of the tier's window,
        write the summary its next turn will need now, in the background. The next user turn
        is assumed to be as long as the last one."""
        if window is None or not (self.settings.summarize and self.settings.prepare_ahead):
            return False
        counter = self.counter(model)
        reserve = self.reserve_for(window, requested_output)
        if counter.count(messages) < self.settings.prepare_at * (window - reserve):
            return False
        _, turns = split(messages)
        users = [m for m in turns if m.get("role") == "user"]
        if not users:
            return False
        nxt = [*messages, {"role": "user", "content": users[-1].get("content") or ""}]

        async def prepare() -> None:
            plan, cached = await self._plan(nxt, tier, model, window, reserve, owner)
            if plan.action == "summarized" and plan.boundary not in cached:
                await self._summary_for(plan, cached.get(plan.base), tier, model, owner)

        self._in_background(prepare())
        return True

    def _in_background(self, work: Awaitable[Any]) -> None:
        async def guarded() -> None:
            try:
                await work
            except asyncio.CancelledError:
                raise
            except Exception:  # look-ahead work must never hurt a request
                log.exception("background context work failed")

        task = asyncio.create_task(guarded())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def idle(self) -> None:
        """Wait until background work is done (tests, shutdown)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    async def summary(self, summary_id: str, owner: str | None) -> SummaryRecord | None:
        tier, _, prefix = summary_id.partition(".")
        if self.store is None or not prefix:
            return None
        record = await self.store.summary(tier, prefix)
        return record if record is not None and record.owner == owner else None
