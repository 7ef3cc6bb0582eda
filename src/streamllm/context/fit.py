"""Fitting a conversation into one tier's window (pure: the caller fetches and writes summaries).

A conversation is its system messages, kept word for word, and its turns. When it does not fit,
the oldest turns are replaced by a rolling summary and the recent ones stay word for word. The
boundary between the two moves in blocks: when turns must age, enough of them age at once that
the recent part fills only `verbatim_share` of the window, so the next several turns fit without
summarising again, and each summary extends the previous one with just the newly aged turns.
Summaries are identified by a hash of the exact messages they replace, chained turn by turn.

    plan = plan_fit(messages, counter, window, reserve, cached, params, prefix_hashes(turns))
    # the caller summarises turns[plan.base:plan.boundary] onto cached[plan.base] if needed
    fitted = assemble(plan, summary_text, counter)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from streamllm.context.tokens import TokenCounter

Message = Mapping[str, Any]
SYSTEM_ROLES = ("system", "developer")
SUMMARY_HEADER = "Summary of the earlier conversation ({n} messages):\n"


def prefix_hashes(turns: Sequence[Message], owner: str | None = None) -> list[str]:
    """hashes[k] identifies turns[:k] exactly (hashes[0] is the empty prefix), for one owner:
    two API keys never share a summary, so neither can learn what the other asked."""
    h = hashlib.sha256(b"stream-context-v1\x00" + (owner or "").encode() + b"\x00")
    out = [h.hexdigest()]
    for message in turns:
        h.update(json.dumps(message, sort_keys=True, separators=(",", ":"),
                            ensure_ascii=False).encode())
        h.update(b"\x00")
        out.append(h.copy().hexdigest())
    return out


@dataclass(frozen=True)
class FitParams:
    verbatim_share: float = 0.5
    summary_tokens: int = 1024  # most a summary may take


@dataclass
class FitPlan:
    head: list[Message]  # system messages, word for word, first
    turns: list[Message]  # everything else, in order
    budget: int  # what the prompt may take: window minus reserved output and the margin
    action: str  # full | summarized | impossible
    tokens_before: int
    boundary: int = 0  # turns[:boundary] are replaced by the summary
    base: int = 0  # turns[:base] are covered by the cached summary being reused or extended
    hashes: list[str] = field(default_factory=list)

    @property
    def needs_summary(self) -> bool:
        return self.boundary > self.base

    @property
    def summary_hash(self) -> str:
        return self.hashes[self.boundary]


@dataclass(frozen=True)
class Fitted:
    messages: list[Message]
    action: str  # full | summarized | trimmed
    tokens_before: int
    tokens_after: int
    trimmed: int = 0  # recent turns dropped after summarising was not enough


def split(messages: Sequence[Message]) -> tuple[list[Message], list[Message]]:
    head = [m for m in messages if m.get("role") in SYSTEM_ROLES]
    turns = [m for m in messages if m.get("role") not in SYSTEM_ROLES]
    return head, turns


def budget_for(window: int, reserve: int, counter: TokenCounter) -> int:
    return int((window - reserve) * (1.0 - counter.margin))


def _boundaries(turns: Sequence[Message]) -> list[int]:
    """Where the word-for-word part may start: at a user turn (never inside a tool exchange),
    after at least one turn, and never after the latest user turn."""
    users = [i for i, m in enumerate(turns) if m.get("role") == "user"]
    if not users:
        return []
    return [i for i in users if 0 < i <= users[-1]]


def minimum_tokens(messages: Sequence[Message], counter: TokenCounter) -> int:
    """What no summary can remove: the system messages, the latest user turn and whatever
    follows it (an agent's tool calls and their results are part of the turn)."""
    head, turns = split(messages)
    users = [i for i, m in enumerate(turns) if m.get("role") == "user"]
    return counter.count([*head, *turns[users[-1]:]] if users else [*head, *turns])


def plan_fit(messages: Sequence[Message], counter: TokenCounter, window: int, reserve: int,
             cached: Mapping[int, int], params: FitParams, hashes: list[str]) -> FitPlan:
    """Decide what to keep. `cached` maps a boundary (turns summarised) to the tokens of the
    stored summary for it, for this conversation and tier; `hashes` are the turns' prefix
    hashes."""
    head, turns = split(messages)
    budget = budget_for(window, reserve, counter)
    before = counter.count(messages)
    plan = FitPlan(head, turns, budget, "full", before, hashes=hashes)
    if before <= budget:
        return plan
    options = _boundaries(turns)
    if not options:
        plan.action = "impossible"
        return plan
    head_tokens = counter.count(head) if head else 0
    summary_cap = params.summary_tokens

    def total(boundary: int, summary_tokens: int) -> int:
        return head_tokens + summary_tokens + counter.count(turns[boundary:]) + 8

    # The latest stored summary of this conversation, if it still leaves room: no new work.
    reusable = sorted((b for b in cached if b in options), reverse=True)
    base = reusable[0] if reusable else 0
    plan.action, plan.base = "summarized", base
    if base and total(base, cached[base]) <= budget:
        plan.boundary = base
        return plan
    # Age a block: the first boundary after which the recent turns fit in their share.
    target = int(budget * params.verbatim_share)
    later = [b for b in options if b > base]
    for boundary in later:
        if counter.count(turns[boundary:]) <= target and total(boundary, summary_cap) <= budget:
            plan.boundary = boundary
            return plan
    # Even the latest turns alone are large: keep as little word for word as possible.
    plan.boundary = later[-1] if later else base
    return plan


def summary_message(text: str, turns_summarized: int) -> dict[str, Any]:
    return {"role": "system",
            "content": SUMMARY_HEADER.format(n=turns_summarized) + text.strip()}


def assemble(plan: FitPlan, summary: str | None, counter: TokenCounter) -> Fitted | None:
    """The messages to send, guaranteed to fit the plan's budget by `counter`, or None when not
    even the system messages and the latest user turn do."""
    if plan.action == "full":
        return Fitted([*plan.head, *plan.turns], "full", plan.tokens_before, plan.tokens_before)
    if plan.action == "impossible":
        return None
    kept = list(plan.turns[plan.boundary:])
    middle = [summary_message(summary, plan.boundary)] if summary else []
    trimmed = 0
    while True:
        messages = [*plan.head, *middle, *kept]
        tokens = counter.count(messages)
        if tokens <= plan.budget:
            action = "trimmed" if trimmed else "summarized"
            return Fitted(messages, action, plan.tokens_before, tokens, trimmed)
        # Drop the oldest recent turn, and any tool results that belonged to it; the latest
        # user turn (and what follows it) always stays.
        latest = max(i for i, m in enumerate(kept) if m.get("role") == "user")
        if latest > 0:
            kept.pop(0)
            trimmed += 1
            while kept and kept[0].get("role") == "tool":
                kept.pop(0)
                trimmed += 1
        elif middle:
            middle = []  # the summary itself must go: the turn matters more
            trimmed += 1
        else:
            return None
