"""The classifier first, and the language model only when the classifier is unsure."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace

from streamllm.routing.judge.base import Judgement
from streamllm.routing.judge.classifier import ClassifierJudge
from streamllm.routing.judge.llm import LLMJudge


class CascadeJudge:
    name = "cascade"

    def __init__(self, classifier: ClassifierJudge, llm: LLMJudge, threshold: float = 0.6):
        self.classifier = classifier
        self.llm = llm
        self.threshold = threshold  # classifier confidence below which the LLM is asked

    async def judge(self, text: str, context: Sequence[str] = ()) -> Judgement:
        start = time.perf_counter()
        first = self.classifier.classify(text, context)
        if first.confidence >= self.threshold:
            return replace(first, judge=f"{self.name}:{first.judge}")
        second = await self.llm.judge(text, context, fallback=first)
        return replace(second, judge=f"{self.name}:{second.judge}",
                       latency_ms=(time.perf_counter() - start) * 1000)
