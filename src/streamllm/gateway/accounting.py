"""Per-caller accounting: the usage ledger's writer, monthly spend, budget reservations and
request limits.

Spend comes from the ledger and is cached per caller for a minute, so that several gateway
processes sharing one database see each other's spending within that time. A request's
estimated cost is reserved before it is dispatched and settled with its real cost after; a
request the budget cannot cover is refused (429 insufficient_quota) before any backend is
asked. Rate and concurrency limits are counted in this process.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass

from streamllm.caller import Caller
from streamllm.errors import BudgetExhausted, LimitExceeded
from streamllm.store import Store
from streamllm.store import usage as ledger
from streamllm.store.usage import UsageRow

log = logging.getLogger("streamllm.gateway")

SPEND_TTL_S = 60.0  # how stale another process's spending may be
FLUSH_EVERY_S = 0.2  # ledger rows are written in batches, off the request path
FLUSH_ROWS = 200
EVERYONE = "*"


def month_start(now: float) -> float:
    day = dt.datetime.fromtimestamp(now, dt.UTC)
    return dt.datetime(day.year, day.month, 1, tzinfo=dt.UTC).timestamp()


def next_month(now: float) -> float:
    day = dt.datetime.fromtimestamp(now, dt.UTC)
    year, month = (day.year + 1, 1) if day.month == 12 else (day.year, day.month + 1)
    return dt.datetime(year, month, 1, tzinfo=dt.UTC).timestamp()


@dataclass
class Reservation:
    holders: tuple[str, ...]
    usd: float


class Accounts:
    def __init__(self, store: Store, everyone_budget: float | None,
                 clock: Callable[[], float] = time.time):
        self.store = store
        self.everyone_budget = everyone_budget
        self.clock = clock
        self._spent: dict[str, tuple[float, float, float]] = {}  # holder -> (month, usd, at)
        self._recorded: dict[str, float] = defaultdict(float)  # holder -> cost recorded here
        self._reserved: dict[str, float] = defaultdict(float)
        self._pending: list[UsageRow] = []
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        # One flush at a time: a caller that flushes to read the ledger must also wait for
        # rows the background writer has taken but not yet written.
        self._flushing = asyncio.Lock()
        self._recent: dict[str, deque[float]] = defaultdict(deque)  # holder -> request times
        self._inflight: dict[str, int] = defaultdict(int)

    # -- the ledger --------------------------------------------------------------------------
    def start(self) -> None:
        self._writer = asyncio.create_task(self._write_forever(), name="usage-ledger")

    async def stop(self) -> None:
        if self._writer is not None:
            # Stopped between writes (holding the flush lock), never in the middle of one:
            # cancelling a write under way would lose the rows it had taken.
            async with self._flushing:
                self._writer.cancel()
                await asyncio.gather(self._writer, return_exceptions=True)
        await self.flush()

    def record(self, row: UsageRow) -> None:
        """Queue a ledger row; its cost counts towards spend at once."""
        self._pending.append(row)
        for holder in (row.caller, EVERYONE) if row.caller else (EVERYONE,):
            self._recorded[holder] += row.cost_usd
            month, usd, at = self._spent.get(holder, (0.0, 0.0, 0.0))
            if month == month_start(row.created_at):
                self._spent[holder] = (month, usd + row.cost_usd, at)
        if len(self._pending) >= FLUSH_ROWS:
            self._wake.set()

    def pending(self, request_id: str) -> UsageRow | None:
        return next((r for r in self._pending if r.request_id == request_id), None)

    async def flush(self) -> None:
        async with self._flushing:
            await self._write_pending()

    async def _write_pending(self) -> None:
        rows, self._pending = self._pending, []
        try:
            await ledger.insert_rows(self.store, rows)
        except Exception:
            # A database hiccup must not lose the rows: they are retried with the next batch.
            self._pending = rows + self._pending
            raise

    async def _write_forever(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), FLUSH_EVERY_S)
            except TimeoutError:
                pass
            self._wake.clear()
            if self._pending:
                try:
                    await self.flush()
                except Exception:
                    log.exception("writing the usage ledger failed; retrying")

    # -- spend and budgets -----------------------------------------------------------------------
    async def spent(self, holder: str | None) -> float:
        """This calendar month's spend of a caller (or everyone), from the ledger."""
        key = holder or EVERYONE
        now = self.clock()
        month = month_start(now)
        cached = self._spent.get(key)
        if cached is None or cached[0] != month or now - cached[2] > SPEND_TTL_S:
            async with self._flushing:  # no rows are written between the flush and the sum
                marker = self._recorded[key]
                await self._write_pending()  # what this process spent is in the sum below
                usd = await ledger.spent_since(self.store, None if key == EVERYONE else key,
                                               month)
            # Rows recorded while the sum was read are not in it (concurrent requests, a
            # batch's lines): added here, or a refresh would forget spending just recorded.
            usd += self._recorded[key] - marker
            self._spent[key] = (month, usd, now)
            return usd
        return cached[1]

    def spent_now(self, holder: str | None) -> float:
        """The cached spend (as of the last `spent` call); 0 when never asked."""
        found = self._spent.get(holder or EVERYONE)
        return found[1] if found and found[0] == month_start(self.clock()) else 0.0

    def budgets(self, caller: Caller | None) -> list[tuple[str, float]]:
        out = []
        if caller is not None and caller.budget_usd is not None:
            out.append((caller.name, caller.budget_usd))
        if self.everyone_budget is not None:
            out.append((EVERYONE, self.everyone_budget))
        return out

    async def reserve(self, caller: Caller | None, usd: float) -> Reservation:
        """Set `usd` aside for a request, or BudgetExhausted."""
        budgets = self.budgets(caller)
        for holder, _ in budgets:
            await self.spent(None if holder == EVERYONE else holder)  # cached from here on
        # Nothing below awaits, so requests reserving at once (a batch's lines) each see the
        # others' reservations: checking and reserving is one step.
        for holder, budget in budgets:
            spent = self.spent_now(None if holder == EVERYONE else holder)
            if usd > 0 and spent + self._reserved[holder] + usd > budget:
                whose = "your key's" if holder != EVERYONE else "this server's"
                raise BudgetExhausted(
                    f"This request (up to ${usd:.4f}) would exceed {whose} monthly budget of "
                    f"${budget:.2f} (${spent:.4f} spent, ${self._reserved[holder]:.4f} held "
                    "for requests in progress).",
                    retry_after=next_month(self.clock()) - self.clock())
        holders = tuple(h for h, _ in budgets)
        for holder in holders:
            self._reserved[holder] += usd
        return Reservation(holders, usd)

    def settle(self, reservation: Reservation) -> None:
        for holder in reservation.holders:
            self._reserved[holder] = max(0.0, self._reserved[holder] - reservation.usd)
        reservation.usd = 0.0

    # -- limits ------------------------------------------------------------------------------------
    def admit(self, caller: Caller | None) -> Callable[[], None]:
        """Count a request against the caller's limits, or LimitExceeded. Returns the release
        to call when the request is over."""
        if caller is None:
            return lambda: None
        now = time.monotonic()
        if caller.rpm is not None:
            recent = self._recent[caller.name]
            while recent and now - recent[0] >= 60.0:
                recent.popleft()
            if len(recent) >= caller.rpm:
                raise LimitExceeded(
                    f"Rate limit reached for {caller.name}: {caller.rpm} requests per minute.",
                    retry_after=60.0 - (now - recent[0]))
        if caller.max_concurrent is not None and \
                self._inflight[caller.name] >= caller.max_concurrent:
            raise LimitExceeded(
                f"Too many requests in progress for {caller.name}: at most "
                f"{caller.max_concurrent} at once.", retry_after=1.0)
        if caller.rpm is not None:
            self._recent[caller.name].append(now)
        self._inflight[caller.name] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._inflight[caller.name] -= 1

        return release

    def inflight(self) -> int:
        return sum(self._inflight.values())
