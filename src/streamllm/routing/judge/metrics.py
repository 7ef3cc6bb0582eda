"""Scores of a judge against labelled queries, as `streamllm judge eval` prints them (pure)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from streamllm.config import COMPLEXITIES


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (the value below which q% of samples fall)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def evaluate(truth: Sequence[str], predicted: Sequence[str],
             latencies_ms: Sequence[float] = ()) -> dict[str, Any]:
    if len(truth) != len(predicted):
        raise ValueError("truth and predictions differ in length")
    index = {label: i for i, label in enumerate(COMPLEXITIES)}
    matrix = [[0] * 3 for _ in range(3)]
    for t, p in zip(truth, predicted):
        matrix[index[t]][index[p]] += 1
    n = len(truth)
    per_class: dict[str, dict[str, float]] = {}
    for label, i in index.items():
        tp = matrix[i][i]
        predicted_i = sum(matrix[r][i] for r in range(3))
        actual_i = sum(matrix[i])
        precision = tp / predicted_i if predicted_i else 0.0
        recall = tp / actual_i if actual_i else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": round(precision, 4), "recall": round(recall, 4),
                            "f1": round(f1, 4), "support": actual_i}
    present = [lb for lb in COMPLEXITIES if per_class[lb]["support"]]
    macro_f1 = sum(per_class[lb]["f1"] for lb in present) / len(present) if present else 0.0
    high = index["HIGH"]
    not_high = sum(sum(matrix[r]) for r in range(3) if r != high)
    leaked = sum(matrix[r][high] for r in range(3) if r != high)
    return {
        "n": n,
        "accuracy": round(sum(matrix[i][i] for i in range(3)) / n, 4) if n else 0.0,
        "macro_f1": round(macro_f1, 4),
        "per_class": per_class,
        "confusion_matrix": matrix,
        # Queries that did not need the cloud and did not go there: what the free tiers kept.
        "free_tier_retention_pct": round(100 * (not_high - leaked) / not_high, 2)
        if not_high else 100.0,
        "high_recall": per_class["HIGH"]["recall"],
        # Share of non-HIGH queries sent to the paid tier anyway.
        "cost_leak": round(leaked / not_high, 4) if not_high else 0.0,
        "latency_ms": {
            "p50": round(percentile(latencies_ms, 50), 4),
            "p95": round(percentile(latencies_ms, 95), 4),
            "p99": round(percentile(latencies_ms, 99), 4),
        } if latencies_ms else {"p50": None, "p95": None, "p99": None},
    }
