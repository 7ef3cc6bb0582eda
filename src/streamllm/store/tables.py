"""The store's tables: the one SQLAlchemy metadata every migration and query is written against.

New tables (API keys, the usage ledger, ...) join this metadata and get their own revision in
`migrations/versions/`; `tests/test_store.py` checks the migrated schema still matches it.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

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

# API keys made with `streamllm keys create`. Only a SHA-256 digest of the key is kept; the
# prefix is what `keys list` shows so people can tell their keys apart.
api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(NAME), nullable=False),
    Column("digest", String(64), nullable=False, unique=True),
    Column("prefix", String(32), nullable=False),
    Column("admin", Boolean, nullable=False),
    Column("allow_tiers", String(NAME), nullable=True),  # comma-separated; none: every tier
    Column("budget_usd", Double, nullable=True),  # per calendar month (UTC); none: no budget
    Column("rpm", Integer, nullable=True),  # requests per minute; none: unlimited
    Column("max_concurrent", Integer, nullable=True),  # streams at once; none: unlimited
    Column("created_at", Double, nullable=False),
    Column("revoked_at", Double, nullable=True),
    Index(None, "name"),
)

# The usage ledger: one row per chat completion request that was routed. No prompt or answer
# text unless `server.log_prompts` is on.
usage = Table(
    "usage",
    metadata,
    Column("request_id", String(128), primary_key=True),
    Column("caller", String(NAME), nullable=True),  # the key's name, "oauth:<user>", or none
    Column("key_id", String(32), nullable=True),
    Column("tier", String(32), nullable=True),
    Column("model", String(NAME), nullable=True),
    Column("complexity", String(16), nullable=True),
    Column("route_reason", String(NAME), nullable=True),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("cost_usd", Double, nullable=False),
    Column("ttft_ms", Double, nullable=True),
    Column("duration_ms", Double, nullable=False),
    Column("outcome", String(16), nullable=False),  # completed | failed | cancelled | rejected
    Column("fallbacks", Integer, nullable=False),
    Column("created_at", Double, nullable=False),
    Column("prompt_text", Text, nullable=True),
    Column("answer_text", Text, nullable=True),
    Index("ix_usage_caller_created_at", "caller", "created_at"),
    Index(None, "created_at"),
)

# The web chat's conversations, kept server-side per caller.
conversations = Table(
    "conversations",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("caller", String(NAME), nullable=True),
    Column("title", String(NAME), nullable=False),
    Column("created_at", Double, nullable=False),
    Column("updated_at", Double, nullable=False),
    Index("ix_conversations_caller_updated_at", "caller", "updated_at"),
)

conversation_messages = Table(
    "conversation_messages",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("conversation_id", String(32),
           ForeignKey("conversations.id", ondelete="CASCADE"), nullable=False),
    Column("role", String(16), nullable=False),
    Column("content", Text, nullable=False),
    Column("meta", Text, nullable=True),  # JSON: request id, tier, model, complexity, ...
    Column("created_at", Double, nullable=False),
    Index(None, "conversation_id"),
)

# Web chat sign-ins: the browser holds a random session id in an HttpOnly cookie; only its
# digest is kept, with the key it stands for.
ui_sessions = Table(
    "ui_sessions",
    metadata,
    Column("digest", String(64), primary_key=True),
    Column("caller", String(NAME), nullable=False),
    Column("key_id", String(32), nullable=True),
    Column("created_at", Double, nullable=False),
    Column("expires_at", Double, nullable=False),
)

# Files uploaded through `POST /v1/files` (batch input) and made by batches (their output and
# error files). The bytes live in `<server.data_dir>/files/<id>`; the name is metadata only.
files = Table(
    "files",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("caller", String(NAME), nullable=True),
    Column("purpose", String(32), nullable=False),  # batch | batch_output
    Column("filename", String(NAME), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("created_at", Double, nullable=False),
    Index("ix_files_caller_created_at", "caller", "created_at"),
)

# Batches (`POST /v1/batches`): OpenAI's batch object, who owns it, and which gateway process
# runs it (`owner`, held until `lease_until` and renewed while it runs).
batches = Table(
    "batches",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("caller", String(NAME), nullable=True),
    Column("key_id", String(32), nullable=True),
    Column("rights", Text, nullable=False),  # JSON: the caller's limits, to resume with
    Column("endpoint", String(64), nullable=False),
    Column("completion_window", String(16), nullable=False),
    Column("input_file_id", String(64), nullable=False),
    Column("status", String(16), nullable=False),
    Column("meta", Text, nullable=True),  # JSON: the batch's `metadata`
    Column("errors", Text, nullable=True),  # JSON: why validation failed
    Column("output_file_id", String(64), nullable=True),
    Column("error_file_id", String(64), nullable=True),
    Column("total", Integer, nullable=False),
    Column("completed", Integer, nullable=False),
    Column("failed", Integer, nullable=False),
    Column("created_at", Double, nullable=False),
    Column("expires_at", Double, nullable=False),
    Column("in_progress_at", Double, nullable=True),
    Column("finalizing_at", Double, nullable=True),
    Column("completed_at", Double, nullable=True),
    Column("failed_at", Double, nullable=True),
    Column("expired_at", Double, nullable=True),
    Column("cancelling_at", Double, nullable=True),
    Column("cancelled_at", Double, nullable=True),
    Column("owner", String(64), nullable=True),
    Column("lease_until", Double, nullable=True),
    Index("ix_batches_caller_created_at", "caller", "created_at"),
    Index(None, "status"),
)

# One row per line of a batch's input: where the line is in the input file, and its result
# once it has one. A result is written only over `state = 'pending'`, so each custom_id gets
# exactly one, however often its chunk is retried or the batch resumed.
batch_lines = Table(
    "batch_lines",
    metadata,
    Column("batch_id", String(64), ForeignKey("batches.id", ondelete="CASCADE"),
           primary_key=True),
    Column("custom_id", String(512), primary_key=True),
    Column("line", Integer, nullable=False),  # 1-based, in the input file
    Column("request_id", String(64), nullable=False),  # batch_req_...: the ledger's id too
    Column("model", String(NAME), nullable=False),  # as the line names it
    Column("byte_offset", BigInteger, nullable=False),  # where the line is in the input file
    Column("byte_length", Integer, nullable=False),
    Column("state", String(16), nullable=False),  # pending | done
    Column("status_code", Integer, nullable=True),  # none: the line got no response
    Column("response", Text, nullable=True),  # JSON: chat.completion or error envelope
    Column("error_code", String(64), nullable=True),
    Column("error_message", Text, nullable=True),
    Column("tier", String(32), nullable=True),
    Column("finished_at", Double, nullable=True),
    Index("ix_batch_lines_batch_id_line", "batch_id", "line"),
)
