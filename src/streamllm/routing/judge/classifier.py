"""The default judge: the linear classifier shipped in the package (`classifier_model.json`).

It reads the latest user turn. A short follow-up that leans on the conversation ("and for the
second one?", "why?") says little on its own, so its probabilities are averaged with those of
the previous user turn; anything else is judged on its own words.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from streamllm.config import COMPLEXITIES
from streamllm.routing.judge.base import Judgement
from streamllm.routing.judge.linear import LinearModel

MODEL_RESOURCE = "classifier_model.json"

_FOLLOW_UP = re.compile(
    r"^\s*(and|also|but|then|now|so|what about|how about|same|why|how come|more|continue|"
    r"go on|elaborate|expand|again|the (first|second|third|last|other|above|previous)|"
    r"(do|can you do|what if) (it|that|this|the same))\b",
    re.IGNORECASE,
)
FOLLOW_UP_MAX_WORDS = 8


def default_model_path() -> Path:
    return Path(str(resources.files("streamllm.routing.judge").joinpath(MODEL_RESOURCE)))


@functools.lru_cache(maxsize=4)
def load_model(path: str | None = None) -> LinearModel:
    return LinearModel.load(Path(path) if path else default_model_path())


def is_follow_up(text: str) -> bool:
    return len(text.split()) <= FOLLOW_UP_MAX_WORDS and bool(_FOLLOW_UP.match(text))


class ClassifierJudge:
    name = "classifier"

    def __init__(self, model: LinearModel | None = None):
        self.model = model or load_model()

    def classify(self, text: str, context: Sequence[str] = ()) -> Judgement:
        start = time.perf_counter()
        probs = self.model.predict_proba(text)
        if context and is_follow_up(text):
            before = self.model.predict_proba(context[-1])
            probs = {k: (probs[k] + before[k]) / 2 for k in COMPLEXITIES}
        label = max(COMPLEXITIES, key=lambda k: probs[k])
        return Judgement(label, probs, (time.perf_counter() - start) * 1000, self.name)

    async def judge(self, text: str, context: Sequence[str] = ()) -> Judgement:
        # Tens of microseconds: cheaper inline than a hop to a thread.
        return self.classify(text, context)
