"""Alembic environment: runs against the engine the server hands over (never a URL in a file)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from nox_api.storage.models import Base

# Servers started together on one PostgreSQL database migrate one after the other: the lock is
# held until the migration's transaction ends, and the next one then finds the schema at head
# (without it, each creates the tables and all but one fail on a duplicate key).
_PG_MIGRATION_LOCK = 0x6E6F785F6D6967  # any constant; "nox_mig"

engine = context.config.attributes["engine"]
with engine.begin() as connection:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    context.run_migrations()
