"""Persistence: what STREAM keeps across restarts, in SQLite by default or PostgreSQL by URL.

`Store` is the one entry point; tables live in `tables.py`, their history in `migrations/`.
"""

from streamllm.store.db import (
    Store,
    StoreConfigError,
    SummaryRecord,
    TokenCalibration,
    default_url,
)

__all__ = ["Store", "StoreConfigError", "SummaryRecord", "TokenCalibration", "default_url"]
