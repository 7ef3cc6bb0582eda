"""What every complexity judge returns, and the interface the router calls."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from streamllm.config import COMPLEXITIES, Complexity


@dataclass(frozen=True)
class Judgement:
    label: Complexity
    probabilities: dict[str, float] = field(default_factory=dict)
    latency_ms: float = 0.0
    judge: str = ""  # which judge decided: classifier, llm, llm->classifier, cascade:llm ...
    cached: bool = False

    @property
    def confidence(self) -> float:
        return self.probabilities.get(self.label, 0.0)

    def p(self, label: Complexity) -> float:
        return self.probabilities.get(label, 0.0)


def one_hot(label: Complexity) -> dict[str, float]:
    return {k: (1.0 if k == label else 0.0) for k in COMPLEXITIES}


class Judge(Protocol):
    """Rates how much work answering the latest user turn takes.

    `text` is the latest user turn; `context` holds a few earlier turns (oldest first), which a
    judge may use to read a follow-up such as "and the second one?".
    """

    name: str

    async def judge(self, text: str, context: Sequence[str] = ()) -> Judgement: ...
