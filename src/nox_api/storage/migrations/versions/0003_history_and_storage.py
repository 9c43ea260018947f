"""history filter and stats indexes; what each workspace stores (workspace_storage)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "workspace_storage",
        sa.Column("workspace", sa.String(length=64), nullable=False),
        sa.Column("files", sa.BigInteger(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("scanned_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("workspace"),
    )
    with op.batch_alter_table("executions", schema=None) as batch_op:
        batch_op.create_index(
            "ix_executions_workspace_status", ["workspace", "status", "started_at"], unique=False
        )
        batch_op.create_index(
            "ix_executions_workspace_kind", ["workspace", "kind", "started_at"], unique=False
        )
        batch_op.create_index(
            "ix_executions_workspace_duration", ["workspace", "duration_ms"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("executions", schema=None) as batch_op:
        batch_op.drop_index("ix_executions_workspace_duration")
        batch_op.drop_index("ix_executions_workspace_kind")
        batch_op.drop_index("ix_executions_workspace_status")
    op.drop_table("workspace_storage")
