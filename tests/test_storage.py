"""Migrations: an empty database reaches head, the models match the migrated schema, and
every older revision upgrades in place without losing rows."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, select, text

from nox_api.storage.db import Database, alembic_config
from nox_api.storage.models import Base, TokenRow


def test_migrate_creates_the_schema_at_head(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'nox.db'}")
    db.migrate()
    assert db.revision() == db.head()
    assert {"tokens", "executions", "alembic_version"} <= set(inspect(db.engine).get_table_names())
    with db.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    db.migrate()  # idempotent
    db.close()


def test_models_and_migrations_agree(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'nox.db'}")
    db.migrate()
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    db.close()
    assert diff == [], f"models changed without a migration: {diff}"


def test_every_revision_upgrades_in_place_keeping_rows(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'nox.db'}")
    cfg = alembic_config(db.engine)
    revisions = list(reversed(list(ScriptDirectory.from_config(cfg).walk_revisions())))
    assert revisions, "no migrations found"
    command.upgrade(cfg, revisions[0].revision)
    now = datetime.now(UTC)
    with db.session() as s:
        s.add(
            TokenRow(
                id="t1",
                name="old",
                role="admin",
                workspace="default",
                token_hash="0" * 64,
                created_at=now,
            )
        )
    for rev in revisions[1:]:
        command.upgrade(cfg, rev.revision)
    db.migrate()
    with db.session() as s:
        row = s.scalar(select(TokenRow).where(TokenRow.id == "t1"))
        assert row is not None
        assert row.name == "old"
        assert row.created_at == now
    command.downgrade(cfg, "base")
    assert "tokens" not in inspect(db.engine).get_table_names()
    db.close()
