"""The License Server's tables: trusted storage (requests, certificates), pools, leases."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
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

# Activation requests this host signed, awaiting (or having received) the vendor's answer.
pending_requests = Table(
    "pending_requests",
    metadata,
    Column("request_id", String(128), primary_key=True),
    Column("activation_id", String(32), nullable=False),
    Column("count", Integer, nullable=False),
    Column("request_envelope", LargeBinary, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    # When the vendor's answer was installed (activate, repair) or the receipt (return).
    Column("installed_at", UTCDateTime, nullable=True),
    # activate, return or repair.
    Column("kind", String(16), nullable=False, server_default="activate"),
    # The certificate a return is about.
    Column("certificate_id", String(64), nullable=True),
)

# Vendor-signed certificates in trusted storage, kept as the exact envelope bytes.
certificates = Table(
    "certificates",
    metadata,
    Column("certificate_id", String(64), primary_key=True),
    Column("request_id", String(128), nullable=False, unique=True),
    Column("feature", String(64), nullable=False, index=True),
    Column("count", Integer, nullable=False),
    Column("expires_at", UTCDateTime, nullable=True),
    Column("envelope", LargeBinary, nullable=False),
    Column("installed_at", UTCDateTime, nullable=False),
    # Set when the certificate expired and its seats left the pool.
    Column("retired_at", UTCDateTime, nullable=True),
    # Raised each time the vendor re-issues the certificate (partial return, repair).
    Column("revision", Integer, nullable=False, server_default="0"),
    # Seats withheld from the pool by a return in progress, and that return's request.
    Column("withheld", Integer, nullable=False, server_default="0"),
    Column("return_request_id", String(128), nullable=True),
    # Set when the vendor credited every seat back; the row stays for the record.
    Column("returned_at", UTCDateTime, nullable=True),
    # Set while trusted storage is broken for this certificate: its seats do not serve.
    Column("broken_cause", String(32), nullable=True),
    Column("broken_detail", Text, nullable=True),
)

# The tamper-evident history of trusted storage: each entry records one certificate's
# state after a change (or a seal), and hash = SHA-256(previous hash || entry).
trust_ledger = Table(
    "trust_ledger",
    metadata,
    Column("sequence", BigInteger, primary_key=True, autoincrement=False),
    Column("at", UTCDateTime, nullable=False),
    Column("action", String(32), nullable=False),
    Column("certificate_id", String(64), nullable=True),
    Column("state", Text, nullable=False),
    Column("previous_hash", LargeBinary, nullable=False),
    Column("hash", LargeBinary, nullable=False),
)

# One row: which host and machine trusted storage is sealed to, the ledger head and the
# clock high-water mark, signed by the host key.
trust_seal = Table(
    "trust_seal",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("host_id", String(32), nullable=False),
    Column("host_public_key", LargeBinary, nullable=False),
    Column("machine_binding", LargeBinary, nullable=False),
    Column("head_sequence", BigInteger, nullable=False),
    Column("head_hash", LargeBinary, nullable=False),
    Column("clock_high_water", UTCDateTime, nullable=False),
    # Set when the clock was found set back; cleared only by a repair.
    Column("clock_set_back_at", UTCDateTime, nullable=True),
    Column("signature", LargeBinary, nullable=False),
)

# Check-ins with the vendor this host signed, and the vendor's verified answers. The
# newest answer for this host id says which certificates the vendor still records as
# this host's (the others stop serving) and starts the check-in deadlines anew.
check_ins = Table(
    "check_ins",
    metadata,
    Column("request_id", String(128), primary_key=True),
    # The host id that signed the request (a copied database holds another host's).
    Column("host_id", String(32), nullable=False),
    Column("request_envelope", LargeBinary, nullable=False),
    Column("prepared_at", UTCDateTime, nullable=False),
    # Set together once the vendor's signed result is verified and installed.
    Column("result_envelope", LargeBinary, nullable=True),
    Column("checked_at", UTCDateTime, nullable=True),
    Column("installed_at", UTCDateTime, nullable=True),
    # The result takes a certificate away (superseded, not held): kept for good.
    Column("withdraws", Boolean, nullable=False, server_default=false()),
    Index("check_ins_by_host", "host_id", "checked_at"),
)

# One seat pool per feature. Seats are taken and given back by conditional updates on
# this row, so concurrent replicas over one database never over-allocate.
pools = Table(
    "pools",
    metadata,
    Column("feature", String(64), primary_key=True),
    Column("activated", Integer, nullable=False),
    Column("used", Integer, nullable=False),
    CheckConstraint("used >= 0 AND used <= activated", name="used_within_activated"),
)

leases = Table(
    "leases",
    metadata,
    Column("lease_id", String(64), primary_key=True),
    Column("secret_hash", LargeBinary, nullable=False),
    Column("feature", String(64), nullable=False),
    Column("count", Integer, nullable=False),
    Column("client_host", String(256), nullable=False),
    Column("user", String(256), nullable=False),
    Column("display_name", String(256), nullable=False),
    Column("ttl_seconds", Integer, nullable=False),
    Column("epoch", BigInteger, nullable=False),
    Column("granted_at", UTCDateTime, nullable=False),
    Column("last_heartbeat_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("released_at", UTCDateTime, nullable=True),
    Column("release_reason", String(32), nullable=True),
    Index("leases_by_feature", "feature"),
    # The sweeper looks only at held leases, ordered by expiry.
    Index(
        "leases_held_by_expiry",
        "expires_at",
        sqlite_where=text("released_at IS NULL"),
        postgresql_where=text("released_at IS NULL"),
    ),
)

# The License Server processes serving from this database now: each raises its beat a
# few times a second. One whose beat stands still past the replica timeout, as another
# replica sees it, is dead: that replica deletes its row (only if the beat is still the
# one it saw) and, in the same transaction, its queued clients. A replica that finds its
# own row gone was declared dead: it registers anew, and its clients queue again.
replicas = Table(
    "replicas",
    metadata,
    Column("replica_id", String(64), primary_key=True),
    Column("beat", BigInteger, nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
)

# Clients waiting for seats, first come first served per feature: the database hands out
# the tickets, so the order is the same on every replica and immune to clock skew. A
# waiter is live while its replica's row exists and its stream keeps alive_until in the
# future (replica_id is NULL only in rows written before replicas were recorded).
lease_queue = Table(
    "lease_queue",
    metadata,
    Column("ticket", Integer, primary_key=True, autoincrement=True),
    Column("waiter_id", String(64), nullable=False, unique=True),
    Column("feature", String(64), nullable=False),
    Column("count", Integer, nullable=False),
    Column("client_host", String(256), nullable=False),
    Column("user", String(256), nullable=False),
    Column("display_name", String(256), nullable=False),
    Column("enqueued_at", UTCDateTime, nullable=False),
    Column("alive_until", UTCDateTime, nullable=False),
    Column("replica_id", String(64), nullable=True),
    Index("lease_queue_by_feature", "feature", "ticket"),
    Index("lease_queue_by_replica", "replica_id"),
)

# Seats each client declared it needs (EBO's Required), per feature.
requirements = Table(
    "requirements",
    metadata,
    Column("client_host", String(256), primary_key=True),
    Column("feature", String(64), primary_key=True),
    Column("required", Integer, nullable=False),
    Column("declared_at", UTCDateTime, nullable=False),
    CheckConstraint("required > 0", name="required_positive"),
)
