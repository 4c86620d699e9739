"""``--json`` output: the stable, machine-readable shape of every answer.

Written out field by field rather than by ``MessageToJson``, so the shape is ours to keep:
snake_case keys, every key always present, times as ISO 8601 UTC strings (``null`` when
unset, e.g. a license that never expires), enums as lower-case words (``completed``,
``network``), hashes and keys as lower-case hex. New keys may be added; none is renamed
or removed. docs/operator.md lists the shapes.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any, cast

from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from tessera.activation.v1 import activation_pb2 as apb
from tessera.admin.v1 import admin_pb2
from tessera.common.v1 import common_pb2
from tessera.license.v1 import license_pb2 as lpb

Json = dict[str, Any]


def iso(stamp: Timestamp) -> str:
    moment = stamp.ToDatetime(tzinfo=dt.UTC)
    return moment.isoformat().replace("+00:00", "Z")


def when(message: Message, field: str) -> str | None:
    """The time in ``field`` of ``message``, or None when it is unset."""
    if not message.HasField(field):
        return None
    return iso(cast(Timestamp, getattr(message, field)))


def seconds(message: Message, field: str) -> int | None:
    if not message.HasField(field):
        return None
    return int(cast(Duration, getattr(message, field)).seconds)


def word(name: str, prefix: str) -> str:
    """``OPERATION_STATE_COMPLETED`` -> ``completed``."""
    return name.removeprefix(prefix).lower()


def operation_kind(kind: int) -> str:
    return word(
        admin_pb2.OperationKind.Name(cast(admin_pb2.OperationKind.ValueType, kind)),
        "OPERATION_KIND_",
    )


def operation_state(state: int) -> str:
    return word(
        admin_pb2.OperationState.Name(cast(admin_pb2.OperationState.ValueType, state)),
        "OPERATION_STATE_",
    )


def license_kind(kind: int) -> str:
    return word(
        common_pb2.LicenseKind.Name(cast(common_pb2.LicenseKind.ValueType, kind)), "LICENSE_KIND_"
    )


def certificate_state(state: int) -> str:
    return word(
        lpb.CertificateState.Name(cast(lpb.CertificateState.ValueType, state)),
        "CERTIFICATE_STATE_",
    )


def lease_state(state: int) -> str:
    return word(lpb.LeaseState.Name(cast(lpb.LeaseState.ValueType, state)), "LEASE_STATE_")


def activation_state(state: int) -> str:
    return word(
        apb.ActivationState.Name(cast(apb.ActivationState.ValueType, state)), "ACTIVATION_STATE_"
    )


def operation(op: admin_pb2.Operation) -> Json:
    return {
        "operation_id": op.operation_id,
        "kind": operation_kind(op.kind),
        "state": operation_state(op.state),
        "license_server": op.license_server,
        "host_id": op.host_id,
        "activation_id": op.activation_id,
        "certificate_id": op.certificate_id,
        "count": op.count,
        "offline": op.offline,
        "target_license_server": op.target_license_server,
        "target_host_id": op.target_host_id,
        "request_id": op.request_id,
        "last_error": op.last_error,
        "created_at": when(op, "created_at"),
        "updated_at": when(op, "updated_at"),
    }


def certificate(installed: lpb.InstalledCertificate) -> Json:
    c = installed.certificate
    return {
        "certificate_id": c.certificate_id,
        "feature": c.feature,
        "count": c.count,
        "kind": license_kind(c.kind),
        "entitlement_id": c.entitlement_id,
        "activation_id": c.activation_id,
        "host_id": c.host_id,
        "customer_organization": c.customer_organization,
        "revision": c.revision,
        "partial_return_allowed": c.partial_return_allowed,
        "issued_at": when(c, "issued_at"),
        "expires_at": when(c, "expires_at"),
        "maintenance_ends_at": when(c, "maintenance_ends_at"),
        "installed_at": when(installed, "installed_at"),
    }


def optional_certificate(installed: lpb.InstalledCertificate, present: bool) -> Json | None:
    return certificate(installed) if present else None


def feature(info: lpb.FeatureInformation) -> Json:
    return {
        "feature": info.feature,
        "activated": info.activated,
        "used": info.used,
        "available": info.available,
        "queued": info.queued,
        "required": info.required,
        "violation": info.violation,
        "withdrawn": info.withdrawn,
        "withdrawn_reason": info.withdrawn_reason,
    }


def lease(entry: lpb.LeaseEntry) -> Json:
    return {
        "lease_id": entry.lease_id,
        "state": lease_state(entry.state),
        "feature": entry.feature,
        "count": entry.count,
        "client_host": entry.client_host,
        "user": entry.user,
        "display_name": entry.display_name,
        "since": when(entry, "since"),
        "last_heartbeat_at": when(entry, "last_heartbeat_at"),
        "expires_at": when(entry, "expires_at"),
    }


def trust_health(health: lpb.TrustHealth) -> Json:
    return {
        "healthy": health.healthy,
        "host_id": health.host_id,
        "sealed_host_id": health.sealed_host_id,
        "serving_seats": health.serving_seats,
        "broken_seats": health.broken_seats,
        "problems": list(health.problems),
        "repair_advice": health.repair_advice,
        "certificates": [
            {
                "certificate_id": c.certificate_id,
                "feature": c.feature,
                "count": c.count,
                "state": certificate_state(c.state),
                "cause": c.cause,
                "detail": c.detail,
                "returning": c.returning,
                "check_in_deadline": when(c, "check_in_deadline"),
            }
            for c in health.certificates
        ],
        "clock_high_water": when(health, "clock_high_water"),
        "checked_at": when(health, "checked_at"),
        "check_in": check_in_status(health.check_in),
    }


def check_in_status(status: lpb.CheckInStatus) -> Json:
    return {
        "required": status.required,
        "last_checked_at": when(status, "last_checked_at"),
        "due_at": when(status, "due_at"),
        "deadline": when(status, "deadline"),
        "superseded": status.superseded,
        "superseded_by_host_id": status.superseded_by_host_id,
        "superseded_at": when(status, "superseded_at"),
        "withdrawn_seats": status.withdrawn_seats,
    }


def entitlement(e: apb.Entitlement) -> Json:
    return {
        "entitlement_id": e.entitlement_id,
        "customer_organization": e.customer_organization,
        "contact": e.contact,
        "created_at": when(e, "created_at"),
        "lines": [
            {
                "activation_id": line.activation_id,
                "feature": line.feature,
                "kind": license_kind(line.kind),
                "count": line.count,
                "activated": line.activated,
                "available": line.available,
                "expires_at": when(line, "expires_at"),
                "duration_seconds": seconds(line, "duration"),
                "maintenance_ends_at": when(line, "maintenance_ends_at"),
                "partial_return_allowed": line.partial_return_allowed,
                "check_in_interval_seconds": seconds(line, "check_in_interval"),
                "check_in_grace_seconds": seconds(line, "check_in_grace"),
            }
            for line in e.lines
        ],
    }


def registration(r: apb.Registration) -> Json:
    return {
        "organization": r.organization,
        "contact_name": r.contact_name,
        "email": r.email,
        "phone": r.phone,
        "site": r.site,
    }


def activation(a: apb.Activation) -> Json:
    return {
        "request_id": a.request_id,
        "entitlement_id": a.entitlement_id,
        "activation_id": a.activation_id,
        "feature": a.feature,
        "count": a.count,
        "activated_count": a.activated_count,
        "host_id": a.host_id,
        "certificate_id": a.certificate_id,
        "state": activation_state(a.state),
        "revision": a.revision,
        "activated_at": when(a, "activated_at"),
        "returned_at": when(a, "returned_at"),
    }


def audit_detail(text: str) -> Any:
    try:
        return json.loads(text) if text else {}
    except ValueError:
        return text


def audit_entry(entry: apb.AuditEntry) -> Json:
    return {
        "sequence": entry.sequence,
        "at": when(entry, "at"),
        "action": entry.action,
        "subject": entry.subject,
        "actor": entry.actor,
        "detail": audit_detail(entry.detail_json),
        "previous_hash": entry.previous_hash.hex(),
        "hash": entry.hash.hex(),
    }


def vendor_key(key: apb.VendorPublicKey) -> Json:
    return {
        "key_id": key.key_id,
        "public_key": key.public_key.hex(),
        "active": key.active,
        "created_at": when(key, "created_at"),
    }
