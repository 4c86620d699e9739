"""Trusted storage, seat pools, leases, the lease queue and declared requirements.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

from tessera.storage import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pending_requests",
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("activation_id", sa.String(32), nullable=False),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("request_envelope", sa.LargeBinary, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("installed_at", UTCDateTime, nullable=True),
    )
    op.create_table(
        "certificates",
        sa.Column("certificate_id", sa.String(64), primary_key=True),
        sa.Column("request_id", sa.String(128), nullable=False, unique=True),
        sa.Column("feature", sa.String(64), nullable=False, index=True),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("expires_at", UTCDateTime, nullable=True),
        sa.Column("envelope", sa.LargeBinary, nullable=False),
        sa.Column("installed_at", UTCDateTime, nullable=False),
        sa.Column("retired_at", UTCDateTime, nullable=True),
    )
    op.create_table(
        "pools",
        sa.Column("feature", sa.String(64), primary_key=True),
        sa.Column("activated", sa.Integer, nullable=False),
        sa.Column("used", sa.Integer, nullable=False),
        sa.CheckConstraint("used >= 0 AND used <= activated", name="used_within_activated"),
    )
    op.create_table(
        "leases",
        sa.Column("lease_id", sa.String(64), primary_key=True),
        sa.Column("secret_hash", sa.LargeBinary, nullable=False),
        sa.Column("feature", sa.String(64), nullable=False),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("client_host", sa.String(256), nullable=False),
        sa.Column("user", sa.String(256), nullable=False),
        sa.Column("display_name", sa.String(256), nullable=False),
        sa.Column("ttl_seconds", sa.Integer, nullable=False),
        sa.Column("epoch", sa.BigInteger, nullable=False),
        sa.Column("granted_at", UTCDateTime, nullable=False),
        sa.Column("last_heartbeat_at", UTCDateTime, nullable=False),
        sa.Column("expires_at", UTCDateTime, nullable=False),
        sa.Column("released_at", UTCDateTime, nullable=True),
        sa.Column("release_reason", sa.String(32), nullable=True),
    )
    op.create_index("leases_by_feature", "leases", ["feature"])
    op.create_index(
        "leases_held_by_expiry",
        "leases",
        ["expires_at"],
        sqlite_where=sa.text("released_at IS NULL"),
        postgresql_where=sa.text("released_at IS NULL"),
    )
    op.create_table(
        "lease_queue",
        sa.Column("ticket", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("waiter_id", sa.String(64), nullable=False, unique=True),
        sa.Column("feature", sa.String(64), nullable=False),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("client_host", sa.String(256), nullable=False),
        sa.Column("user", sa.String(256), nullable=False),
        sa.Column("display_name", sa.String(256), nullable=False),
        sa.Column("enqueued_at", UTCDateTime, nullable=False),
        sa.Column("alive_until", UTCDateTime, nullable=False),
    )
    op.create_index("lease_queue_by_feature", "lease_queue", ["feature", "ticket"])
    op.create_table(
        "requirements",
        sa.Column("client_host", sa.String(256), primary_key=True),
        sa.Column("feature", sa.String(64), primary_key=True),
        sa.Column("required", sa.Integer, nullable=False),
        sa.Column("declared_at", UTCDateTime, nullable=False),
        sa.CheckConstraint("required > 0", name="required_positive"),
    )


def downgrade() -> None:
    op.drop_index("lease_queue_by_feature", "lease_queue")
    op.drop_index("leases_held_by_expiry", "leases")
    op.drop_index("leases_by_feature", "leases")
    for table in (
        "requirements",
        "lease_queue",
        "leases",
        "pools",
        "certificates",
        "pending_requests",
    ):
        op.drop_table(table)
