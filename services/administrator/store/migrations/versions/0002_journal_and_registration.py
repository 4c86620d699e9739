"""Journal every kind of operation (return, repair, move, offline); registration details.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

from tessera.storage import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

EMPTY = sa.text("''")


def new_columns() -> list[sa.Column[object]]:
    # Fresh objects each time: a Column attaches to the table it is added to.
    return [
        sa.Column("certificate_id", sa.String(64), nullable=False, server_default=EMPTY),
        sa.Column("offline", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("force", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("target_license_server", sa.Text, nullable=False, server_default=EMPTY),
        sa.Column("target_host_id", sa.String(32), nullable=False, server_default=EMPTY),
        sa.Column("target_request_id", sa.String(128), nullable=False, server_default=EMPTY),
        sa.Column("target_request_envelope", sa.LargeBinary, nullable=True),
        sa.Column("target_response_envelope", sa.LargeBinary, nullable=True),
        sa.Column("revoked_leases", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("result", sa.LargeBinary, nullable=True),
        sa.Column("last_error", sa.Text, nullable=False, server_default=EMPTY),
        sa.Column("last_error_code", sa.String(32), nullable=False, server_default=EMPTY),
    ]


def upgrade() -> None:
    with op.batch_alter_table("operations") as batch:
        for column in new_columns():
            batch.add_column(column)
        batch.create_index("ix_operations_created_at", ["created_at"])
        batch.create_index("ix_operations_state", ["state"])
    op.create_table(
        "registration",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("organization", sa.Text, nullable=False),
        sa.Column("contact_name", sa.Text, nullable=False),
        sa.Column("email", sa.Text, nullable=False),
        sa.Column("phone", sa.Text, nullable=False),
        sa.Column("site", sa.Text, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.CheckConstraint("id = 1", name="ck_registration_one_row"),
    )


def downgrade() -> None:
    op.drop_table("registration")
    with op.batch_alter_table("operations") as batch:
        batch.drop_index("ix_operations_state")
        batch.drop_index("ix_operations_created_at")
        for column in reversed(new_columns()):
            batch.drop_column(column.name)
