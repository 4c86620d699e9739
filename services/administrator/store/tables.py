"""The Administrator's tables: the journal of operations in flight and done."""

from __future__ import annotations

from sqlalchemy import Column, Integer, LargeBinary, MetaData, String, Table, Text

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
    # The request id the License Server signed; equal to the operation id.
    Column("request_id", String(128), nullable=False),
    Column("request_envelope", LargeBinary, nullable=False),
    Column("response_envelope", LargeBinary, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)
