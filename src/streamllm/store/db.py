"""The store: one async SQLAlchemy engine over SQLite or PostgreSQL, migrated when it opens.

Owns checking the database URL, engine setup (SQLite pragmas, PostgreSQL schema), running the
Alembic migrations, and the typed reads and writes of summaries and token calibrations.
"""

from __future__ import annotations

import asyncio
import importlib.util
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Table, event, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from streamllm.store.tables import summaries, token_calibrations

SQLITE = "sqlite+aiosqlite"
POSTGRESQL = "postgresql+asyncpg"
URL_FORMS = f"{SQLITE}:///path/to/streamllm.db or {POSTGRESQL}://user:password@host:5432/dbname"

# Where Alembic finds env.py and versions/: a package resource, so it resolves inside an
# installed (non-editable) streamllm just as in a checkout.
MIGRATIONS = "streamllm.store:migrations"

# Many concurrent requests write through one SQLite file; a writer waits this long for the
# lock instead of failing at once with "database is locked".
SQLITE_BUSY_TIMEOUT_MS = 30_000

# pg_advisory_xact_lock key held while migrating, so that processes opening one database at
# the same time take turns. It locks the whole database, whichever schema; any constant
# works, this one spells "STREAM" in ASCII.
POSTGRESQL_MIGRATION_LOCK = 0x53_54_52_45_41_4D

# Execution option read by the SQLite "begin" hook: which BEGIN statement opens a transaction.
SQLITE_BEGIN_OPTION = "streamllm_sqlite_begin"

# Keys per IN (...) query: far below SQLite's and asyncpg's bound-parameter limits.
LOOKUP_CHUNK = 500


class StoreConfigError(ValueError):
    """The store's URL or options cannot work; the message is meant for the user's config."""


@dataclass(frozen=True)
class SummaryRecord:
    tier: str
    prefix_hash: str  # hex digest identifying the summarized message prefix
    turns: int  # how many messages of the conversation it summarizes
    text: str
    tokens: int  # estimated tokens of `text`
    method: str  # "model" or "extractive"
    owner: str | None  # API key holder name, None in single-user mode
    parent_hash: str | None  # prefix_hash of the summary this one extended, if any
    created_at: float  # unix time


@dataclass(frozen=True)
class TokenCalibration:
    model: str
    tokens_per_char: float
    tokens_per_message: float
    samples: int
    updated_at: float


def default_url(data_dir: str) -> str:
    """The SQLite store inside `data_dir` (created if missing; `~` expanded)."""
    directory = Path(data_dir).expanduser().absolute()
    directory.mkdir(parents=True, exist_ok=True)
    return f"{SQLITE}:///{directory / 'streamllm.db'}"


def checked_url(url: str, *, schema: str | None = None) -> URL:
    """Parse `url` and refuse what the store cannot open, with a message fit for a config file."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        # Not echoed: an unparsable URL may still contain a password.
        raise StoreConfigError(f"store URL is not a database URL; use {URL_FORMS}") from None
    if parsed.drivername == SQLITE:
        if schema is not None:
            raise StoreConfigError("a schema can only be chosen for a PostgreSQL store")
        if parsed.database in (None, "", ":memory:"):
            # An in-memory database lives in one shared connection, which concurrent requests'
            # transactions would interleave on; a store needs a file.
            raise StoreConfigError(f"a SQLite store needs a file path: {SQLITE}:///path/to/db")
        return parsed.set(database=str(Path(parsed.database).expanduser()))
    if parsed.drivername == POSTGRESQL:
        if importlib.util.find_spec("asyncpg") is None:
            raise StoreConfigError(
                "a PostgreSQL store needs the asyncpg driver: pip install 'streamllm[postgres]'"
            )
        return parsed
    raise StoreConfigError(f"unsupported store URL scheme {parsed.drivername!r}; use {URL_FORMS}")


def create_engine(url: URL, *, schema: str | None = None) -> AsyncEngine:
    """An engine for a URL that `checked_url` accepted, set up for concurrent use."""
    if url.drivername == SQLITE:
        assert url.database is not None
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url)
        _prepare_sqlite(engine)
        return engine
    connect_args: dict[str, Any] = {}
    if schema is not None:
        connect_args["server_settings"] = {"search_path": schema}
    # pre_ping: after a PostgreSQL restart the pool would otherwise hand out dead connections.
    return create_async_engine(url, connect_args=connect_args, pool_pre_ping=True)


def _prepare_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # The sqlite3 driver opens transactions only before DML, so DDL (migrations) would run
        # unprotected; hand BEGIN to SQLAlchemy instead (on_begin below).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            # busy_timeout first: switching a fresh file to WAL needs a lock that another
            # opener may hold for a moment.
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            # WAL: readers no longer block the writer nor the writer readers.
            cursor.execute("PRAGMA journal_mode = WAL")
            # Off by default in SQLite; on so that later tables' foreign keys mean what they
            # mean on PostgreSQL.
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def on_begin(connection: Connection) -> None:
        connection.exec_driver_sql(
            connection.get_execution_options().get(SQLITE_BEGIN_OPTION, "BEGIN")
        )


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration for the store's migrations, without any ini file.

    With `connection`, env.py migrates on it; without, set the `sqlalchemy.url` main option
    (e.g. to write the next revision: `command.revision(cfg, message, autogenerate=True)`).
    """
    config = Config()
    config.set_main_option("script_location", MIGRATIONS)
    if connection is not None:
        config.attributes["connection"] = connection
    return config


