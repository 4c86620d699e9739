"""Trusted storage ledger and seal; returns and repairs.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

from tessera.storage import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("pending_requests") as batch:
        batch.add_column(
            sa.Column("kind", sa.String(16), nullable=False, server_default="activate")
        )
        batch.add_column(sa.Column("certificate_id", sa.String(64), nullable=True))
    with op.batch_alter_table("certificates") as batch:
        batch.add_column(sa.Column("revision", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("withheld", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("return_request_id", sa.String(128), nullable=True))
        batch.add_column(sa.Column("returned_at", UTCDateTime, nullable=True))
        batch.add_column(sa.Column("broken_cause", sa.String(32), nullable=True))
        batch.add_column(sa.Column("broken_detail", sa.Text, nullable=True))
    op.create_table(
        "trust_ledger",
        sa.Column("sequence", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("at", UTCDateTime, nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("certificate_id", sa.String(64), nullable=True),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("previous_hash", sa.LargeBinary, nullable=False),
        sa.Column("hash", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "trust_seal",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("host_id", sa.String(32), nullable=False),
        sa.Column("host_public_key", sa.LargeBinary, nullable=False),
        sa.Column("machine_binding", sa.LargeBinary, nullable=False),
        sa.Column("head_sequence", sa.BigInteger, nullable=False),
        sa.Column("head_hash", sa.LargeBinary, nullable=False),
        sa.Column("clock_high_water", UTCDateTime, nullable=False),
        sa.Column("clock_set_back_at", UTCDateTime, nullable=True),
        sa.Column("signature", sa.LargeBinary, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("trust_seal")
    op.drop_table("trust_ledger")
    with op.batch_alter_table("certificates") as batch:
        for column in (
            "broken_detail",
            "broken_cause",
            "returned_at",
            "return_request_id",
            "withheld",
            "revision",
        ):
            batch.drop_column(column)
    with op.batch_alter_table("pending_requests") as batch:
        batch.drop_column("certificate_id")
        batch.drop_column("kind")
