"""The store's tables: the one SQLAlchemy metadata every migration and query is written against.

New tables (API keys, the usage ledger, ...) join this metadata and get their own revision in
`migrations/versions/`; `tests/test_store.py` checks the migrated schema still matches it.
"""

from __future__ import annotations

from sqlalchemy import Column, Double, Index, Integer, MetaData, String, Table, Text

# Deterministic constraint and index names: the same on SQLite and PostgreSQL, so a later
# migration can name what it drops or alters (SQLite's batch mode needs names to do that).
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

# Identifiers (tier, model, owner names) are short; String(255) keeps PostgreSQL honest about it.
NAME = 255

# Rolling conversation summaries, cached per tier: the prefix hash names the run of messages a
# summary stands for, so a later request with the same prefix reuses it instead of re-summarizing.
summaries = Table(
    "summaries",
    metadata,
    Column("tier", String(NAME), primary_key=True),
    # hex digests: 128 characters fit SHA-512, the longest digest anyone is likely to choose
    Column("prefix_hash", String(128), primary_key=True),
    Column("turns", Integer, nullable=False),
    Column("text", Text, nullable=False),
    Column("tokens", Integer, nullable=False),
    Column("method", String(32), nullable=False),
    Column("owner", String(NAME), nullable=True),
    Column("parent_hash", String(128), nullable=True),
    Column("created_at", Double, nullable=False),  # unix time, as the API hands it over
    # The cache only grows; expiring the oldest entries first is the query this serves.
    Index(None, "created_at"),
)

# Per-model calibration of the token estimator (context/tokens.py): measured tokens per
# character and per message, refined as real usage numbers come back from backends.
token_calibrations = Table(
    "token_calibrations",
    metadata,
    Column("model", String(NAME), primary_key=True),
    Column("tokens_per_char", Double, nullable=False),
    Column("tokens_per_message", Double, nullable=False),
    Column("samples", Integer, nullable=False),
    Column("updated_at", Double, nullable=False),
)
