"""The Batch API in the store: file metadata, batches, and each line's one result.

A line's result is written only over `state = 'pending'` (and the batch's counters moved in the
same transaction), so a custom_id gets exactly one result however often its chunk is retried,
its batch resumed, or two gateways race for it. Which gateway runs a batch is a lease on its
row: claimed with a conditional update, renewed while it runs, released on a clean stop.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from sqlalchemy import and_, delete, or_, select, update

from streamllm.store.db import Store
from streamllm.store.tables import batch_lines, batches, files

ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
TERMINAL = ("failed", "completed", "expired", "cancelled")
INSERT_ROWS = 1000  # lines per INSERT: far below both databases' bound-parameter limits
PAGE = 1000  # lines read at a time when writing output files


def _owned(column: Any, caller: str | None) -> Any:
    return column.is_(None) if caller is None else column == caller


def _seconds(value: float | None) -> int | None:
    return None if value is None else int(value)


# -- files --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileRecord:
    id: str
    caller: str | None
    purpose: str
    filename: str
    bytes: int
    created_at: float

    def public(self) -> dict[str, Any]:
        """OpenAI's file object."""
        return {"id": self.id, "object": "file", "bytes": self.bytes,
                "created_at": int(self.created_at), "filename": self.filename,
                "purpose": self.purpose, "status": "processed", "expires_at": None,
                "status_details": None}


async def insert_file(store: Store, record: FileRecord) -> None:
    async with store.engine.begin() as connection:
        await connection.execute(files.insert().values(asdict(record)))


async def file_for(store: Store, caller: str | None, file_id: str) -> FileRecord | None:
    query = select(files).where(files.c.id == file_id, _owned(files.c.caller, caller))
    async with store.engine.connect() as connection:
        row = (await connection.execute(query)).mappings().first()
    return FileRecord(**row) if row else None


async def list_files(store: Store, caller: str | None, *, purpose: str | None, newest_first: bool,
                     limit: int, after: str | None) -> tuple[list[FileRecord], bool]:
    """One page of the caller's files and whether more follow (`after`: the last id seen)."""
    query = select(files).where(_owned(files.c.caller, caller))
    if purpose is not None:
        query = query.where(files.c.purpose == purpose)
    query = _page(query, files, caller, after, newest_first, limit)
    async with store.engine.connect() as connection:
        if after is not None and (await _cursor(connection, files, caller, after)) is None:
            return [], False
        rows = [FileRecord(**r) for r in (await connection.execute(query)).mappings()]
    return rows[:limit], len(rows) > limit


async def delete_file(store: Store, caller: str | None, file_id: str) -> bool:
    async with store.engine.begin() as connection:
        done = await connection.execute(delete(files).where(
            files.c.id == file_id, _owned(files.c.caller, caller)))
    return bool(done.rowcount)


async def batch_reading(store: Store, file_id: str) -> str | None:
    """The unfinished batch that still reads this file as its input, if any."""
    query = select(batches.c.id).where(batches.c.input_file_id == file_id,
                                       batches.c.status.in_(ACTIVE)).limit(1)
    async with store.engine.connect() as connection:
        return (await connection.execute(query)).scalar_one_or_none()


# -- batches ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchRecord:
    id: str
    caller: str | None
    key_id: str | None
    rights: str
    endpoint: str
    completion_window: str
    input_file_id: str
    status: str
    meta: str | None
    errors: str | None
    output_file_id: str | None
    error_file_id: str | None
    total: int
    completed: int
    failed: int
    created_at: float
    expires_at: float
    in_progress_at: float | None
    finalizing_at: float | None
    completed_at: float | None
    failed_at: float | None
    expired_at: float | None
    cancelling_at: float | None
    cancelled_at: float | None
    owner: str | None
    lease_until: float | None

    @classmethod
    def of(cls, row: Any) -> BatchRecord:
        return cls(**{f.name: row[f.name] for f in fields(cls)})

    def public(self) -> dict[str, Any]:
        """OpenAI's batch object."""
        return {
            "id": self.id, "object": "batch", "endpoint": self.endpoint,
            "errors": json.loads(self.errors) if self.errors else None,
            "input_file_id": self.input_file_id, "completion_window": self.completion_window,
            "status": self.status, "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id, "created_at": int(self.created_at),
            "in_progress_at": _seconds(self.in_progress_at),
            "expires_at": _seconds(self.expires_at),
            "finalizing_at": _seconds(self.finalizing_at),
            "completed_at": _seconds(self.completed_at),
            "failed_at": _seconds(self.failed_at), "expired_at": _seconds(self.expired_at),
            "cancelling_at": _seconds(self.cancelling_at),
            "cancelled_at": _seconds(self.cancelled_at),
            "request_counts": {"total": self.total, "completed": self.completed,
                               "failed": self.failed},
            "metadata": json.loads(self.meta) if self.meta else None,
        }


