"""API keys in the store: made by `streamllm keys create`, looked up by digest, revoked.

A key is shown once, when it is made; the store keeps its SHA-256 digest (keys are 256 random
bits, so a plain digest is as strong as a slow hash here and costs microseconds per request).
"""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import func, select, update

from streamllm.store.db import Store, default_url
from streamllm.store.tables import api_keys

KEY_PREFIX = "sk-stream-"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class KeyRecord:
    id: str
    name: str
    prefix: str  # the first characters of the key, for telling keys apart
    admin: bool
    allow_tiers: tuple[str, ...] | None  # none: every tier
    budget_usd: float | None  # per calendar month (UTC)
    rpm: int | None
    max_concurrent: int | None
    created_at: float
    revoked_at: float | None

    @classmethod
    def from_row(cls, row: dict) -> KeyRecord:
        tiers = row["allow_tiers"]
        return cls(id=row["id"], name=row["name"], prefix=row["prefix"], admin=row["admin"],
                   allow_tiers=tuple(tiers.split(",")) if tiers else None,
                   budget_usd=row["budget_usd"], rpm=row["rpm"],
                   max_concurrent=row["max_concurrent"], created_at=row["created_at"],
                   revoked_at=row["revoked_at"])


async def create_key(store: Store, name: str, *, admin: bool = False,
                     allow_tiers: Sequence[str] | None = None, budget_usd: float | None = None,
                     rpm: int | None = None,
                     max_concurrent: int | None = None) -> tuple[KeyRecord, str]:
    """A new key: its record and the key itself, which is not kept anywhere."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = {
        "id": uuid.uuid4().hex, "name": name, "digest": digest(key),
        "prefix": key[: len(KEY_PREFIX) + 6], "admin": admin,
        "allow_tiers": ",".join(allow_tiers) if allow_tiers else None,
        "budget_usd": budget_usd, "rpm": rpm, "max_concurrent": max_concurrent,
        "created_at": time.time(), "revoked_at": None,
    }
    async with store.engine.begin() as connection:
        await connection.execute(api_keys.insert().values(row))
    return KeyRecord.from_row(row), key


async def key_for(store: Store, key: str) -> KeyRecord | None:
    """The live (not revoked) key record for a presented key, if any."""
    query = select(api_keys).where(api_keys.c.digest == digest(key),
                                   api_keys.c.revoked_at.is_(None))
    async with store.engine.connect() as connection:
        row = (await connection.execute(query)).mappings().first()
    return KeyRecord.from_row(dict(row)) if row else None


async def key_by_id(store: Store, key_id: str) -> KeyRecord | None:
    async with store.engine.connect() as connection:
        row = (await connection.execute(
            select(api_keys).where(api_keys.c.id == key_id))).mappings().first()
    return KeyRecord.from_row(dict(row)) if row else None


async def list_keys(store: Store, include_revoked: bool = False) -> list[KeyRecord]:
    query = select(api_keys).order_by(api_keys.c.created_at)
    if not include_revoked:
        query = query.where(api_keys.c.revoked_at.is_(None))
    async with store.engine.connect() as connection:
        return [KeyRecord.from_row(dict(r)) for r in (await connection.execute(query)).mappings()]


async def revoke_keys(store: Store, name_or_id: str) -> int:
    """Revoke the live keys with this id or name; how many were revoked."""
    statement = (update(api_keys)
                 .where((api_keys.c.id == name_or_id) | (api_keys.c.name == name_or_id),
                        api_keys.c.revoked_at.is_(None))
                 .values(revoked_at=time.time()))
    async with store.engine.begin() as connection:
        return (await connection.execute(statement)).rowcount or 0


async def live_key_count(store: Store) -> int:
    query = select(func.count()).select_from(api_keys).where(api_keys.c.revoked_at.is_(None))
    async with store.engine.connect() as connection:
        return int((await connection.execute(query)).scalar_one())


async def key_count(store: Store) -> int:
    """Every key ever made, revoked ones included."""
    async with store.engine.connect() as connection:
        return int((await connection.execute(
            select(func.count()).select_from(api_keys))).scalar_one())


def keys_were_made(database_url: str | None, data_dir: str) -> bool:
    """Whether any key was ever made in the server's store (`database_url`, or SQLite in
    `data_dir`), for synchronous callers (startup checks); the store is opened, and migrated if
    new, on a thread of its own."""
    import asyncio
    import concurrent.futures

    async def count() -> int:
        store = await Store.open(database_url or default_url(data_dir))
        try:
            return await key_count(store)
        finally:
            await store.close()

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, count()).result() > 0
