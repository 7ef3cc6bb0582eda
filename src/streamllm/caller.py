"""Who is calling and what they may do: the one shape every kind of credential turns into."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Caller:
    name: str  # whose usage, budget and conversations these are: a key's name, "oauth:<user>"
    key_id: str | None = None  # the stored key's id, when it is one
    admin: bool = False  # may see everyone's usage
    allow_tiers: frozenset[str] | None = None  # None: every tier
    allow_cloud: bool = True
    budget_usd: float | None = None  # per calendar month (UTC); None: no budget of its own
    rpm: int | None = None  # requests per minute; None: unlimited
    max_concurrent: int | None = None  # requests in flight at once; None: unlimited

    @property
    def holder(self) -> str:
        return self.name

    def may_use(self, tier: str) -> bool:
        if tier == "cloud" and not self.allow_cloud:
            return False
        return self.allow_tiers is None or tier in self.allow_tiers
