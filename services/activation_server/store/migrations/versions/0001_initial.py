"""Catalog, entitlements, activations and audit log.

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

# EBO 3.x license names (see shared/DOMAIN.md).
CATALOG = [
    ("client.station", "WorkStation / WebStation"),
    ("client.graphiceditor", "Graphics Editor"),
    ("client.script", "Script Editor"),
    ("client.functionblock.view", "Function Block viewer"),
    ("server.enterprise.central", "Enterprise Central"),
    ("server.enterprise.base", "Enterprise Server"),
    ("server.ec.es", "Enterprise Server under an Enterprise Central"),
    ("server.device.es", "Field bus device under an Enterprise Server"),
    ("server.device.as", "Device under an Automation Server"),
]


def upgrade() -> None:
    features = op.create_table(
        "features",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("description", sa.Text, nullable=False),
    )
    op.bulk_insert(features, [{"name": n, "description": d} for n, d in CATALOG])
    op.create_table(
        "entitlements",
        sa.Column("entitlement_id", sa.String(32), primary_key=True),
        sa.Column("customer_organization", sa.Text, nullable=False),
        sa.Column("contact", sa.Text, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
    )
    op.create_table(
        "entitlement_lines",
        sa.Column("activation_id", sa.String(32), primary_key=True),
        sa.Column(
            "entitlement_id",
            sa.String(32),
            sa.ForeignKey("entitlements.entitlement_id"),
            nullable=False,
            index=True,
        ),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("feature", sa.String(64), sa.ForeignKey("features.name"), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("activated", sa.Integer, nullable=False),
        sa.Column("expires_at", UTCDateTime, nullable=True),
        sa.CheckConstraint("activated >= 0 AND activated <= count", name="activated_within_count"),
        sa.CheckConstraint("count > 0", name="count_positive"),
    )
    op.create_table(
        "activations",
        sa.Column("host_id", sa.String(32), primary_key=True),
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column(
            "activation_id",
            sa.String(32),
            sa.ForeignKey("entitlement_lines.activation_id"),
            nullable=False,
            index=True,
        ),
        sa.Column("host_public_key", sa.LargeBinary, nullable=False),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("certificate_id", sa.String(64), nullable=False, unique=True),
        sa.Column("response_envelope", sa.LargeBinary, nullable=False),
        sa.Column("activated_at", UTCDateTime, nullable=False),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", UTCDateTime, nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("subject", sa.String(128), nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
    )


def downgrade() -> None:
    for table in ("audit_log", "activations", "entitlement_lines", "entitlements", "features"):
        op.drop_table(table)
