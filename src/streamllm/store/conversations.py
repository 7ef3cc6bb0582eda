"""The web chat's conversations and messages, kept per caller; and its sign-in sessions."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, select, update

from streamllm.store.db import Store
from streamllm.store.tables import conversation_messages, conversations, ui_sessions


@dataclass(frozen=True)
class Conversation:
    id: str
    title: str
    created: int
    updated: int
    messages: int


def _owned(caller: str | None):
    return (conversations.c.caller.is_(None) if caller is None
            else conversations.c.caller == caller)


async def create(store: Store, caller: str | None, title: str) -> Conversation:
    now = time.time()
    row = {"id": uuid.uuid4().hex, "caller": caller, "title": title, "created_at": now,
           "updated_at": now}
    async with store.engine.begin() as connection:
        await connection.execute(conversations.insert().values(row))
    return Conversation(row["id"], title, int(now), int(now), 0)


async def listing(store: Store, caller: str | None, limit: int = 200) -> list[Conversation]:
    count = (select(func.count()).where(
        conversation_messages.c.conversation_id == conversations.c.id)
        .scalar_subquery())
    query = (select(conversations, count.label("n")).where(_owned(caller))
             .order_by(conversations.c.updated_at.desc()).limit(limit))
    async with store.engine.connect() as connection:
        rows = (await connection.execute(query)).mappings()
        return [Conversation(r["id"], r["title"], int(r["created_at"]), int(r["updated_at"]),
                             int(r["n"])) for r in rows]


async def get(store: Store, caller: str | None,
              conversation_id: str) -> tuple[Conversation, list[dict[str, Any]]] | None:
    async with store.engine.connect() as connection:
        head = (await connection.execute(select(conversations).where(
            conversations.c.id == conversation_id, _owned(caller)))).mappings().first()
        if head is None:
            return None
        rows = (await connection.execute(
            select(conversation_messages)
            .where(conversation_messages.c.conversation_id == conversation_id)
            .order_by(conversation_messages.c.id))).mappings()
        messages = [{"role": r["role"], "content": r["content"], "created": int(r["created_at"]),
                     "meta": json.loads(r["meta"]) if r["meta"] else None} for r in rows]
    conv = Conversation(head["id"], head["title"], int(head["created_at"]),
                        int(head["updated_at"]), len(messages))
    return conv, messages


async def owns(store: Store, caller: str | None, conversation_id: str) -> bool:
    async with store.engine.connect() as connection:
        found = (await connection.execute(select(conversations.c.id).where(
            conversations.c.id == conversation_id, _owned(caller)))).first()
    return found is not None


async def rename(store: Store, caller: str | None, conversation_id: str, title: str) -> bool:
    async with store.engine.begin() as connection:
        done = await connection.execute(
            update(conversations).where(conversations.c.id == conversation_id, _owned(caller))
            .values(title=title, updated_at=time.time()))
    return bool(done.rowcount)


async def remove(store: Store, caller: str | None, conversation_id: str) -> bool:
    async with store.engine.begin() as connection:
        if not (await connection.execute(select(conversations.c.id).where(
                conversations.c.id == conversation_id, _owned(caller)))).first():
            return False
        # Explicit, not only ON DELETE CASCADE: SQLite enforces it only with foreign keys on.
        await connection.execute(delete(conversation_messages).where(
            conversation_messages.c.conversation_id == conversation_id))
        await connection.execute(delete(conversations).where(
            conversations.c.id == conversation_id))
    return True


async def append(store: Store, conversation_id: str,
                 messages: list[tuple[str, str, dict[str, Any] | None]]) -> None:
    """Add (role, content, meta) messages, in order."""
    now = time.time()
    async with store.engine.begin() as connection:
        for i, (role, content, meta) in enumerate(messages):
            await connection.execute(conversation_messages.insert().values(
                conversation_id=conversation_id, role=role, content=content,
                meta=json.dumps(meta) if meta else None, created_at=now + i * 1e-6))
        await connection.execute(update(conversations).where(
            conversations.c.id == conversation_id).values(updated_at=now))


# -- sign-in sessions -------------------------------------------------------------------------


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def open_session(store: Store, caller: str, key_id: str | None, ttl_s: float) -> str:
    token = secrets.token_urlsafe(32)
    now = time.time()
    async with store.engine.begin() as connection:
        await connection.execute(ui_sessions.insert().values(
            digest=_digest(token), caller=caller, key_id=key_id, created_at=now,
            expires_at=now + ttl_s))
        # Expired sessions are dropped as new ones are made: the table stays small.
        await connection.execute(delete(ui_sessions).where(ui_sessions.c.expires_at < now))
    return token


async def session(store: Store, token: str) -> tuple[str, str | None] | None:
    """(caller, key id) of a live session."""
    async with store.engine.connect() as connection:
        row = (await connection.execute(select(ui_sessions).where(
            ui_sessions.c.digest == _digest(token),
            ui_sessions.c.expires_at > time.time()))).mappings().first()
    return (row["caller"], row["key_id"]) if row else None


async def close_session(store: Store, token: str) -> None:
    async with store.engine.begin() as connection:
        await connection.execute(delete(ui_sessions).where(
            ui_sessions.c.digest == _digest(token)))
