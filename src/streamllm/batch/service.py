"""Batches from creation to their output files: validation, the state machine, scheduling
chunks on runners, recording each line's result exactly once, finalizing, resuming.

    validating -> in_progress -> finalizing -> completed
         |             |  \\-> (past expires_at) -> expired
         |             \\-> cancelling -> cancelled
         \\-> failed (the input file is unusable)

State lives in the store (tables `batches` and `batch_lines`), so a restarted gateway picks up
where it stopped: the lines still pending are run, those with a result are not. The gateway
running a batch holds a lease on it, renewed every `lease_s / 3`; a clean stop lets requests in
flight finish (up to `drain_s`) and releases its leases, so the next start resumes at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from streamllm.batch.files import FileStore
from streamllm.batch.input import FileError, read_input
from streamllm.batch.runner import BatchHost, BatchLine, Chunk, LineError, LineResult
from streamllm.caller import Caller
from streamllm.config import BatchSettings
from streamllm.errors import InvalidRequest, NotFound
from streamllm.protocol.errors import ErrorEnvelope
from streamllm.store import Store
from streamllm.store import batches as records
from streamllm.store import keys as stored_keys
from streamllm.store.batches import BatchRecord, LineOutcome, LineRef
from streamllm.store.usage import UsageRow

log = logging.getLogger("streamllm.batch")

ENDPOINTS = ("/v1/chat/completions",)
WINDOWS = {"24h": 24 * 3600}
METADATA_PAIRS, METADATA_KEY, METADATA_VALUE = 16, 64, 512
WRITE_ROWS = 500  # results per transaction
RETRY_WRITE_S = (0.1, 0.5, 1.0, 2.0, 5.0)  # waits between attempts to store results


def new_batch_id() -> str:
    return f"batch_{uuid.uuid4().hex}"


def new_request_id() -> str:
    return f"batch_req_{uuid.uuid4().hex}"


def rights_of(caller: Caller | None) -> str:
    """The caller's name and limits as JSON, to run the batch with after a restart."""
    if caller is None:
        return "null"
    return json.dumps({
        "name": caller.name, "key_id": caller.key_id, "admin": caller.admin,
        "allow_tiers": sorted(caller.allow_tiers) if caller.allow_tiers is not None else None,
        "allow_cloud": caller.allow_cloud, "budget_usd": caller.budget_usd,
        "rpm": caller.rpm, "max_concurrent": caller.max_concurrent,
    })


def caller_of(rights: str) -> Caller | None:
    found = json.loads(rights)
    if found is None:
        return None
    tiers = found.pop("allow_tiers")
    return Caller(**found, allow_tiers=frozenset(tiers) if tiers is not None else None)


class ResultWriter:
    """Stores a batch's line results in the background, many per transaction."""

    def __init__(self, store: Store, batch_id: str):
        self.store, self.batch_id = store, batch_id
        self._pending: list[LineOutcome] = []
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name=f"results-{batch_id}")

    def put(self, outcome: LineOutcome) -> None:
        self._pending.append(outcome)
        self._wake.set()

    async def flush(self) -> None:
        async with self._lock:
            while self._pending:
                take, self._pending = self._pending[:WRITE_ROWS], self._pending[WRITE_ROWS:]
                await self._write(take)

    async def close(self) -> None:
        """Store what is queued and stop. The background task is stopped between writes
        (holding the lock), never in the middle of one, which would lose what it took."""
        async with self._lock:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.flush()

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.flush()

    async def _write(self, take: list[LineOutcome]) -> None:
        for wait in (*RETRY_WRITE_S, None):
            try:
                written = await records.record_results(self.store, self.batch_id, take)
            except Exception:
                if wait is None:
                    raise
                log.exception("batch %s: storing %d results failed; retrying", self.batch_id,
                              len(take))
                await asyncio.sleep(wait)
                continue
            if len(written) < len(take):
                log.info("batch %s: %d results were stored already and were kept",
                         self.batch_id, len(take) - len(written))
            return


