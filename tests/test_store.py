"""The persistence layer on a real SQLite file and a real PostgreSQL server (skipped if absent)."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Column, Connection, Integer, MetaData, inspect, text

from streamllm.gateway import accounting
from streamllm.store import (
    Store,
    StoreConfigError,
    SummaryRecord,
    TokenCalibration,
    db,
    default_url,
)
from streamllm.store import usage as ledger
from streamllm.store.tables import metadata
from streamllm.store.usage import UsageRow

HEAD = ScriptDirectory.from_config(db.alembic_config()).get_current_head()

PG_HOST, PG_PORT, PG_DATABASE = "127.0.0.1", 5432, "test"
PG_USERS = ("postgres", "root")  # trust auth here; either role may be the one that exists


_probed: dict[str, str] = {}  # "url" or "error", once per test session


async def require_postgres() -> str:
    """The URL of the local PostgreSQL test database; skips the test, saying why, if none."""
    if not _probed:
        errors = []
        for user in PG_USERS:
            try:
                conn = await asyncpg.connect(
                    host=PG_HOST, port=PG_PORT, user=user, database=PG_DATABASE, timeout=5
                )
            except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
                errors.append(f"as {user}: {exc}")
                continue
            await conn.close()
            _probed["url"] = f"postgresql+asyncpg://{user}@{PG_HOST}:{PG_PORT}/{PG_DATABASE}"
            break
        else:
            _probed["error"] = "; ".join(errors)
    if "error" in _probed:
        pytest.skip(f"PostgreSQL not reachable at {PG_HOST}:{PG_PORT}: {_probed['error']}")
    return _probed["url"]


@dataclass(frozen=True)
class StoreURL:
    """Where a test's store lives: a URL, plus its own schema on the shared PostgreSQL."""

    url: str
    schema: str | None = None

    async def open(self) -> Store:
        return await Store.open(self.url, schema=self.schema)

    async def inspect(self, fn: Any) -> Any:
        """Run fn(sync_connection) on a connection of our own to the store's database."""
        engine = db.create_engine(db.checked_url(self.url, schema=self.schema), schema=self.schema)
        try:
            async with engine.connect() as connection:
                return await connection.run_sync(fn)
        finally:
            await engine.dispose()


@pytest.fixture
async def pg_url() -> AsyncIterator[StoreURL]:
    """A fresh schema on the PostgreSQL test database, dropped afterwards."""
    url = await require_postgres()
    schema = f"t_{uuid.uuid4().hex[:16]}"
    user = url.split("://", 1)[1].split("@", 1)[0]
    admin = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=user, database=PG_DATABASE)
    try:
        await admin.execute(f"CREATE SCHEMA {schema}")
        yield StoreURL(url, schema)
    finally:
        await admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> StoreURL:
    if request.param == "sqlite":
        return StoreURL(f"sqlite+aiosqlite:///{tmp_path / 'data' / 'streamllm.db'}")
    return request.getfixturevalue("pg_url")


@pytest.fixture
async def store(store_url: StoreURL) -> AsyncIterator[Store]:
    opened = await store_url.open()
    yield opened
    await opened.close()


def summary(prefix_hash: str = "a" * 64, **changes: Any) -> SummaryRecord:
    base = SummaryRecord(
        tier="local",
        prefix_hash=prefix_hash,
        turns=6,
        text="The user asked about Slurm; we settled on two GPU nodes.",
        tokens=14,
        method="extractive",
        owner=None,
        parent_hash=None,
        created_at=1_790_000_000.25,
    )
    return replace(base, **changes)


def calibration(model: str = "local/llama3", **changes: Any) -> TokenCalibration:
    base = TokenCalibration(
        model=model, tokens_per_char=0.27, tokens_per_message=3.5, samples=12, updated_at=1.5e9
    )
    return replace(base, **changes)


# migrations


