"""The Activation Server's tables: catalog, entitlements, activations, returns, repairs and
the hash-chained audit log."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    false,
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
    # Licenses expire this many seconds after each activation (whole seconds).
    Column("duration_seconds", BigInteger, nullable=True),
    Column("maintenance_ends_at", UTCDateTime, nullable=True),
    Column("partial_return_allowed", Boolean, nullable=False, server_default=false()),
    # The check-in policy (whole seconds); NULL interval: no check-in.
    Column("check_in_interval_seconds", BigInteger, nullable=True),
    Column("check_in_grace_seconds", BigInteger, nullable=True),
    # The database itself refuses to activate more than was sold.
    CheckConstraint("activated >= 0 AND activated <= count", name="activated_within_count"),
    CheckConstraint("count > 0", name="count_positive"),
)

activations = Table(
    "activations",
    metadata,
    # The request that brought the seats: request ids are chosen by each host, so they
    # are unique per host only. Never changes; holder_host_id says who holds them now.
    Column("host_id", String(32), primary_key=True),
    Column("request_id", String(128), primary_key=True),
    Column(
        "activation_id",
        String(32),
        ForeignKey("entitlement_lines.activation_id"),
        nullable=False,
        index=True,
    ),
    # The key that signed the activation; returns and repairs must be signed by it too.
    Column("host_public_key", LargeBinary, nullable=False),
    # Seats the host holds now (0 once returned).
    Column("count", Integer, nullable=False),
    Column("certificate_id", String(64), nullable=False, unique=True),
    # The exact signed answer, so a retried request gets the same bytes back.
    Column("response_envelope", LargeBinary, nullable=False),
    Column("activated_at", UTCDateTime, nullable=False),
    Column("holder_host_id", String(32), nullable=False, index=True),
    Column("activated_count", Integer, nullable=False),
    Column("revision", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    # The current certificate (a signed LicenseCertificate at ``revision``).
    Column("certificate_envelope", LargeBinary, nullable=False),
    Column("returned_at", UTCDateTime, nullable=True),
    # The operator's registration details, as JSON.
    Column("registration", Text, nullable=True),
    CheckConstraint("count >= 0 AND count <= activated_count", name="held_within_activated"),
)

return_receipts = Table(
    "return_receipts",
    metadata,
    # The return request: (host id, request id) is its idempotency key.
    Column("host_id", String(32), primary_key=True),
    Column("request_id", String(128), primary_key=True),
    Column("certificate_id", String(64), nullable=False, index=True),
    Column("count", Integer, nullable=False),
    Column("revision", Integer, nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("credited", Integer, nullable=False),
    Column("entitlement_id", String(32), nullable=False),
    # The exact signed receipt, so a retried request gets the same bytes back.
    Column("receipt_envelope", LargeBinary, nullable=False),
    Column("decided_at", UTCDateTime, nullable=False),
    Index("ix_return_receipts_cycling", "entitlement_id", "outcome", "decided_at"),
)

repairs = Table(
    "repairs",
    metadata,
    # The repair request: (host id now, request id) is its idempotency key.
    Column("host_id", String(32), primary_key=True),
    Column("request_id", String(128), primary_key=True),
    Column("host_public_key", LargeBinary, nullable=False),
    # The host id whose certificates were re-issued (the request's, or its previous one).
    Column("previous_host_id", String(32), nullable=False),
    # The exact signed answer, so a retried request gets the same bytes back.
    Column("response_envelope", LargeBinary, nullable=False),
    Column("repaired_at", UTCDateTime, nullable=False),
    Index("ix_repairs_by_key", "host_public_key", "repaired_at"),
)

# One row per host key that asked for a repair, locked while its repair is decided so
# that concurrent repairs of one host count against its limit one at a time.
repair_hosts = Table(
    "repair_hosts",
    metadata,
    Column("host_public_key", LargeBinary, primary_key=True),
)

# Every re-binding of a host key's licenses to another host id (a repair after the
# machine changed, or on a copy of the License Server elsewhere): generation n of the key
# is the host its n-th re-binding went to; it supersedes previous_host_id.
host_generations = Table(
    "host_generations",
    metadata,
    Column("host_public_key", LargeBinary, primary_key=True),
    Column("generation", Integer, primary_key=True, autoincrement=False),
    Column("host_id", String(32), nullable=False, index=True),
    Column("previous_host_id", String(32), nullable=False, index=True),
    # The repair that re-bound them.
    Column("request_id", String(128), nullable=False),
    Column("rebound_at", UTCDateTime, nullable=False),
    CheckConstraint("generation > 0", name="generation_positive"),
)

# Check-ins of License Servers: (host id, request id) is the idempotency key.
check_ins = Table(
    "check_ins",
    metadata,
    Column("host_id", String(32), primary_key=True),
    Column("request_id", String(128), primary_key=True),
    Column("host_public_key", LargeBinary, nullable=False),
    # current or superseded.
    Column("standing", String(16), nullable=False),
    # The exact signed result, so a retried check-in gets the same bytes back.
    Column("result_envelope", LargeBinary, nullable=False),
    Column("checked_at", UTCDateTime, nullable=False),
    Index("ix_check_ins_by_host", "host_id", "checked_at"),
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("sequence", BigInteger, primary_key=True, autoincrement=False),
    Column("at", UTCDateTime, nullable=False),
    Column("action", String(64), nullable=False),
    Column("subject", String(128), nullable=False, index=True),
    Column("actor", String(64), nullable=False),
    # Canonical JSON (sorted keys, compact separators).
    Column("detail", Text, nullable=False),
    Column("previous_hash", LargeBinary, nullable=False),
    Column("hash", LargeBinary, nullable=False),
)

# The newest audit entry's sequence and hash, in one row. Appending locks and moves it in
# the same transaction, which serializes appends across transactions and replicas; and a
# deleted tail of the log no longer matches it.
audit_head = Table(
    "audit_head",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("sequence", BigInteger, nullable=False),
    Column("hash", LargeBinary, nullable=False),
    CheckConstraint("id = 1", name="one_head"),
)
