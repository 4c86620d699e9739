"""License certificates: the first issue at activation, and re-issues.

A certificate keeps its id for the life of its activation. Each re-issue (a partial
return leaves fewer seats, a repair re-binds it to the host's new host id) raises its
revision and changes only what the re-issue is about; the highest revision stands. The
line's check-in policy is signed into the first issue and so carried by every re-issue.
"""

from __future__ import annotations

import datetime as dt
import uuid

from google.protobuf.duration_pb2 import Duration

from services.activation_server.domain.model import (
    ActivationRecord,
    EntitlementLine,
    LicenseKind,
)
from services.activation_server.domain.vendor_key import Signer
from tessera.clock import to_timestamp
from tessera.common.v1.common_pb2 import LicenseCertificate, SignedEnvelope
from tessera.common.v1.common_pb2 import LicenseKind as LicenseKindProto

KIND_TO_PROTO = {
    LicenseKind.NETWORK: LicenseKindProto.LICENSE_KIND_NETWORK,
    LicenseKind.LOCAL: LicenseKindProto.LICENSE_KIND_LOCAL,
}


def first_issue(
    line: EntitlementLine,
    customer_organization: str,
    host_id: str,
    request_id: str,
    count: int,
    now: dt.datetime,
) -> LicenseCertificate:
    """Revision 0 of the certificate for ``count`` seats of ``line`` activated now."""
    return LicenseCertificate(
        certificate_id=str(uuid.uuid4()),
        entitlement_id=line.entitlement_id,
        activation_id=line.activation_id,
        feature=line.feature,
        count=count,
        kind=KIND_TO_PROTO[line.kind],
        host_id=host_id,
        request_id=request_id,
        issued_at=to_timestamp(now),
        expires_at=to_timestamp(line.expiry_for(now)),
        customer_organization=customer_organization,
        maintenance_ends_at=to_timestamp(line.maintenance_ends_at),
        partial_return_allowed=line.partial_return_allowed,
        revision=0,
        check_in_interval=_duration(line.check_in.interval if line.check_in else None),
        check_in_grace=_duration(line.check_in.grace if line.check_in else None),
    )


def _duration(value: dt.timedelta | None) -> Duration | None:
    if value is None:
        return None
    duration = Duration()
    duration.FromTimedelta(value)
    return duration


def reissue(
    activation: ActivationRecord,
    signer: Signer,
    now: dt.datetime,
    *,
    count: int | None = None,
    host_id: str | None = None,
) -> SignedEnvelope:
    """The activation's current certificate at the next revision, issued now, with a new
    count and/or host id; everything else unchanged."""
    certificate = LicenseCertificate.FromString(
        SignedEnvelope.FromString(activation.certificate_envelope).payload
    )
    certificate.revision = activation.revision + 1
    certificate.issued_at.FromDatetime(now)
    if count is not None:
        certificate.count = count
    if host_id is not None:
        certificate.host_id = host_id
    return signer.seal(certificate)