async def test_migrations_create_the_schema_that_tables_py_describes(store_url: StoreURL) -> None:
    await (await store_url.open()).close()

    def check(connection: Connection) -> tuple[list[Any], list[Any], set[str], str | None]:
        diffs = compare_metadata(MigrationContext.configure(connection), metadata)
        # The comparison must be able to see a difference, or an empty list proves nothing.
        drifted = MetaData()
        for table in metadata.tables.values():
            table.to_metadata(drifted)
        drifted.tables["summaries"].append_column(Column("extra", Integer))
        drift = compare_metadata(MigrationContext.configure(connection), drifted)
        version = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
        return diffs, drift, set(inspect(connection).get_table_names()), version

    diffs, drift, tables, version = await store_url.inspect(check)
    assert diffs == []
    assert [d[0] for d in drift] == ["add_column"]
    assert tables == {"alembic_version", *metadata.tables}
    # One chain, and the database is at its single head.
    assert version == ScriptDirectory.from_config(db.alembic_config()).get_current_head()


async def test_opening_a_migrated_database_twice_at_once_works(store_url: StoreURL) -> None:
    first = await store_url.open()
    await first.put_summary(summary())
    await first.close()

    a, b = await asyncio.gather(store_url.open(), store_url.open())
    try:
        await a.put_calibration(calibration())
        assert await b.calibrations() == {"local/llama3": calibration()}
        assert await b.summary("local", "a" * 64) == summary()
    finally:
        await asyncio.gather(a.close(), b.close())


async def test_opening_a_fresh_database_twice_at_once_migrates_it_once(
    store_url: StoreURL,
) -> None:
    stores = await asyncio.gather(*(store_url.open() for _ in range(3)))
    try:
        await stores[0].put_summary(summary())
        assert await stores[2].summary("local", "a" * 64) == summary()
    finally:
        await asyncio.gather(*(s.close() for s in stores))
    versions = await store_url.inspect(
        lambda c: c.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    )
    assert versions == [HEAD]


# Opens the store given on the command line once told to, so that several processes migrate
# the same fresh database at the same moment.
OPEN_WHEN_TOLD = """
import asyncio, sys
from streamllm.store import Store

async def main() -> None:
    url, schema = sys.argv[1], sys.argv[2] or None
    print("ready", flush=True)
    sys.stdin.readline()
    store = await Store.open(url, schema=schema)
    await store.close()

asyncio.run(main())
"""


async def test_processes_opening_a_fresh_database_at_once_migrate_it_once(
    store_url: StoreURL,
) -> None:
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            OPEN_WHEN_TOLD,
            store_url.url,
            store_url.schema or "",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(3)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert await proc.stdout.readline() == b"ready\n"
        for proc in procs:  # all imports done: release them together
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
        outcomes = await asyncio.gather(*(proc.communicate() for proc in procs))
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    for proc, (_, stderr) in zip(procs, outcomes, strict=True):
        assert proc.returncode == 0, stderr.decode()[-2000:]
    versions = await store_url.inspect(
        lambda c: c.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    )
    assert versions == [HEAD]


# summaries


async def test_summary_round_trip_keeps_long_unicode_text(store: Store) -> None:
    long_text = "Résumé of the thread: 集群上的 vLLM, émojis 🚀🧪, quotes '\" and \\n.\n" * 5000
    rec = summary(
        text=long_text,
        tokens=123_456,
        method="model",
        owner="alice@lab",
        parent_hash="b" * 64,
        turns=40,
    )
    await store.put_summary(rec)
    assert len(long_text) > 300_000
    assert await store.summary("local", rec.prefix_hash) == rec


async def test_missing_summary_is_none(store: Store) -> None:
    await store.put_summary(summary())
    assert await store.summary("local", "f" * 64) is None
    assert await store.summary("hpc", "a" * 64) is None  # same hash, other tier


async def test_second_put_for_the_same_key_replaces_the_summary(store: Store) -> None:
    await store.put_summary(summary(text="first", turns=4))
    newer = summary(text="second, longer", turns=8, method="model", parent_hash="c" * 64)
    await store.put_summary(newer)
    assert await store.summary("local", newer.prefix_hash) == newer
    assert await store.summaries_for("local", [newer.prefix_hash]) == {newer.prefix_hash: newer}


