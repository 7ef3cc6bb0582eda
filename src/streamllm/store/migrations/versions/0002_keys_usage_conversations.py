"""API keys, the usage ledger, web chat conversations and sessions.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("prefix", sa.String(32), nullable=False),
        sa.Column("admin", sa.Boolean(), nullable=False),
        sa.Column("allow_tiers", sa.String(255), nullable=True),
        sa.Column("budget_usd", sa.Double(), nullable=True),
        sa.Column("rpm", sa.Integer(), nullable=True),
        sa.Column("max_concurrent", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("revoked_at", sa.Double(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
        sa.UniqueConstraint("digest", name="uq_api_keys_digest"),
    )
    op.create_index("ix_api_keys_name", "api_keys", ["name"])
    op.create_table(
        "usage",
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("caller", sa.String(255), nullable=True),
        sa.Column("key_id", sa.String(32), nullable=True),
        sa.Column("tier", sa.String(32), nullable=True),
        sa.Column("model", sa.String(255), nullable=True),
        sa.Column("complexity", sa.String(16), nullable=True),
        sa.Column("route_reason", sa.String(255), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("cost_usd", sa.Double(), nullable=False),
        sa.Column("ttft_ms", sa.Double(), nullable=True),
        sa.Column("duration_ms", sa.Double(), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("fallbacks", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("prompt_text", sa.Text(), nullable=True),
        sa.Column("answer_text", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("request_id", name="pk_usage"),
    )
    op.create_index("ix_usage_caller_created_at", "usage", ["caller", "created_at"])
    op.create_index("ix_usage_created_at", "usage", ["created_at"])
    op.create_table(
        "conversations",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("caller", sa.String(255), nullable=True),
        sa.Column("title", sa.String(255), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_conversations"),
    )
    op.create_index("ix_conversations_caller_updated_at", "conversations",
                    ["caller", "updated_at"])
    op.create_table(
        "conversation_messages",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("conversation_id", sa.String(32), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("meta", sa.Text(), nullable=True),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(["conversation_id"], ["conversations.id"], ondelete="CASCADE",
                                name="fk_conversation_messages_conversation_id_conversations"),
        sa.PrimaryKeyConstraint("id", name="pk_conversation_messages"),
    )
    op.create_index("ix_conversation_messages_conversation_id", "conversation_messages",
                    ["conversation_id"])
    op.create_table(
        "ui_sessions",
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("caller", sa.String(255), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=True),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("expires_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("digest", name="pk_ui_sessions"),
    )


def downgrade() -> None:
    op.drop_table("ui_sessions")
    op.drop_index("ix_conversation_messages_conversation_id",
                  table_name="conversation_messages")
    op.drop_table("conversation_messages")
    op.drop_index("ix_conversations_caller_updated_at", table_name="conversations")
    op.drop_table("conversations")
    op.drop_index("ix_usage_created_at", table_name="usage")
    op.drop_index("ix_usage_caller_created_at", table_name="usage")
    op.drop_table("usage")
    op.drop_index("ix_api_keys_name", table_name="api_keys")
    op.drop_table("api_keys")
