"""Replicas and their beats; each queued client names the replica that serves it.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

from tessera.storage import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "replicas",
        sa.Column("replica_id", sa.String(64), primary_key=True),
        sa.Column("beat", sa.BigInteger, nullable=False),
        sa.Column("started_at", UTCDateTime, nullable=False),
    )
    # Rows queued before this revision keep replica_id NULL: live by alive_until alone.
    with op.batch_alter_table("lease_queue") as batch:
        batch.add_column(sa.Column("replica_id", sa.String(64), nullable=True))
    op.create_index("lease_queue_by_replica", "lease_queue", ["replica_id"])


def downgrade() -> None:
    op.drop_index("lease_queue_by_replica", "lease_queue")
    with op.batch_alter_table("lease_queue") as batch:
        batch.drop_column("replica_id")
    op.drop_table("replicas")
