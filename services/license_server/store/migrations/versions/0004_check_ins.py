"""Check-ins with the vendor and their verified results.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

from tessera.storage import UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "check_ins",
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("host_id", sa.String(32), nullable=False),
        sa.Column("request_envelope", sa.LargeBinary, nullable=False),
        sa.Column("prepared_at", UTCDateTime, nullable=False),
        sa.Column("result_envelope", sa.LargeBinary, nullable=True),
        sa.Column("checked_at", UTCDateTime, nullable=True),
        sa.Column("installed_at", UTCDateTime, nullable=True),
        sa.Column("withdraws", sa.Boolean, nullable=False, server_default=sa.false()),
    )
    op.create_index("check_ins_by_host", "check_ins", ["host_id", "checked_at"])


def downgrade() -> None:
    op.drop_table("check_ins")
