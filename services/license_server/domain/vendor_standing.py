"""What the vendor's check-ins say about the certificates this host holds.

A certificate may carry the vendor's check-in policy (interval and grace, signed into
it). The newest verified check-in result for this host id says, per certificate, whether
the vendor still records it as this host's. A certificate the vendor re-bound to another
host (a copy of this License Server repaired elsewhere: ``CERTIFICATE_SUPERSEDED``) or
no longer records at all (returned, force-returned: ``LICENSE_NOT_HELD``) stops serving
for good; one whose policy asks for a check-in that was not verified in time
(``CHECK_IN_OVERDUE``) stops until the next check-in finds it current.

A withdrawal stands for good against any number of "current" answers (see CheckInView).
The deadline runs from the later of the certificate's issue and the vendor's time of the
newest check-in that found it current at the revision held: both are vendor-signed, so
holding an answer back or replaying an old one gains nothing. Pure functions here; the
use cases are in ``check_ins.py``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from google.protobuf.message import DecodeError
from nacl.signing import VerifyKey

from services.license_server.domain.model import CheckInRow
from tessera.activation.v1.activation_pb2 import (
    CertificateCheckIn,
    CheckInStanding,
    VendorCheckInResult,
)
from tessera.clock import from_timestamp
from tessera.common.v1.common_pb2 import LicenseCertificate, SignedEnvelope
from tessera.envelope import open_envelope
from tessera.errors import EnvelopeRejected

# Why a certificate does not serve, from a check-in (see trust.py for the others).
CERTIFICATE_SUPERSEDED = "CERTIFICATE_SUPERSEDED"
LICENSE_NOT_HELD = "LICENSE_NOT_HELD"
CHECK_IN_OVERDUE = "CHECK_IN_OVERDUE"
# Withdrawn for good: a repair does not bring these back (the vendor re-issues only what
# it records as this host's).
WITHDRAWN = frozenset({CERTIFICATE_SUPERSEDED, LICENSE_NOT_HELD})
CHECK_IN_CAUSES = WITHDRAWN | {CHECK_IN_OVERDUE}


@dataclass(frozen=True)
class CheckInPolicy:
    """Check in at least every ``interval``; stop serving ``grace`` after it is due."""

    interval: dt.timedelta
    grace: dt.timedelta


def policy_of(certificate: LicenseCertificate) -> CheckInPolicy | None:
    """The certificate's signed check-in policy; None when it asks for no check-in."""
    if not certificate.HasField("check_in_interval"):
        return None
    interval = certificate.check_in_interval.ToTimedelta()
    if interval <= dt.timedelta(0):
        return None
    grace = (
        certificate.check_in_grace.ToTimedelta()
        if certificate.HasField("check_in_grace")
        else dt.timedelta(0)
    )
    return CheckInPolicy(interval, max(grace, dt.timedelta(0)))


@dataclass(frozen=True)
class Withdrawal:
    """The vendor's word, at a check-in, that one certificate revision is not this host's."""

    cause: str
    detail: str
    # The host the vendor re-bound it to (SUPERSEDED), and since when.
    superseded_by_host_id: str
    superseded_at: dt.datetime | None


@dataclass(frozen=True)
class CheckInView:
    """What this host's verified check-in results say, together.

    A withdrawal is for good: the vendor never hands a certificate revision back once it
    re-bound or took it (a re-binding raises the revision), so any result that withdrew a
    revision stands against every "current" one, whatever their order or their times
    (vendor replicas' clocks may disagree; an old answer may be installed late). For the
    deadlines, the newest time the vendor found each revision current counts.
    """

    last_checked_at: dt.datetime
    # (certificate id, revision) -> why the vendor withdrew it.
    withdrawn: Mapping[tuple[str, int], Withdrawal]
    # (certificate id, revision) -> the newest check-in that found it current.
    current_at: Mapping[tuple[str, int], dt.datetime]


def withdraws(result: VendorCheckInResult) -> bool:
    """Whether a result takes any certificate away (such results are kept for good)."""
    return any(c.standing != CheckInStanding.CHECK_IN_STANDING_CURRENT for c in result.certificates)


