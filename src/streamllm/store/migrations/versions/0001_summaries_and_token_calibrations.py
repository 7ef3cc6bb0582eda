"""Summaries cache and per-model token calibration.

Revision ID: 0001
Revises:
Create Date: 2026-11-01

Spelled out rather than imported from tables.py: a revision is a frozen record of the schema at
that point, and must keep producing it after tables.py moves on.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "summaries",
        sa.Column("tier", sa.String(255), nullable=False),
        sa.Column("prefix_hash", sa.String(128), nullable=False),
        sa.Column("turns", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("tokens", sa.Integer(), nullable=False),
        sa.Column("method", sa.String(32), nullable=False),
        sa.Column("owner", sa.String(255), nullable=True),
        sa.Column("parent_hash", sa.String(128), nullable=True),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("tier", "prefix_hash", name="pk_summaries"),
    )
    op.create_index("ix_summaries_created_at", "summaries", ["created_at"])
    op.create_table(
        "token_calibrations",
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("tokens_per_char", sa.Double(), nullable=False),
        sa.Column("tokens_per_message", sa.Double(), nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("model", name="pk_token_calibrations"),
    )


def downgrade() -> None:
    op.drop_table("token_calibrations")
    op.drop_index("ix_summaries_created_at", table_name="summaries")
    op.drop_table("summaries")
