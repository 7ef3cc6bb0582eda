"""Alembic migrations of the store: `env.py`, the revision template and `versions/`.

A package (not a loose folder) so that it ships inside the installed distribution and Alembic
finds it as `streamllm.store:migrations`, wherever streamllm is installed.
"""