async def insert_batch(store: Store, row: dict[str, Any]) -> None:
    async with store.engine.begin() as connection:
        await connection.execute(batches.insert().values(row))


async def batch_for(store: Store, caller: str | None, batch_id: str) -> BatchRecord | None:
    query = select(batches).where(batches.c.id == batch_id, _owned(batches.c.caller, caller))
    async with store.engine.connect() as connection:
        row = (await connection.execute(query)).mappings().first()
    return BatchRecord.of(row) if row else None


async def batch_by_id(store: Store, batch_id: str) -> BatchRecord | None:
    async with store.engine.connect() as connection:
        row = (await connection.execute(
            select(batches).where(batches.c.id == batch_id))).mappings().first()
    return BatchRecord.of(row) if row else None


async def list_batches(store: Store, caller: str | None, *, limit: int,
                       after: str | None) -> tuple[list[BatchRecord], bool]:
    """One page of the caller's batches, newest first, and whether more follow."""
    query = _page(select(batches).where(_owned(batches.c.caller, caller)), batches, caller,
                  after, True, limit)
    async with store.engine.connect() as connection:
        if after is not None and (await _cursor(connection, batches, caller, after)) is None:
            return [], False
        rows = [BatchRecord.of(r) for r in (await connection.execute(query)).mappings()]
    return rows[:limit], len(rows) > limit


async def set_status(store: Store, batch_id: str, status: str, *, was: Sequence[str],
                     **values: Any) -> bool:
    """Move a batch to `status` (with other columns) if it is in one of `was`."""
    statement = (update(batches).where(batches.c.id == batch_id, batches.c.status.in_(was))
                 .values(status=status, **values))
    async with store.engine.begin() as connection:
        return bool((await connection.execute(statement)).rowcount)


async def claim(store: Store, batch_id: str, owner: str, now: float, until: float) -> bool:
    """Take the batch for this process unless another holds a live lease on it."""
    statement = (update(batches).where(
        batches.c.id == batch_id, batches.c.status.in_(ACTIVE),
        or_(batches.c.owner.is_(None), batches.c.owner == owner,
            batches.c.lease_until.is_(None), batches.c.lease_until < now))
        .values(owner=owner, lease_until=until))
    async with store.engine.begin() as connection:
        return bool((await connection.execute(statement)).rowcount)


async def renew(store: Store, owner: str, batch_ids: Sequence[str],
                until: float) -> dict[str, tuple[str, str | None]]:
    """Extend this process's leases; each batch's (status, owner) after that."""
    if not batch_ids:
        return {}
    async with store.engine.begin() as connection:
        await connection.execute(update(batches).where(
            batches.c.owner == owner, batches.c.id.in_(list(batch_ids)))
            .values(lease_until=until))
        rows = await connection.execute(select(batches.c.id, batches.c.status, batches.c.owner)
                                        .where(batches.c.id.in_(list(batch_ids))))
        return {r.id: (r.status, r.owner) for r in rows}


async def release(store: Store, owner: str) -> None:
    async with store.engine.begin() as connection:
        await connection.execute(update(batches).where(batches.c.owner == owner)
                                 .values(owner=None, lease_until=None))


async def orphans(store: Store, now: float) -> list[str]:
    """Unfinished batches no live gateway holds, oldest first."""
    query = (select(batches.c.id).where(
        batches.c.status.in_(ACTIVE),
        or_(batches.c.owner.is_(None), batches.c.lease_until.is_(None),
            batches.c.lease_until < now))
        .order_by(batches.c.created_at))
    async with store.engine.connect() as connection:
        return list((await connection.execute(query)).scalars())


# -- lines --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LineRef:
    """Where a pending line is: enough to read its body again from the input file."""

    custom_id: str
    line: int
    request_id: str
    model: str
    byte_offset: int
    byte_length: int


@dataclass(frozen=True)
class LineOutcome:
    """A line's result as stored: `response` is the JSON body (completion or error envelope)."""

    custom_id: str
    status_code: int | None
    response: str | None
    error_code: str | None
    error_message: str | None
    tier: str | None
    finished_at: float

    @property
    def ok(self) -> bool:
        return self.status_code == 200 and self.error_code is None


