"""The Activation Server's tables: catalog, entitlements, activations, audit log."""

from __future__ import annotations

from sqlalchemy import (
    CheckConstraint,
    Column,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

from tessera.storage import UTCDateTime

metadata = MetaData()

features = Table(
    "features",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("description", Text, nullable=False),
)

entitlements = Table(
    "entitlements",
    metadata,
    Column("entitlement_id", String(32), primary_key=True),
    Column("customer_organization", Text, nullable=False),
    Column("contact", Text, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

entitlement_lines = Table(
    "entitlement_lines",
    metadata,
    Column("activation_id", String(32), primary_key=True),
    Column(
        "entitlement_id",
        String(32),
        ForeignKey("entitlements.entitlement_id"),
        nullable=False,
        index=True,
    ),
    Column("position", Integer, nullable=False),
    Column("feature", String(64), ForeignKey("features.name"), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("count", Integer, nullable=False),
    Column("activated", Integer, nullable=False),
    Column("expires_at", UTCDateTime, nullable=True),
    # The database itself refuses to activate more than was sold.
    CheckConstraint("activated >= 0 AND activated <= count", name="activated_within_count"),
    CheckConstraint("count > 0", name="count_positive"),
)

activations = Table(
    "activations",
    metadata,
    # Request ids are chosen by each host, so they are unique per host only.
    Column("host_id", String(32), primary_key=True),
    Column("request_id", String(128), primary_key=True),
    Column(
        "activation_id",
        String(32),
        ForeignKey("entitlement_lines.activation_id"),
        nullable=False,
        index=True,
    ),
    Column("host_public_key", LargeBinary, nullable=False),
    Column("count", Integer, nullable=False),
    Column("certificate_id", String(64), nullable=False, unique=True),
    # The exact signed answer, so a retried request gets the same bytes back.
    Column("response_envelope", LargeBinary, nullable=False),
    Column("activated_at", UTCDateTime, nullable=False),
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", UTCDateTime, nullable=False),
    Column("action", String(64), nullable=False),
    Column("subject", String(128), nullable=False),
    Column("detail", Text, nullable=False),
)