def verified_result(
    row: CheckInRow, host_id: str, vendor_keys: Mapping[str, VerifyKey]
) -> VendorCheckInResult | None:
    """A stored result, verified again (vendor signature, host, request): a row that does
    not verify counts as no check-in at all, so editing one can only take away."""
    if row.result_envelope is None:
        return None
    try:
        result = open_envelope(
            SignedEnvelope.FromString(row.result_envelope), VendorCheckInResult, vendor_keys
        )
    except (EnvelopeRejected, DecodeError, ValueError):
        return None
    if (result.host_id, result.request_id) != (host_id, row.request_id):
        return None
    return result


def view_of(
    rows: Iterable[CheckInRow], host_id: str, vendor_keys: Mapping[str, VerifyKey]
) -> CheckInView | None:
    """The check-in view of this host's installed results; None when there is none."""
    results = [r for r in (verified_result(row, host_id, vendor_keys) for row in rows) if r]
    if not results:
        return None
    withdrawn: dict[tuple[str, int], Withdrawal] = {}
    current_at: dict[tuple[str, int], dt.datetime] = {}
    for result in results:
        checked_at = from_timestamp(result.checked_at)
        for listed in result.certificates:
            key = (listed.certificate_id, listed.revision)
            if listed.standing == CheckInStanding.CHECK_IN_STANDING_CURRENT:
                current_at[key] = max(current_at.get(key, checked_at), checked_at)
            elif key not in withdrawn:
                withdrawn[key] = _withdrawal(listed, result, checked_at)
    return CheckInView(
        last_checked_at=max(from_timestamp(r.checked_at) for r in results),
        withdrawn=withdrawn,
        current_at=current_at,
    )


def _withdrawal(
    listed: CertificateCheckIn, result: VendorCheckInResult, checked_at: dt.datetime
) -> Withdrawal:
    if listed.standing == CheckInStanding.CHECK_IN_STANDING_SUPERSEDED:
        return Withdrawal(
            CERTIFICATE_SUPERSEDED,
            f"the vendor re-bound this certificate to host {listed.holder_host_id} (a "
            "repair there: a copy of this License Server, or its replacement); check-in of "
            f"{_iso(checked_at)}",
            listed.holder_host_id,
            from_timestamp(result.superseded_at) if result.HasField("superseded_at") else None,
        )
    return Withdrawal(
        LICENSE_NOT_HELD,
        "the vendor no longer records this certificate as this License Server's (returned "
        f"or force-returned); check-in of {_iso(checked_at)}",
        "",
        None,
    )


@dataclass(frozen=True)
class Standing:
    """One certificate's standing with the vendor."""

    # Why the vendor withdrew it, if it did.
    withdrawn: Withdrawal | None
    # With a policy: when the next check-in is due, and when the seats stop without it.
    due: dt.datetime | None
    deadline: dt.datetime | None


def standing_of(certificate: LicenseCertificate, view: CheckInView | None) -> Standing:
    """What the check-ins (if any) and the certificate's policy say about it."""
    key = (certificate.certificate_id, certificate.revision)
    if view is not None and key in view.withdrawn:
        return Standing(view.withdrawn[key], None, None)
    policy = policy_of(certificate)
    if policy is None:
        return Standing(None, None, None)
    confirmed = from_timestamp(certificate.issued_at)
    if view is not None and key in view.current_at:
        confirmed = max(confirmed, view.current_at[key])
    due = confirmed + policy.interval
    return Standing(None, due, due + policy.grace)


def overdue_detail(due: dt.datetime, deadline: dt.datetime) -> str:
    return (
        f"the license's check-in policy asked for a check-in with the vendor by {_iso(due)} "
        f"(grace until {_iso(deadline)}) and none was verified; run `tessera check-in` "
        "(the seats serve again once the vendor finds them current)"
    )


def _iso(at: dt.datetime) -> str:
    return at.astimezone(dt.UTC).isoformat(timespec="seconds")
