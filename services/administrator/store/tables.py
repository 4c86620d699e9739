"""The Administrator's tables: the journal of operations, and the registration details."""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    false,
    text,
)

from tessera.storage import UTCDateTime

metadata = MetaData()

operations = Table(
    "operations",
    metadata,
    Column("operation_id", String(128), primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("state", String(16), nullable=False),
    Column("license_server", Text, nullable=False),
    Column("host_id", String(32), nullable=False),
    Column("activation_id", String(32), nullable=False),
    Column("count", Integer, nullable=False),
    # The request id the License Server signed (a move: the request id of its return;
    # a move's request envelope is empty, its halves hold theirs).
    Column("request_id", String(128), nullable=False),
    Column("request_envelope", LargeBinary, nullable=False),
    Column("response_envelope", LargeBinary, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("certificate_id", String(64), nullable=False, server_default=text("''")),
    Column("offline", Boolean, nullable=False, server_default=false()),
    Column("force", Boolean, nullable=False, server_default=false()),
    Column("revoked_leases", Integer, nullable=False, server_default=text("0")),
    # The License Server's answer to the install step, as it was returned the first time.
    Column("result", LargeBinary, nullable=True),
    Column("last_error", Text, nullable=False, server_default=text("''")),
    Column("last_error_code", String(32), nullable=False, server_default=text("''")),
    # A move's halves (its return and its activation) name the move; '' otherwise.
    Column("parent_operation_id", String(128), nullable=False, server_default=text("''")),
    Index("ix_operations_created_at", "created_at"),
    Index("ix_operations_state", "state"),
    Index("ix_operations_parent_operation_id", "parent_operation_id"),
)

# One row: the registration details sent to the vendor with every activation.
registration = Table(
    "registration",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("organization", Text, nullable=False),
    Column("contact_name", Text, nullable=False),
    Column("email", Text, nullable=False),
    Column("phone", Text, nullable=False),
    Column("site", Text, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    CheckConstraint("id = 1", name="ck_registration_one_row"),
)
