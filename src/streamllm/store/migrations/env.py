"""Alembic environment of the store: runs the revisions on the connection it is handed.

`Store.open` (db.migrate) passes an open connection in `config.attributes["connection"]`,
inside a transaction that holds the database's migration lock. Without one (Alembic's command
API used by hand, e.g. to autogenerate the next revision), `sqlalchemy.url` names the database
and this file opens an async engine for it.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from streamllm.store.tables import metadata

config = context.config


def run_on(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds tables so later revisions
        # written with op.batch_alter_table run on both databases.
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_with_own_engine(url: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(run_on)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("the store's migrations run against a database, not as SQL scripts")

shared = config.attributes.get("connection")
if shared is not None:
    run_on(shared)
else:
    asyncio.run(run_with_own_engine(config.get_main_option("sqlalchemy.url") or ""))