async def test_summaries_for_returns_only_those_that_exist(store: Store) -> None:
    kept = [summary(f"{i:064x}", turns=i) for i in range(3)]
    for rec in kept:
        await store.put_summary(rec)
    await store.put_summary(summary(f"{1:064x}", tier="cloud", text="other tier"))

    # More keys than one IN (...) query carries, with repeats, mostly unknown.
    asked = [f"{i:064x}" for i in range(2 * db.LOOKUP_CHUNK + 7)] + [kept[0].prefix_hash]
    assert await store.summaries_for("local", asked) == {r.prefix_hash: r for r in kept}
    assert await store.summaries_for("local", []) == {}
    assert await store.summaries_for("hpc", asked) == {}


async def test_twenty_concurrent_puts_all_succeed(store: Store) -> None:
    same_key = [summary(text=f"version {i}", turns=i) for i in range(20)]
    distinct = [summary(f"{i:064x}", tier="hpc", turns=i) for i in range(20)]

    await asyncio.gather(*(store.put_summary(r) for r in same_key + distinct))

    assert await store.summary("local", "a" * 64) in same_key
    assert await store.summaries_for("hpc", [r.prefix_hash for r in distinct]) == {
        r.prefix_hash: r for r in distinct
    }


# token calibration


async def test_calibration_round_trip_and_upsert(store: Store) -> None:
    assert await store.calibrations() == {}
    await store.put_calibration(calibration())
    await store.put_calibration(calibration("cloud/gpt-4o", tokens_per_char=0.2512345678901234))
    assert await store.calibrations() == {
        "local/llama3": calibration(),
        "cloud/gpt-4o": calibration("cloud/gpt-4o", tokens_per_char=0.2512345678901234),
    }

    refined = calibration(tokens_per_char=0.31, tokens_per_message=4.25, samples=13, updated_at=2e9)
    await store.put_calibration(refined)
    assert (await store.calibrations())["local/llama3"] == refined
    assert len(await store.calibrations()) == 2


# lifecycle


async def test_restart_keeps_everything(store_url: StoreURL) -> None:
    first = await store_url.open()
    await first.put_summary(summary(owner="bob"))
    await first.put_calibration(calibration())
    await first.close()

    second = await store_url.open()
    try:
        assert await second.summary("local", "a" * 64) == summary(owner="bob")
        assert await second.calibrations() == {"local/llama3": calibration()}
    finally:
        await second.close()


async def test_stores_on_different_databases_are_independent(tmp_path: Path) -> None:
    one = await Store.open(default_url(str(tmp_path / "one")))
    two = await Store.open(default_url(str(tmp_path / "two")))
    try:
        await one.put_summary(summary())
        assert await two.summary("local", "a" * 64) is None
        assert await one.summary("local", "a" * 64) == summary()
    finally:
        await one.close()
        await two.close()


async def test_stores_on_different_databases_open_concurrently(tmp_path: Path) -> None:
    # Alembic keeps its running migration in process-wide globals; concurrent opens of
    # different databases (which no database lock orders) must not mix them up.
    targets = [StoreURL(default_url(str(tmp_path / f"db{i}"))) for i in range(4)]
    stores = await asyncio.gather(*(t.open() for t in targets))
    try:
        for i, store in enumerate(stores):
            await store.put_calibration(calibration(f"model-{i}"))
        for i, store in enumerate(stores):
            assert list(await store.calibrations()) == [f"model-{i}"]
    finally:
        await asyncio.gather(*(s.close() for s in stores))

    def schema(connection: Connection) -> tuple[set[str], list[str]]:
        version = connection.execute(text("SELECT version_num FROM alembic_version"))
        return set(inspect(connection).get_table_names()), list(version.scalars())

    for target in targets:
        assert await target.inspect(schema) == ({"alembic_version", *metadata.tables}, [HEAD])


