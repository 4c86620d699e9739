"""Returns, repairs, line terms, current certificates and a hash-chained audit log.

Entitlement lines gain a term (duration), a maintenance end and whether seats may be
returned one at a time. Activations keep their current certificate (revision, holder,
state, registration). Return receipts and repairs are recorded with their exact answers.
The audit log becomes hash-chained with a head row; existing entries are chained in
their original order.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

import datetime as dt
import hashlib
import json

import sqlalchemy as sa
from alembic import op

from tessera.activation.v1.activation_pb2 import VendorActivationResponse
from tessera.common.v1.common_pb2 import SignedEnvelope
from tessera.storage import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

GENESIS = bytes(32)


def _canonical_json(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _entry_hash(previous: bytes, sequence: int, at: dt.datetime, *content: str) -> bytes:
    # Chain format 1, as entry_hash in services/activation_server/domain/model.py computes it.
    stamp = at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    encoded = json.dumps([sequence, stamp, *content], separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(previous + encoded.encode()).digest()


OLD_AUDIT = sa.table(
    "audit_log",
    sa.column("id", sa.Integer),
    sa.column("at", UTCDateTime),
    sa.column("action", sa.String),
    sa.column("subject", sa.String),
    sa.column("detail", sa.Text),
)


def _chained_audit(name: str) -> sa.Table:
    return op.create_table(
        name,
        sa.Column("sequence", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("at", UTCDateTime, nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("subject", sa.String(128), nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("previous_hash", sa.LargeBinary, nullable=False),
        sa.Column("hash", sa.LargeBinary, nullable=False),
    )


def upgrade() -> None:
    bind = op.get_bind()
    # Plain ADD COLUMNs: SQLite adds them in place. (A batch would copy the table, and
    # dropping entitlement_lines while activations refer to it fails its foreign key.)
    op.add_column("entitlement_lines", sa.Column("duration_seconds", sa.BigInteger))
    op.add_column("entitlement_lines", sa.Column("maintenance_ends_at", UTCDateTime))
    op.add_column(
        "entitlement_lines",
        sa.Column("partial_return_allowed", sa.Boolean, nullable=False, server_default=sa.false()),
    )
    for column in (
        sa.Column("holder_host_id", sa.String(32)),
        sa.Column("activated_count", sa.Integer),
        sa.Column("revision", sa.Integer),
        sa.Column("state", sa.String(16)),
        sa.Column("certificate_envelope", sa.LargeBinary),
        sa.Column("returned_at", UTCDateTime),
        sa.Column("registration", sa.Text),
    ):
        op.add_column("activations", column)
    activations = sa.table(
        "activations",
        sa.column("host_id", sa.String),
        sa.column("request_id", sa.String),
        sa.column("count", sa.Integer),
        sa.column("response_envelope", sa.LargeBinary),
        sa.column("holder_host_id", sa.String),
        sa.column("activated_count", sa.Integer),
        sa.column("revision", sa.Integer),
        sa.column("state", sa.String),
        sa.column("certificate_envelope", sa.LargeBinary),
    )
    bind.execute(
        activations.update().values(
            holder_host_id=activations.c.host_id,
            activated_count=activations.c.count,
            revision=0,
            state="active",
        )
    )
    for row in bind.execute(
        sa.select(activations.c.host_id, activations.c.request_id, activations.c.response_envelope)
    ).all():
        answer = SignedEnvelope.FromString(row.response_envelope)
        certificate = VendorActivationResponse.FromString(answer.payload).certificate
        bind.execute(
            activations.update()
            .where(activations.c.host_id == row.host_id, activations.c.request_id == row.request_id)
            .values(certificate_envelope=certificate.SerializeToString(deterministic=True))
        )
    # Nothing refers to activations, so SQLite may copy it to tighten the columns.
    with op.batch_alter_table("activations") as batch:
        for name in ("holder_host_id", "activated_count", "revision", "state"):
            batch.alter_column(name, nullable=False)
        batch.alter_column("certificate_envelope", nullable=False)
        batch.create_index("ix_activations_holder_host_id", ["holder_host_id"])
        batch.create_check_constraint(
            "held_within_activated", "count >= 0 AND count <= activated_count"
        )

    op.create_table(
        "return_receipts",
        sa.Column("host_id", sa.String(32), primary_key=True),
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("certificate_id", sa.String(64), nullable=False),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("revision", sa.Integer, nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("credited", sa.Integer, nullable=False),
        sa.Column("entitlement_id", sa.String(32), nullable=False),
        sa.Column("receipt_envelope", sa.LargeBinary, nullable=False),
        sa.Column("decided_at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_return_receipts_certificate_id", "return_receipts", ["certificate_id"])
    op.create_index(
        "ix_return_receipts_cycling", "return_receipts", ["entitlement_id", "outcome", "decided_at"]
    )
    op.create_table(
        "repairs",
        sa.Column("host_id", sa.String(32), primary_key=True),
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("host_public_key", sa.LargeBinary, nullable=False),
        sa.Column("previous_host_id", sa.String(32), nullable=False),
        sa.Column("response_envelope", sa.LargeBinary, nullable=False),
        sa.Column("repaired_at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_repairs_by_key", "repairs", ["host_public_key", "repaired_at"])
    op.create_table(
        "repair_hosts",
        sa.Column("host_public_key", sa.LargeBinary, primary_key=True),
    )

    # The audit log: chain the existing entries in order into the new shape.
    chained = _chained_audit("audit_log_chained")
    previous, sequence = GENESIS, 0
    rows = []
    for row in bind.execute(sa.select(OLD_AUDIT).order_by(OLD_AUDIT.c.id)).all():
        detail = json.loads(row.detail)
        actor = str(detail.get("host_id") or "vendor")
        detail_json = _canonical_json(detail)
        sequence += 1
        digest = _entry_hash(
            previous, sequence, row.at, row.action, row.subject, actor, detail_json
        )
        rows.append(
            {
                "sequence": sequence,
                "at": row.at,
                "action": row.action,
                "subject": row.subject,
                "actor": actor,
                "detail": detail_json,
                "previous_hash": previous,
                "hash": digest,
            }
        )
        previous = digest
    if rows:
        op.bulk_insert(chained, rows)
    op.drop_table("audit_log")
    op.rename_table("audit_log_chained", "audit_log")
    op.create_index("ix_audit_log_subject", "audit_log", ["subject"])
    head = op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("sequence", sa.BigInteger, nullable=False),
        sa.Column("hash", sa.LargeBinary, nullable=False),
        sa.CheckConstraint("id = 1", name="one_head"),
    )
    op.bulk_insert(head, [{"id": 1, "sequence": sequence, "hash": previous}])


def downgrade() -> None:
    bind = op.get_bind()
    chained = sa.table(
        "audit_log",
        sa.column("sequence", sa.BigInteger),
        sa.column("at", UTCDateTime),
        sa.column("action", sa.String),
        sa.column("subject", sa.String),
        sa.column("detail", sa.Text),
    )
    rows = [
        {
            "id": row.sequence,
            "at": row.at,
            "action": row.action,
            "subject": row.subject,
            "detail": row.detail,
        }
        for row in bind.execute(sa.select(chained).order_by(chained.c.sequence)).all()
    ]
    op.drop_table("audit_head")
    op.drop_index("ix_audit_log_subject", "audit_log")
    op.drop_table("audit_log")
    plain = op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", UTCDateTime, nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("subject", sa.String(128), nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
    )
    if rows:
        op.bulk_insert(plain, rows)
        if bind.dialect.name == "postgresql":
            # The ids were written explicitly; the serial must carry on after them.
            bind.execute(
                sa.text("SELECT setval(pg_get_serial_sequence('audit_log', 'id'), :last)"),
                {"last": rows[-1]["id"]},
            )
    for table in ("repair_hosts", "repairs", "return_receipts"):
        op.drop_table(table)
    with op.batch_alter_table("activations") as batch:
        batch.drop_constraint("held_within_activated", type_="check")
        batch.drop_index("ix_activations_holder_host_id")
        for name in (
            "registration",
            "returned_at",
            "certificate_envelope",
            "state",
            "revision",
            "activated_count",
            "holder_host_id",
        ):
            batch.drop_column(name)
    # In place, as they were added (SQLite 3.35 and later drops columns itself).
    for name in ("partial_return_allowed", "maintenance_ends_at", "duration_seconds"):
        op.drop_column("entitlement_lines", name)
