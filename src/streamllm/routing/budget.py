"""Cloud spend and how it tightens routing (pure: the gateway records, the policy reads).

As spend approaches a budget, the P(HIGH) a query needs before `auto` sends it to the cloud
rises smoothly from the configured threshold to beyond 1 (nothing more goes there by the
judge's choice). Until the usage ledger of the multi-user store exists, spend is counted in
this process only, per budget holder (an API key's name, or "*" for everyone together).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from streamllm.config import Price

EVERYONE = "*"


def cost_usd(usage: Mapping[str, Any] | None, price: Price | None) -> float:
    """What a response cost: the provider's own figure when it reports one (OpenRouter puts it
    in `usage.cost`), else tokens times the configured price."""
    if not usage:
        return 0.0
    reported = usage.get("cost")
    if isinstance(reported, (int, float)) and not isinstance(reported, bool) and reported >= 0:
        return float(reported)
    if price is None:
        return 0.0
    prompt = usage.get("prompt_tokens") or 0
    completion = usage.get("completion_tokens") or 0
    return (prompt * price.input_per_mtok + completion * price.output_per_mtok) / 1_000_000


def effective_high_threshold(base: float, spent: float, budget: float | None,
                             soft_start: float) -> float:
    """The P(HIGH) needed for the cloud after `spent` of `budget`: `base` until `soft_start`
    of the budget is used, then a smooth rise that passes 1 when the budget is used up."""
    if budget is None or budget <= 0:
        return base
    used = spent / budget
    x = min(max((used - soft_start) / (1.0 - soft_start), 0.0), 1.0)
    smooth = x * x * (3 - 2 * x)
    return base + (1.0 + 1e-9 - base) * smooth


class SpendLedger:
    """Per-process spend by holder. Not persisted: a restart starts from zero (documented)."""

    def __init__(self) -> None:
        self._spent: dict[str, float] = defaultdict(float)

    def add(self, holder: str | None, usd: float) -> None:
        if usd <= 0:
            return
        self._spent[EVERYONE] += usd
        if holder and holder != EVERYONE:
            self._spent[holder] += usd

    def spent(self, holder: str | None = None) -> float:
        return self._spent.get(holder or EVERYONE, 0.0)