async def test_sqlite_store_uses_wal_and_a_busy_timeout(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "streamllm.db"
    store = await Store.open(f"sqlite+aiosqlite:///{path}")
    await store.close()
    assert path.is_file()  # parent directories were created

    engine = db.create_engine(db.checked_url(f"sqlite+aiosqlite:///{path}"))
    try:
        async with engine.connect() as connection:
            mode = (await connection.exec_driver_sql("PRAGMA journal_mode")).scalar()
            timeout = (await connection.exec_driver_sql("PRAGMA busy_timeout")).scalar()
    finally:
        await engine.dispose()
    assert mode == "wal"
    assert timeout == db.SQLITE_BUSY_TIMEOUT_MS
    # WAL mode is a property of the file: any other client sees it too.
    with sqlite3.connect(path) as plain:
        assert plain.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_default_url_is_sqlite_in_the_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    url = default_url("~/stream-data")
    assert url == f"sqlite+aiosqlite:///{tmp_path / 'stream-data' / 'streamllm.db'}"
    assert (tmp_path / "stream-data").is_dir()


# configuration errors


@pytest.mark.parametrize(
    "url",
    [
        "mysql+aiomysql://user:pw@localhost/stream",
        "sqlite:///streamllm.db",  # the blocking driver
        "postgresql://postgres@localhost/test",  # the blocking driver
        "not a url at all",
    ],
)
async def test_unsupported_url_raises_value_error(url: str) -> None:
    with pytest.raises(ValueError, match="sqlite\\+aiosqlite:///.*postgresql\\+asyncpg://"):
        await Store.open(url)


async def test_in_memory_sqlite_and_sqlite_schema_are_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreConfigError, match="file path"):
        await Store.open("sqlite+aiosqlite://")
    with pytest.raises(StoreConfigError, match="file path"):
        await Store.open("sqlite+aiosqlite:///:memory:")
    with pytest.raises(StoreConfigError, match="PostgreSQL"):
        await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}", schema="t_x")


async def test_url_property_masks_the_password(pg_url: StoreURL) -> None:
    # Trust authentication ignores the password, so the store really opens with it.
    with_password = pg_url.url.replace("@", ":s3cr3t-pw@", 1)
    store = await Store.open(with_password, schema=pg_url.schema)
    try:
        assert "s3cr3t-pw" not in store.url
        assert store.url == with_password.replace("s3cr3t-pw", "***")
    finally:
        await store.close()


async def test_url_property_of_a_sqlite_store_is_its_url(tmp_path: Path) -> None:
    url = default_url(str(tmp_path))
    store = await Store.open(url)
    try:
        assert store.url == url
    finally:
        await store.close()


# the usage ledger's writer


def usage_row(request_id: str) -> UsageRow:
    return UsageRow(
        request_id=request_id, caller="alice", key_id=None, tier="local", model="m",
        complexity="LOW", route_reason="test", prompt_tokens=3, completion_tokens=5,
        cost_usd=0.0, ttft_ms=1.0, duration_ms=2.0, outcome="completed", fallbacks=0,
        created_at=1_790_000_000.0)


async def test_stopping_the_ledger_while_it_writes_keeps_every_row(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    # The background writer is held inside a write when the gateway stops. Cancelling it
    # there lost the rows it had taken (seen as a batch's usage rows missing after a restart).
    real_insert = ledger.insert_rows
    writing, go_on = asyncio.Event(), asyncio.Event()

    async def held_insert(target: Store, rows: Any) -> None:
        writing.set()
        await go_on.wait()
        await real_insert(target, rows)

    monkeypatch.setattr(accounting.ledger, "insert_rows", held_insert)
    accounts = accounting.Accounts(store, everyone_budget=None)
    accounts.start()
    for i in range(3):
        accounts.record(usage_row(f"req-{i}"))
    await writing.wait()  # the writer has taken the rows and is writing them
    stopping = asyncio.create_task(accounts.stop())
    go_on.set()
    await stopping
    for i in range(3):
        assert await ledger.row_for(store, f"req-{i}") == usage_row(f"req-{i}")
