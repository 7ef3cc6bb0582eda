"""`streamllm keys`: make, list and revoke the API keys kept in the store."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path
from typing import Annotated

import typer

from streamllm.config import TIERS, load_settings
from streamllm.errors import ConfigError
from streamllm.store import Store, StoreConfigError, default_url
from streamllm.store import keys as stored_keys

keys_app = typer.Typer(add_completion=False, no_args_is_help=True,
                       help="API keys kept in STREAM's store (the server's database).")

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML configuration file (else $STREAMLLM_CONFIG)."),
]


def _fail(message: str) -> None:
    typer.echo(f"streamllm keys: {message}", err=True)
    raise typer.Exit(2)


async def _open(config: Path | None) -> Store:
    try:
        settings = load_settings(config)
    except ConfigError as e:
        _fail(str(e))
    server = settings.server
    try:
        return await Store.open(server.database_url or default_url(server.data_dir))
    except StoreConfigError as e:
        _fail(f"server.database_url: {e}")
        raise  # unreachable: _fail exits


@keys_app.command()
def create(
    name: Annotated[str, typer.Option("--name", help="Who the key is for (shown in usage).")],
    budget_usd: Annotated[float | None, typer.Option(
        help="Monthly spending limit in USD (calendar month, UTC).")] = None,
    allow_tiers: Annotated[str | None, typer.Option(
        help="Comma-separated tiers the key may use, e.g. local,hpc (default: all).")] = None,
    rpm: Annotated[int | None, typer.Option(help="Requests per minute.")] = None,
    concurrency: Annotated[int | None, typer.Option(
        help="Requests in progress at once.")] = None,
    admin: Annotated[bool, typer.Option(help="May see everyone's usage.")] = False,
    config: ConfigOption = None,
) -> None:
    """Make a key and print it once: it is not kept anywhere, only its digest."""
    tiers = [t.strip() for t in allow_tiers.split(",") if t.strip()] if allow_tiers else None
    if tiers is not None and (not tiers or any(t not in TIERS for t in tiers)):
        _fail(f"--allow-tiers takes tiers from {', '.join(TIERS)}")
    for label, value in (("--budget-usd", budget_usd), ("--rpm", rpm),
                         ("--concurrency", concurrency)):
        if value is not None and value <= 0:
            _fail(f"{label} must be above 0")
    if not name.strip() or len(name) > 200:
        _fail("--name must be 1 to 200 characters")

    async def run() -> tuple[stored_keys.KeyRecord, str]:
        store = await _open(config)
        try:
            return await stored_keys.create_key(
                store, name.strip(), admin=admin, allow_tiers=tiers, budget_usd=budget_usd,
                rpm=rpm, max_concurrent=concurrency)
        finally:
            await store.close()

    record, key = asyncio.run(run())
    typer.echo(key)
    typer.echo(f"key {record.id} for {record.name}: keep it now, it cannot be shown again",
               err=True)


@keys_app.command("list")
def list_cmd(
    all_keys: Annotated[bool, typer.Option("--all", help="Include revoked keys.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines.")] = False,
    config: ConfigOption = None,
) -> None:
    """List keys (never the keys themselves: their first characters)."""

    async def run() -> list[stored_keys.KeyRecord]:
        store = await _open(config)
        try:
            return await stored_keys.list_keys(store, include_revoked=all_keys)
        finally:
            await store.close()

    for k in asyncio.run(run()):
        row = {"id": k.id, "name": k.name, "prefix": k.prefix + "…", "admin": k.admin,
               "allow_tiers": list(k.allow_tiers) if k.allow_tiers else None,
               "budget_usd": k.budget_usd, "rpm": k.rpm, "concurrency": k.max_concurrent,
               "created": dt.datetime.fromtimestamp(k.created_at, dt.UTC).isoformat(
                   timespec="seconds"),
               "revoked": k.revoked_at is not None}
        if as_json:
            typer.echo(json.dumps(row))
        else:
            limits = ", ".join(f"{label} {v}" for label, v in (
                ("tiers", ",".join(k.allow_tiers) if k.allow_tiers else None),
                ("budget $", k.budget_usd), ("rpm", k.rpm), ("concurrency", k.max_concurrent))
                if v is not None) or "no limits"
            flags = " admin" if k.admin else ""
            flags += " REVOKED" if k.revoked_at else ""
            typer.echo(f"{k.id}  {k.prefix}…  {k.name}{flags}  ({limits}; created "
                       f"{row['created']})")


@keys_app.command()
def revoke(
    key: Annotated[str, typer.Argument(help="The key's id or name (all live keys of it).")],
    config: ConfigOption = None,
) -> None:
    """Revoke keys; requests with them are refused (within server.key_cache_s)."""

    async def run() -> int:
        store = await _open(config)
        try:
            return await stored_keys.revoke_keys(store, key)
        finally:
            await store.close()

    count = asyncio.run(run())
    if count == 0:
        _fail(f"no live key has the id or name {key!r}")
    typer.echo(f"revoked {count} key{'s' if count != 1 else ''}")
