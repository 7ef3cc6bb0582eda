"""Revisions of the store's schema, one chain from 0001 on; Alembic skips this file."""
