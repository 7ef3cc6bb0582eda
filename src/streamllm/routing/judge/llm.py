"""A judge that asks a language model (by default the local tier's) for the label.

The model must answer with exactly one label; anything else, a timeout or a backend failure
counts as a failed judgement, and the classifier's judgement is used instead (and says so).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

from streamllm.errors import StreamError
from streamllm.routing.judge.base import Judgement, one_hot
from streamllm.routing.judge.classifier import ClassifierJudge

# Sends a chat completion body (non-streaming) to the judging model, returns the response.
Complete = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]

INSTRUCTIONS = (
    "You decide how much work it takes to answer a user's message well. "
    "Answer with exactly one word: LOW, MEDIUM or HIGH.\n"
    "LOW: one fact, a definition, a yes/no fact, a conversion, or small talk.\n"
    "MEDIUM: a known method applied in a few steps: a standard exercise, a short piece of code, "
    "explaining a known idea, comparing well-known options, summarising or rewriting given text.\n"
    "HIGH: something new built in many dependent steps: a derivation or proof that is not a "
    "textbook exercise, a design with trade-offs, a synthesis or critical argument across "
    "positions, an original plan, long careful writing.\n"
    "Judge the work the answer takes, not the length or tone of the message."
)
TEXT_LIMIT = 2000  # characters of the message shown to the judge
CONTEXT_LIMIT = 300  # characters of each earlier turn

_LABEL = re.compile(r"\s*(LOW|MEDIUM|HIGH)\.?\s*")


class UnreadableLabel(ValueError):
    pass


def parse_label(reply: Any) -> str:
    """The label in a chat completion response, or UnreadableLabel."""
    try:
        content = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise UnreadableLabel("the response has no message content") from None
    if not isinstance(content, str):
        raise UnreadableLabel("the message content is not text")
    found = _LABEL.fullmatch(content.upper())
    if not found:
        raise UnreadableLabel(f"expected one label, got {len(content)} characters of other text")
    return found.group(1)


def judge_request(model: str, text: str, context: Sequence[str]) -> dict[str, Any]:
    shown = text if len(text) <= TEXT_LIMIT else text[:TEXT_LIMIT] + " [...]"
    parts = []
    if context:
        parts.append("Earlier in the conversation (for reference only):\n" + "\n".join(
            f"- {turn[:CONTEXT_LIMIT]}" for turn in context))
    parts.append(f"Message to rate:\n<<<\n{shown}\n>>>\nLabel:")
    return {
        "model": model,
        "messages": [{"role": "system", "content": INSTRUCTIONS},
                     {"role": "user", "content": "\n\n".join(parts)}],
        "temperature": 0,
        "max_tokens": 4,
        "stream": False,
    }


class LLMJudge:
    name = "llm"

    def __init__(self, complete: Complete, model: str, fallback: ClassifierJudge,
                 timeout_s: float = 2.0):
        self.complete = complete
        self.model = model
        self.fallback = fallback
        self.timeout_s = timeout_s
        self.failures = 0  # judgements that fell back, for /metrics and tests

    async def ask(self, text: str, context: Sequence[str]) -> str:
        reply = await asyncio.wait_for(
            self.complete(judge_request(self.model, text, context)), self.timeout_s)
        return parse_label(reply)

    async def judge(self, text: str, context: Sequence[str] = (),
                    fallback: Judgement | None = None) -> Judgement:
        start = time.perf_counter()
        try:
            label = await self.ask(text, context)
        except (TimeoutError, StreamError, UnreadableLabel):
            self.failures += 1
            backup = fallback or self.fallback.classify(text, context)
            return replace(backup, judge=f"{self.name}->{backup.judge}",
                           latency_ms=(time.perf_counter() - start) * 1000)
        # A language model's one word carries no probabilities: it is certain, as far as the
        # router can tell.
        return Judgement(label, one_hot(label), (time.perf_counter() - start) * 1000, self.name)
