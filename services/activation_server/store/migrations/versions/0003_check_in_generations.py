"""Check-in policies, host generations and check-ins.

Entitlement lines gain an optional check-in policy (interval and grace, in seconds;
NULL: no check-in, as every existing line). Each repair that re-binds a host key's
licenses to another host id is recorded as a new generation of that key; check-ins of
License Servers are recorded with their exact signed results.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

from tessera.storage import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMNs: SQLite adds them in place (see 0002).
    op.add_column("entitlement_lines", sa.Column("check_in_interval_seconds", sa.BigInteger))
    op.add_column("entitlement_lines", sa.Column("check_in_grace_seconds", sa.BigInteger))
    op.create_table(
        "host_generations",
        sa.Column("host_public_key", sa.LargeBinary, primary_key=True),
        sa.Column("generation", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("host_id", sa.String(32), nullable=False),
        sa.Column("previous_host_id", sa.String(32), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("rebound_at", UTCDateTime, nullable=False),
        sa.CheckConstraint("generation > 0", name="generation_positive"),
    )
    op.create_index("ix_host_generations_host_id", "host_generations", ["host_id"])
    op.create_index(
        "ix_host_generations_previous_host_id", "host_generations", ["previous_host_id"]
    )
    op.create_table(
        "check_ins",
        sa.Column("host_id", sa.String(32), primary_key=True),
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("host_public_key", sa.LargeBinary, nullable=False),
        sa.Column("standing", sa.String(16), nullable=False),
        sa.Column("result_envelope", sa.LargeBinary, nullable=False),
        sa.Column("checked_at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_check_ins_by_host", "check_ins", ["host_id", "checked_at"])


def downgrade() -> None:
    op.drop_table("check_ins")
    op.drop_table("host_generations")
    for name in ("check_in_grace_seconds", "check_in_interval_seconds"):
        op.drop_column("entitlement_lines", name)