# Alembic keeps the migration it is running in module globals (alembic.context, alembic.op):
# two migrations interleaving in one process, even of different databases, would run each
# other's operations on the wrong connection. So each one runs alone, under this lock.
_ALEMBIC_LOCK = threading.Lock()


async def migrate(url: URL, *, schema: str | None = None) -> None:
    """Bring the database up to the newest revision; a no-op when it is there already.

    Alembic's command API is synchronous and not re-entrant, so it runs in a worker thread,
    one at a time (_ALEMBIC_LOCK), on an engine and event loop of its own: the caller's loop
    is never blocked, not even by Alembic reading its revision files. Running it with run_sync
    on the caller's loop instead would let concurrent opens interleave inside Alembic's globals.
    """
    await asyncio.to_thread(_migrate_alone, url, schema)


def _migrate_alone(url: URL, schema: str | None) -> None:
    with _ALEMBIC_LOCK:
        asyncio.run(_migrate_with_own_engine(url, schema))


async def _migrate_with_own_engine(url: URL, schema: str | None) -> None:
    engine = create_engine(url, schema=schema)
    try:
        async with engine.connect() as connection:
            if engine.dialect.name == "sqlite":
                # IMMEDIATE takes the write lock up front, so another process opening the same
                # file waits, then finds the schema current instead of creating it twice.
                await connection.execution_options(**{SQLITE_BEGIN_OPTION: "BEGIN IMMEDIATE"})
            async with connection.begin():
                if engine.dialect.name == "postgresql":
                    await connection.execute(
                        text("SELECT pg_advisory_xact_lock(:key)"),
                        {"key": POSTGRESQL_MIGRATION_LOCK},
                    )
                # The whole upgrade, version check included, is this one transaction.
                await connection.run_sync(
                    lambda sync: command.upgrade(alembic_config(sync), "head")
                )
    finally:
        await engine.dispose()


class Store:
    """Persistent state shared by the gateway's requests; any number of stores per process."""

    def __init__(self, engine: AsyncEngine, url: URL) -> None:
        """Use `await Store.open(url)`; this wraps an engine whose database is migrated."""
        self._engine = engine
        self._url = url
        # Both dialects spell the upsert alike (ON CONFLICT ... DO UPDATE) with their own class.
        self._insert: Callable[[Table], postgresql.Insert | sqlite.Insert] = (
            postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
        )

    @classmethod
    async def open(cls, url: str, *, schema: str | None = None) -> Store:
        """Connect to `url`, migrate it to the newest schema, and return a ready store.

        `schema` (PostgreSQL only) keeps the tables in that existing schema instead of the
        server's default search_path: several deployments, or tests, can share one database.
        Raises StoreConfigError (a ValueError) for a URL the store cannot use.
        """
        parsed = checked_url(url, schema=schema)
        await migrate(parsed, schema=schema)
        return cls(create_engine(parsed, schema=schema), parsed)

    async def close(self) -> None:
        await self._engine.dispose()

    @property
    def engine(self) -> AsyncEngine:
        """For the store's sibling modules (keys, usage, conversations), not for callers."""
        return self._engine

    @property
    def dialect(self) -> str:
        return self._engine.dialect.name

    def insert(self, table: Table) -> postgresql.Insert | sqlite.Insert:
        """INSERT that can take ON CONFLICT clauses on either database."""
        return self._insert(table)

    @property
    def url(self) -> str:
        """The database URL with any password masked: safe for logs and health pages."""
        return self._url.render_as_string(hide_password=True)

    # summaries

    async def put_summary(self, rec: SummaryRecord) -> None:
        """Save `rec`, replacing any summary with the same (tier, prefix_hash)."""
        await self._upsert(summaries, asdict(rec))

    async def summaries_for(
        self, tier: str, prefix_hashes: Sequence[str]
    ) -> dict[str, SummaryRecord]:
        """The summaries that exist among `prefix_hashes`, keyed by prefix_hash."""
        wanted = list(dict.fromkeys(prefix_hashes))
        found: dict[str, SummaryRecord] = {}
        async with self._engine.connect() as connection:
            for start in range(0, len(wanted), LOOKUP_CHUNK):
                query = select(summaries).where(
                    summaries.c.tier == tier,
                    summaries.c.prefix_hash.in_(wanted[start : start + LOOKUP_CHUNK]),
                )
                for row in (await connection.execute(query)).mappings():
                    found[row["prefix_hash"]] = SummaryRecord(**row)
        return found

    async def summary(self, tier: str, prefix_hash: str) -> SummaryRecord | None:
        return (await self.summaries_for(tier, [prefix_hash])).get(prefix_hash)

    # token calibration

    async def calibrations(self) -> dict[str, TokenCalibration]:
        """Every model's calibration, keyed by model name."""
        async with self._engine.connect() as connection:
            rows = (await connection.execute(select(token_calibrations))).mappings()
            return {row["model"]: TokenCalibration(**row) for row in rows}

    async def put_calibration(self, cal: TokenCalibration) -> None:
        """Save `cal`, replacing the model's previous calibration."""
        await self._upsert(token_calibrations, asdict(cal))

    async def _upsert(self, table: Table, values: Mapping[str, Any]) -> None:
        # One INSERT ... ON CONFLICT DO UPDATE statement: atomic on both databases, so racing
        # writers of one key never see a duplicate-key error; the last one wins.
        insert: postgresql.Insert | sqlite.Insert = self._insert(table).values(values)
        key = [column.name for column in table.primary_key.columns]
        statement = insert.on_conflict_do_update(
            index_elements=key,
            set_={name: insert.excluded[name] for name in values if name not in key},
        )
        async with self._engine.begin() as connection:
            await connection.execute(statement)
