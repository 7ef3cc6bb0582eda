"""The usage ledger: one row per routed chat completion, and the sums people ask of it."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Integer, cast, func, select

from streamllm.store.db import Store
from streamllm.store.tables import usage

DAY = 86400


@dataclass
class UsageRow:
    request_id: str
    caller: str | None
    key_id: str | None
    tier: str | None
    model: str | None
    complexity: str | None
    route_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    ttft_ms: float | None
    duration_ms: float
    outcome: str  # completed | failed | cancelled | rejected
    fallbacks: int
    created_at: float
    prompt_text: str | None = None
    answer_text: str | None = None

    def public(self) -> dict[str, Any]:
        """As `GET /v1/usage/requests/{id}` shows it."""
        out = asdict(self)
        out["created"] = int(out.pop("created_at"))
        for hidden in ("key_id", "prompt_text", "answer_text"):
            out.pop(hidden)
        return out


async def insert_rows(store: Store, rows: Sequence[UsageRow]) -> None:
    if not rows:
        return
    values = [asdict(r) for r in rows]
    # A request id is unique per request, but a client may send the same x-request-id twice:
    # keep the first row rather than fail the whole batch.
    statement = store.insert(usage).values(values).on_conflict_do_nothing(
        index_elements=["request_id"])
    async with store.engine.begin() as connection:
        await connection.execute(statement)


async def row_for(store: Store, request_id: str) -> UsageRow | None:
    async with store.engine.connect() as connection:
        row = (await connection.execute(
            select(usage).where(usage.c.request_id == request_id))).mappings().first()
    return UsageRow(**row) if row else None


async def spent_since(store: Store, caller: str | None, since: float) -> float:
    query = select(func.coalesce(func.sum(usage.c.cost_usd), 0.0)).where(
        usage.c.created_at >= since)
    if caller is not None:
        query = query.where(usage.c.caller == caller)
    async with store.engine.connect() as connection:
        return float((await connection.execute(query)).scalar_one())


def _totals(rows: Sequence[Any]) -> dict[str, Any]:
    return {"requests": int(sum(r.requests for r in rows)),
            "prompt_tokens": int(sum(r.prompt for r in rows)),
            "completion_tokens": int(sum(r.completion for r in rows)),
            "cost_usd": round(float(sum(r.cost for r in rows)), 6)}


async def summary(store: Store, caller: str | None, since: float,
                  everyone: bool = False) -> dict[str, Any]:
    """Totals, per tier and per day (UTC) since `since`, for one caller (or everyone)."""
    day = cast(usage.c.created_at / DAY, Integer).label("day")
    query = (select(day, usage.c.tier, func.count().label("requests"),
                    func.coalesce(func.sum(usage.c.prompt_tokens), 0).label("prompt"),
                    func.coalesce(func.sum(usage.c.completion_tokens), 0).label("completion"),
                    func.coalesce(func.sum(usage.c.cost_usd), 0.0).label("cost"))
             .where(usage.c.created_at >= since)
             .group_by(day, usage.c.tier).order_by(day))
    if not everyone:
        query = query.where(usage.c.caller.is_(None) if caller is None
                            else usage.c.caller == caller)
    async with store.engine.connect() as connection:
        rows = list(await connection.execute(query))
    per_tier: dict[str, list[Any]] = {}
    per_day: dict[int, list[Any]] = {}
    for r in rows:
        per_tier.setdefault(r.tier or "none", []).append(r)
        per_day.setdefault(int(r.day), []).append(r)
    return {
        "totals": _totals(rows),
        "per_tier": {tier: _totals(rs) for tier, rs in sorted(per_tier.items())},
        "per_day": [{"day": dt.datetime.fromtimestamp(d * DAY, dt.UTC).date().isoformat(),
                     "requests": int(sum(r.requests for r in rs)),
                     "cost_usd": round(float(sum(r.cost for r in rs)), 6),
                     "per_tier": {r.tier or "none": int(r.requests) for r in rs}}
                    for d, rs in sorted(per_day.items())],
    }


async def by_caller(store: Store, since: float) -> list[dict[str, Any]]:
    """Totals per caller since `since`, most expensive first (the admin view)."""
    query = (select(usage.c.caller, func.count().label("requests"),
                    func.coalesce(func.sum(usage.c.prompt_tokens), 0).label("prompt"),
                    func.coalesce(func.sum(usage.c.completion_tokens), 0).label("completion"),
                    func.coalesce(func.sum(usage.c.cost_usd), 0.0).label("cost"))
             .where(usage.c.created_at >= since).group_by(usage.c.caller))
    async with store.engine.connect() as connection:
        rows = list(await connection.execute(query))
    out = [{"caller": r.caller, **_totals([r])} for r in rows]
    return sorted(out, key=lambda x: (-x["cost_usd"], -x["requests"]))