@dataclass
class Running:
    """A batch this process runs."""

    batch_id: str
    caller: Caller | None
    expires_at: float
    cancel: asyncio.Event = field(default_factory=asyncio.Event)  # cancelled (or expired)
    draining: asyncio.Event = field(default_factory=asyncio.Event)  # the gateway is stopping
    halt: asyncio.Event = field(default_factory=asyncio.Event)  # either of the two
    expired: bool = False
    lost: bool = False  # another gateway holds the batch now
    task: asyncio.Task[None] | None = None
    writer: ResultWriter | None = None

    def stop(self, *, cancel: bool) -> None:
        (self.cancel if cancel else self.draining).set()
        self.halt.set()


class BatchService:
    def __init__(self, host: BatchHost, store: Store, files: FileStore,
                 settings: BatchSettings, clock: Callable[[], float] = time.time):
        self.host, self.store, self.files, self.settings = host, store, files, settings
        self.clock = clock
        self.owner = f"{socket.gethostname()[:32]}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self.running: dict[str, Running] = {}
        self._slots: dict[str, asyncio.Semaphore] = {}  # runner name -> chunks at once
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Resume the batches no live gateway holds, and keep watching for more."""
        await self._adopt()
        self._watch = asyncio.create_task(self._keep(), name="batch-leases")

    async def stop(self) -> None:
        """Let requests in flight finish (up to `drain_s`), keep their results, release."""
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        runs = list(self.running.values())
        for run in runs:
            run.stop(cancel=False)
        tasks = [run.task for run in runs if run.task is not None]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=self.settings.drain_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for run in runs:
            if run.writer is not None:
                with contextlib.suppress(Exception):
                    await run.writer.close()
        with contextlib.suppress(Exception):
            await records.release(self.store, self.owner)

    # -- the API -----------------------------------------------------------------------------
    async def create(self, caller: Caller | None, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise InvalidRequest("request body must be a JSON object")
        input_file_id = body.get("input_file_id")
        if not isinstance(input_file_id, str) or not input_file_id:
            raise InvalidRequest("'input_file_id' is a required property",
                                 param="input_file_id")
        endpoint = body.get("endpoint")
        if endpoint not in ENDPOINTS:
            raise InvalidRequest(f"endpoint must be one of {', '.join(ENDPOINTS)}; STREAM "
                                 "runs chat completions in batches", param="endpoint")
        window = body.get("completion_window")
        if window not in WINDOWS:
            raise InvalidRequest(f"completion_window must be one of {', '.join(WINDOWS)}",
                                 param="completion_window")
        metadata = _metadata(body.get("metadata"))
        name = caller.name if caller else None
        found = await self.files.get(name, input_file_id)
        if found is None:
            raise NotFound(f"No file with id `{input_file_id}` exists for this caller.",
                           param="input_file_id")
        if found.purpose != "batch":
            raise InvalidRequest(f"The file `{input_file_id}` has purpose {found.purpose!r}; a "
                                 "batch's input file must be uploaded with purpose 'batch'.",
                                 param="input_file_id")
        now = self.clock()
        batch_id = new_batch_id()
        await records.insert_batch(self.store, {
            "id": batch_id, "caller": name, "key_id": caller.key_id if caller else None,
            "rights": rights_of(caller), "endpoint": endpoint, "completion_window": window,
            "input_file_id": input_file_id, "status": "validating",
            "meta": json.dumps(metadata) if metadata is not None else None, "errors": None,
            "output_file_id": None, "error_file_id": None, "total": 0, "completed": 0,
            "failed": 0, "created_at": now, "expires_at": now + WINDOWS[window],
            "in_progress_at": None, "finalizing_at": None, "completed_at": None,
            "failed_at": None, "expired_at": None, "cancelling_at": None,
            "cancelled_at": None, "owner": self.owner,
            "lease_until": now + self.settings.lease_s,
        })
        record = await records.batch_by_id(self.store, batch_id)
        assert record is not None
        self._launch(record)
        return record.public()

    async def get(self, caller: Caller | None, batch_id: str) -> dict[str, Any]:
        return (await self._mine(caller, batch_id)).public()

    async def listing(self, caller: Caller | None, limit: int,
                      after: str | None) -> tuple[list[dict[str, Any]], bool]:
        found, more = await records.list_batches(
            self.store, caller.name if caller else None, limit=limit, after=after)
        return [b.public() for b in found], more

    async def cancel(self, caller: Caller | None, batch_id: str) -> dict[str, Any]:
        record = await self._mine(caller, batch_id)
        if record.status in ("validating", "in_progress"):
            if await records.set_status(self.store, batch_id, "cancelling",
                                        was=("validating", "in_progress"),
                                        cancelling_at=self.clock()):
                await self._cancel_here_or_adopt(batch_id)
        elif record.status not in ("cancelling", "cancelled"):
            raise InvalidRequest(f"Cannot cancel a batch that is {record.status}.")
        return await self.get(caller, batch_id)

    async def _mine(self, caller: Caller | None, batch_id: str) -> BatchRecord:
        found = await records.batch_for(self.store, caller.name if caller else None, batch_id)
        if found is None:
            raise NotFound(f"No batch with id `{batch_id}` exists for this caller.",
                           param="batch_id")
        return found

    async def _cancel_here_or_adopt(self, batch_id: str) -> None:
        run = self.running.get(batch_id)
        if run is not None:
            run.stop(cancel=True)
            return
        # Held by another gateway: it sees the new status when it renews its lease. Held by
        # nobody (its gateway died): finalize it here.
        await self._adopt()

    # -- running batches -----------------------------------------------------------------------
    def _launch(self, record: BatchRecord) -> None:
        run = Running(record.id, caller_of(record.rights), record.expires_at)
        if record.status == "cancelling":
            run.stop(cancel=True)
        elif self.clock() >= record.expires_at:  # resumed after its window closed
            run.expired = True
            run.stop(cancel=True)
        run.writer = ResultWriter(self.store, record.id)
        self.running[record.id] = run
        run.task = asyncio.create_task(self._run(run), name=f"batch-{record.id}")

    async def _adopt(self) -> None:
        if self._stopping:
            return
        now = self.clock()
        for batch_id in await records.orphans(self.store, now):
            if batch_id in self.running:
                continue
            if await records.claim(self.store, batch_id, self.owner, now,
                                   now + self.settings.lease_s):
                record = await records.batch_by_id(self.store, batch_id)
                if record is not None and record.status in records.ACTIVE:
                    log.info("batch %s: resuming (%s)", batch_id, record.status)
                    self._launch(record)

    async def _keep(self) -> None:
        every = self.settings.lease_s / 3
        while True:
            await asyncio.sleep(every)
            try:
                await self._renew()
                await self._adopt()
            except Exception:
                log.exception("batch leases: renewing or adopting failed")

    async def _renew(self) -> None:
        now = self.clock()
        held = await records.renew(self.store, self.owner, list(self.running),
                                   now + self.settings.lease_s)
        for batch_id, run in list(self.running.items()):
            status, owner = held.get(batch_id, (None, None))
            if status not in records.ACTIVE:
                continue  # finishing here right now
            if owner != self.owner:
                log.warning("batch %s: another gateway holds it now; stopping here", batch_id)
                run.lost = True
                run.stop(cancel=True)
            elif status == "cancelling":
                run.stop(cancel=True)
            elif now >= run.expires_at and not run.cancel.is_set():
                run.expired = True
                run.stop(cancel=True)
            elif run.caller is not None and run.caller.key_id is not None:
                key = await stored_keys.key_by_id(self.store, run.caller.key_id)
                if key is None or key.revoked_at is not None:
                    log.info("batch %s: its key was revoked; cancelling it", batch_id)
                    await records.set_status(self.store, batch_id, "cancelling",
                                             was=("validating", "in_progress"),
                                             cancelling_at=now)
                    run.stop(cancel=True)

    async def _run(self, run: Running) -> None:
        batch_id = run.batch_id
        try:
            record = await records.batch_by_id(self.store, batch_id)
            if record is not None and record.status == "validating":
                await self._validate(record)
                record = await records.batch_by_id(self.store, batch_id)
            if record is not None and record.status == "in_progress" and not run.halt.is_set():
                await self._work(record, run)
            assert run.writer is not None
            await run.writer.close()
            if run.lost or run.draining.is_set():
                return  # resumed later, here or elsewhere
            while True:  # again if it was cancelled just as it was to be finalized
                record = await records.batch_by_id(self.store, batch_id)
                if record is None or record.status not in records.ACTIVE:
                    return
                final = ("cancelled" if record.status == "cancelling"
                         else "expired" if run.expired else "completed")
                if await self._finalize(record, final):
                    return
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("batch %s failed in STREAM", batch_id)
            error = FileError("server_error", f"internal error in the STREAM gateway: "
                              f"{type(e).__name__}")
            with contextlib.suppress(Exception):
                await records.finish(self.store, batch_id, "failed", was=records.ACTIVE,
                                     made=(), failed_at=self.clock(),
                                     errors=_errors_json([error]))
        finally:
            self.running.pop(batch_id, None)

    async def _validate(self, record: BatchRecord) -> None:
        path = self.files.path(record.input_file_id)
        max_lines = self.settings.max_lines

        def read() -> tuple[list, list[FileError]]:
            try:
                with open(path, "rb") as f:
                    return read_input(f, record.endpoint, max_lines)
            except FileNotFoundError:
                return [], [FileError("file_not_found", "The input file was deleted.")]

        lines, errors = await asyncio.to_thread(read)
        now = self.clock()
        if errors:
            log.info("batch %s: input file unusable (%s)", record.id, errors[0].message)
            await records.finish(self.store, record.id, "failed", was=("validating",), made=(),
                                 failed_at=now, errors=_errors_json(errors))
            return
        valid: list[LineRef] = []
        invalid: list[tuple[LineRef, LineOutcome]] = []
        for line in lines:
            ref = LineRef(line.custom_id, line.line, new_request_id(), line.model, line.offset,
                          line.length)
            if line.invalid is None:
                valid.append(ref)
                continue
            err = line.invalid
            envelope = ErrorEnvelope.of(err.message, err.type, err.param, err.code or err.type)
            invalid.append((ref, LineOutcome(
                line.custom_id, err.status, json.dumps(envelope.model_dump()),
                err.code or err.type, err.message, None, now)))
        await records.start_lines(self.store, record.id, valid, invalid, now)

    async def _work(self, record: BatchRecord, run: Running) -> None:
        pending = await records.pending_lines(self.store, record.id)
        by_model: dict[str, list[LineRef]] = {}
        for ref in pending:
            by_model.setdefault(ref.model, []).append(ref)
        size = self.settings.chunk_size
        chunks = [(model, refs[i : i + size]) for model, refs in by_model.items()
                  for i in range(0, len(refs), size)]
        log.info("batch %s: %d lines to run in %d chunks", record.id, len(pending), len(chunks))
        async with asyncio.TaskGroup() as group:  # a bug in one chunk stops them all
            for model, refs in chunks:
                group.create_task(self._chunk(record, run, model, refs))

    async def _chunk(self, record: BatchRecord, run: Running, model: str,
                     refs: list[LineRef]) -> None:
        runner = self.host.batch_runner_for(model)
        slots = self._slots.get(runner.name)
        if slots is None:
            slots = self._slots[runner.name] = asyncio.Semaphore(max(1, runner.parallel()))
        if not await _slot(slots, run.halt):
            return
        try:
            try:
                lines = await asyncio.to_thread(self._bodies, record.input_file_id, refs)
            except (OSError, ValueError, KeyError) as e:
                for ref in refs:
                    self._accept(run, ref, None, _no_response(
                        ref, "file_error", f"the line could not be read again: {e}"))
                return
            remaining = dict(zip((r.custom_id for r in refs), zip(refs, lines)))
            for attempt in (1, 2):
                chunk = Chunk(record.id, model, [line for _, line in remaining.values()],
                              run.caller, attempt, run.draining)
                try:
                    async with contextlib.aclosing(
                            runner.run_chunk(chunk, run.cancel)) as results:
                        async for result in results:
                            found = remaining.pop(result.custom_id, None)
                            if found is None:
                                log.warning("batch %s: runner %s gave a result for %r twice "
                                            "or unasked; ignored", record.id, runner.name,
                                            result.custom_id)
                                continue
                            self._accept(run, found[0], found[1], result)
                except Exception as e:
                    log.warning("batch %s: chunk of %d %s lines died on runner %s (attempt %d):"
                                " %s", record.id, len(chunk.lines), model, runner.name,
                                attempt, e)
                if not remaining or run.halt.is_set():
                    return
            for ref, _ in remaining.values():
                self._accept(run, ref, None, _no_response(
                    ref, "runner_failed", f"runner {runner.name} failed twice on the chunk "
                    "holding this request"))
        finally:
            slots.release()

    def _bodies(self, input_file_id: str, refs: Sequence[LineRef]) -> list[BatchLine]:
        out = []
        with open(self.files.path(input_file_id), "rb") as f:
            for ref in refs:
                f.seek(ref.byte_offset)
                item = json.loads(f.read(ref.byte_length))
                if item.get("custom_id") != ref.custom_id:
                    raise ValueError("the input file changed")
                out.append(BatchLine(ref.custom_id, item["body"]))
        return out

    def _accept(self, run: Running, ref: LineRef, line: BatchLine | None,
                result: LineResult) -> None:
        """A line's one result: queued for the store, and its row in the usage ledger."""
        now = self.clock()
        body = result.body
        if result.status_code == 200 and isinstance(body, dict):
            body = {**body, "id": f"chatcmpl-{ref.request_id.removeprefix('batch_req_')}"}
        assert run.writer is not None
        run.writer.put(LineOutcome(
            ref.custom_id, result.status_code,
            json.dumps(body) if body is not None else None,
            result.error.code if result.error else None,
            result.error.message if result.error else None, result.tier, now))
        if result.status_code is None:
            return  # nothing answered it: nothing ran that could be accounted for
        self._ledger(run, ref, line, result, now)

    def _ledger(self, run: Running, ref: LineRef, line: BatchLine | None, result: LineResult,
                now: float) -> None:
        host = self.host
        usage = dict(result.usage or {})
        outcome = ("completed" if result.status_code == 200 and result.error is None
                   else "failed" if result.tier else "rejected")
        caller = run.caller
        row = UsageRow(
            request_id=ref.request_id, caller=caller.name if caller else None,
            key_id=caller.key_id if caller else None, tier=result.tier, model=result.model,
            complexity=result.complexity, route_reason=result.route_reason,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            cost_usd=host.cost(result.tier, result.model, usage) if result.tier else 0.0,
            ttft_ms=None, duration_ms=result.duration_ms, outcome=outcome,
            fallbacks=result.fallbacks, created_at=now - result.duration_ms / 1000)
        if host.settings.server.log_prompts and line is not None:
            row.prompt_text = _latest_user_text(line.body)
            row.answer_text = _answer_of(result.body) if result.status_code == 200 else None
        host.accounts.record(row)

    async def _finalize(self, record: BatchRecord, final: str) -> bool:
        """Write the output and error files and end the batch in `final`; False if its status
        changed meanwhile (it was cancelled)."""
        now = self.clock()
        moved = final != "completed" or record.status == "finalizing" or \
            await records.set_status(self.store, record.id, "finalizing",
                                     was=("in_progress",), finalizing_at=now)
        if not moved:
            return False
        caller = record.caller
        output = self.files.new(caller, "batch_output", f"{record.id}_output.jsonl")
        errors = self.files.new(caller, "batch_output", f"{record.id}_error.jsonl")
        unrun = {"cancelled": ("batch_cancelled",
                               "The batch was cancelled before this request ran."),
                 "expired": ("batch_expired", "The batch expired before this request ran.")}
        try:
            async for page in _pages(records.all_lines(self.store, record.id)):
                good, bad = [], []
                for row in page:
                    if row["state"] == "pending":
                        code, message = unrun.get(final, ("batch_incomplete",
                                                          "This request did not run."))
                        bad.append(_error_line(row, None, code, message))
                    elif row["status_code"] == 200 and row["error_code"] is None:
                        good.append(json.dumps({
                            "id": row["request_id"], "custom_id": row["custom_id"],
                            "response": {"status_code": 200, "request_id": row["request_id"],
                                         "body": json.loads(row["response"])},
                            "error": None}))
                    else:
                        response = None
                        if row["status_code"] is not None:
                            response = {"status_code": row["status_code"],
                                        "request_id": row["request_id"],
                                        "body": json.loads(row["response"])
                                        if row["response"] else None}
                        bad.append(_error_line(row, response, row["error_code"],
                                               row["error_message"]))
                await output.write(_jsonl(good))
                await errors.write(_jsonl(bad))
            placed_output, placed_errors = await output.place(), await errors.place()
        except BaseException:
            output.abandon()
            errors.abandon()
            raise
        made = [f for f in (placed_output, placed_errors) if f is not None]
        stamp = {"completed": "completed_at", "cancelled": "cancelled_at",
                 "expired": "expired_at"}[final]
        done = await records.finish(
            self.store, record.id, final, was=("finalizing", "cancelling", "in_progress"),
            made=made, output_file_id=placed_output.id if placed_output else None,
            error_file_id=placed_errors.id if placed_errors else None,
            **{stamp: self.clock()})
        if not done:
            for f in made:
                self.files.discard(f.id)
            return False
        log.info("batch %s: %s", record.id, final)
        return True


