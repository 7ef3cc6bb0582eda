"""The classifier's model: a multinomial logistic regression over sparse binary features.

Stored as JSON inside the package (`classifier_model.json`), written by `streamllm judge train`.
Scoring a query is a few hundred dictionary lookups, well under a millisecond in CPython.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamllm.config import COMPLEXITIES
from streamllm.routing.judge.features import extract

FORMAT_VERSION = 1


def softmax(scores: Sequence[float]) -> list[float]:
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]
    total = sum(exps)
    return [e / total for e in exps]


@dataclass
class LinearModel:
    weights: dict[str, list[float]]
    bias: list[float]
    labels: tuple[str, ...] = COMPLEXITIES
    temperature: float = 1.0  # fitted on held-back training data so probabilities are honest
    meta: dict[str, Any] = field(default_factory=dict)

    def scores(self, feats: Sequence[str]) -> list[float]:
        # Each present feature counts 1/sqrt(n): long and short queries get vectors of the same
        # length, so length alone does not push the scores (the #len features say it instead).
        scale = 1.0 / math.sqrt(len(feats)) if feats else 0.0
        out = list(self.bias)
        weights = self.weights
        for f in feats:
            w = weights.get(f)
            if w is not None:
                out[0] += w[0] * scale
                out[1] += w[1] * scale
                out[2] += w[2] * scale
        return out

    def predict_proba(self, text: str) -> dict[str, float]:
        raw = self.scores(extract(text))
        probs = softmax([s / self.temperature for s in raw])
        return dict(zip(self.labels, probs))

    def to_json(self) -> str:
        doc = {
            "format": FORMAT_VERSION,
            "labels": list(self.labels),
            "temperature": round(self.temperature, 4),
            "bias": [round(b, 5) for b in self.bias],
            "meta": self.meta,
            "weights": {f: [round(x, 5) for x in w] for f, w in sorted(self.weights.items())},
        }
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> LinearModel:
        doc = json.loads(text)
        if doc.get("format") != FORMAT_VERSION:
            raise ValueError(f"unsupported classifier model format {doc.get('format')!r}")
        if tuple(doc["labels"]) != COMPLEXITIES:
            raise ValueError(f"classifier model labels {doc['labels']} are not {COMPLEXITIES}")
        return cls(weights=doc["weights"], bias=doc["bias"], labels=tuple(doc["labels"]),
                   temperature=doc["temperature"], meta=doc.get("meta", {}))

    @classmethod
    def load(cls, path: Path) -> LinearModel:
        return cls.from_json(path.read_text(encoding="utf-8"))
