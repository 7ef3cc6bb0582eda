"""A small, documented rules-based complexity judge (docs/routing.md explains each rule).

It reads only the latest user turn. It is a placeholder for the trained classifier of a later
issue, so it is deliberately simple and transparent rather than clever.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from streamllm.config import Complexity

# Asking for a novel argument, design, derivation or synthesis: HIGH.
_HIGH_CUES = re.compile(
    r"\b(prove|proof|derive|derivation|design|architect|formali[sz]e|critique|"
    r"trade-?offs?|synthesi[sz]e|research (plan|proposal)|novel|rigorous(ly)?|"
    r"compare and contrast|in depth|step[- ]by[- ]step (plan|derivation)|optimi[sz]e .* (for|under))\b",
    re.I,
)
# Applying an established procedure in a few steps: MEDIUM.
_MEDIUM_CUES = re.compile(
    r"\b(explain|how (do|does|can|to|would)|why|calculate|compute|solve|convert|write|implement|"
    r"debug|fix|refactor|summari[sz]e|translate|compare|difference between|example|steps?)\b",
    re.I,
)
_CODE = re.compile(r"```|\bdef |\bclass |#include|;\s*$|\{\s*$", re.M)
_MATH = re.compile(r"[=∑∫√^]|\\frac|\\int|\d+\s*[-+*/]\s*\d+")


@dataclass(frozen=True)
class Judgement:
    label: Complexity
    probabilities: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    latency_ms: float = 0.0


class RulesJudge:
    """Scores cue words, length, code and maths; see docs/routing.md for the table."""

    name = "rules"

    def judge(self, text: str) -> Judgement:
        start = time.perf_counter()
        words = len(text.split())
        score = 0.0
        reasons = []
        high = len({m.group(0).lower() for m in _HIGH_CUES.finditer(text)})
        if high:
            # One cue is suggestive; several distinct ones ("derive ... design ... trade-offs")
            # mark a genuinely open-ended task.
            score += 2.0 + 0.75 * (min(high, 3) - 1)
            reasons.append("asks for a derivation, design or synthesis")
        if _MEDIUM_CUES.search(text):
            score += 1.0
            reasons.append("asks to apply a procedure")
        if _CODE.search(text):
            score += 1.0
            reasons.append("contains code")
        if _MATH.search(text):
            score += 0.5
            reasons.append("contains maths")
        if words > 150:
            score += 1.0
            reasons.append("long request")
        elif words > 60:
            score += 0.5
            reasons.append("detailed request")
        if text.count("?") > 2:
            score += 0.5
            reasons.append("several questions")
        label: Complexity = "HIGH" if score >= 2.5 else "MEDIUM" if score >= 1.0 else "LOW"
        # A rules judge has no calibrated probabilities; report a soft one-hot so callers that
        # read confidence see how far the score sits from the thresholds.
        margin = min(abs(score - 1.0), abs(score - 2.5))
        confidence = min(0.5 + margin / 3, 0.95)
        rest = (1 - confidence) / 2
        probs = {k: (confidence if k == label else rest) for k in ("LOW", "MEDIUM", "HIGH")}
        return Judgement(
            label=label,
            probabilities=probs,
            reason="; ".join(reasons) or "short factual or conversational turn",
            latency_ms=(time.perf_counter() - start) * 1000,
        )