async def _slot(slots: asyncio.Semaphore, halt: asyncio.Event) -> bool:
    """Take one of a runner's slots, unless the batch halts first (then False, no slot)."""
    if halt.is_set():
        return False
    acquire = asyncio.create_task(slots.acquire())
    halted = asyncio.create_task(halt.wait())
    waited = False
    try:
        await asyncio.wait({acquire, halted}, return_when=asyncio.FIRST_COMPLETED)
        waited = True
    finally:
        halted.cancel()
        acquire.cancel()  # a no-op if it has the slot already
        await asyncio.wait({acquire})
        got = not acquire.cancelled()
        if got and (halt.is_set() or not waited):  # halted, or this task is being cancelled
            slots.release()
            got = False
    return got


async def _pages(rows: Any, size: int = 1000) -> Any:
    page: list[dict[str, Any]] = []
    async for row in rows:
        page.append(row)
        if len(page) >= size:
            yield page
            page = []
    if page:
        yield page


def _jsonl(lines: list[str]) -> bytes:
    return "".join(f"{line}\n" for line in lines).encode()


def _error_line(row: dict[str, Any], response: dict[str, Any] | None, code: str | None,
                message: str | None) -> str:
    return json.dumps({"id": row["request_id"], "custom_id": row["custom_id"],
                       "response": response,
                       "error": {"code": code or "server_error", "message": message or ""}})


def _no_response(ref: LineRef, code: str, message: str) -> LineResult:
    return LineResult(ref.custom_id, None, None, LineError(code, message), None, None, None)


def _errors_json(errors: Sequence[FileError]) -> str:
    return json.dumps({"object": "list", "data": [e.public() for e in errors]})


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > METADATA_PAIRS or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= METADATA_KEY
            and len(v) <= METADATA_VALUE for k, v in value.items()):
        raise InvalidRequest(f"metadata must be an object of at most {METADATA_PAIRS} string "
                             f"values, keys up to {METADATA_KEY} and values up to "
                             f"{METADATA_VALUE} characters", param="metadata")
    return value


def _latest_user_text(body: dict[str, Any]) -> str | None:
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            return content if isinstance(content, str) else json.dumps(content)
    return None


def _answer_of(body: dict[str, Any] | None) -> str | None:
    try:
        text = (body or {})["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    return text if isinstance(text, str) else None