async def start_lines(store: Store, batch_id: str, lines: Sequence[LineRef],
                      invalid: Sequence[tuple[LineRef, LineOutcome]], now: float) -> bool:
    """Record a validated batch's lines (those with an invalid body already failed) and move
    it to in_progress, in one transaction; False if it is no longer validating."""
    # Every row has every column: an executemany INSERT takes its columns from the first row.
    empty = dict.fromkeys(("status_code", "response", "error_code", "error_message", "tier",
                           "finished_at"))
    rows = [{**asdict(ref), **empty, "batch_id": batch_id, "state": "pending"} for ref in lines]
    rows += [{**asdict(ref), **_result_columns(out), "batch_id": batch_id, "state": "done"}
             for ref, out in invalid]
    async with store.engine.begin() as connection:
        moved = await connection.execute(
            update(batches).where(batches.c.id == batch_id, batches.c.status == "validating")
            .values(status="in_progress", in_progress_at=now, total=len(rows), completed=0,
                    failed=len(invalid)))
        if not moved.rowcount:
            return False
        for start in range(0, len(rows), INSERT_ROWS):
            await connection.execute(batch_lines.insert(), rows[start : start + INSERT_ROWS])
    return True


async def pending_lines(store: Store, batch_id: str) -> list[LineRef]:
    query = (select(*(batch_lines.c[f.name] for f in fields(LineRef)))
             .where(batch_lines.c.batch_id == batch_id, batch_lines.c.state == "pending")
             .order_by(batch_lines.c.line))
    async with store.engine.connect() as connection:
        return [LineRef(**r) for r in (await connection.execute(query)).mappings()]


def _result_columns(out: LineOutcome) -> dict[str, Any]:
    return {"status_code": out.status_code, "response": out.response,
            "error_code": out.error_code, "error_message": out.error_message,
            "tier": out.tier, "finished_at": out.finished_at}


async def record_results(store: Store, batch_id: str,
                         outcomes: Sequence[LineOutcome]) -> list[str]:
    """Write results over pending lines only; the custom_ids that were written (a line that
    already had a result keeps it, and its counter is not moved again)."""
    written: list[str] = []
    completed = failed = 0
    async with store.engine.begin() as connection:
        for out in outcomes:
            done = await connection.execute(
                update(batch_lines).where(batch_lines.c.batch_id == batch_id,
                                          batch_lines.c.custom_id == out.custom_id,
                                          batch_lines.c.state == "pending")
                .values(state="done", **_result_columns(out)))
            if done.rowcount:
                written.append(out.custom_id)
                completed += out.ok
                failed += not out.ok
        if written:
            await connection.execute(
                update(batches).where(batches.c.id == batch_id)
                .values(completed=batches.c.completed + completed,
                        failed=batches.c.failed + failed))
    return written


async def all_lines(store: Store, batch_id: str) -> AsyncIterator[dict[str, Any]]:
    """Every line of a batch in input order, a page at a time (for its output files)."""
    last = 0
    while True:
        query = (select(batch_lines).where(batch_lines.c.batch_id == batch_id,
                                           batch_lines.c.line > last)
                 .order_by(batch_lines.c.line).limit(PAGE))
        async with store.engine.connect() as connection:
            rows = [dict(r) for r in (await connection.execute(query)).mappings()]
        for row in rows:
            yield row
        if len(rows) < PAGE:
            return
        last = rows[-1]["line"]


async def finish(store: Store, batch_id: str, status: str, *, was: Sequence[str],
                 made: Sequence[FileRecord], **values: Any) -> bool:
    """End a batch: its output and error files' records and its final status, together."""
    async with store.engine.begin() as connection:
        moved = await connection.execute(
            update(batches).where(batches.c.id == batch_id, batches.c.status.in_(was))
            .values(status=status, owner=None, lease_until=None, **values))
        if not moved.rowcount:
            return False
        for record in made:
            await connection.execute(files.insert().values(asdict(record)))
    return True


# -- paging -------------------------------------------------------------------------------------


async def _cursor(connection: Any, table: Any, caller: str | None,
                  after: str) -> float | None:
    return (await connection.execute(select(table.c.created_at).where(
        table.c.id == after, _owned(table.c.caller, caller)))).scalar_one_or_none()


def _page(query: Any, table: Any, caller: str | None, after: str | None, newest_first: bool,
          limit: int) -> Any:
    """Order by (created_at, id) and continue after the row `after`, one more than `limit`
    (to tell whether another page follows)."""
    created, ident = table.c.created_at, table.c.id
    if after is not None:
        at = (select(table.c.created_at).where(ident == after, _owned(table.c.caller, caller))
              .scalar_subquery())
        if newest_first:
            query = query.where(or_(created < at, and_(created == at, ident < after)))
        else:
            query = query.where(or_(created > at, and_(created == at, ident > after)))
    order = (created.desc(), ident.desc()) if newest_first else (created.asc(), ident.asc())
    return query.order_by(*order).limit(limit + 1)
