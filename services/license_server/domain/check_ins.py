"""Checking in with the vendor: does the vendor still record what this host holds as its own?

``prepare`` signs a HostCheckInRequest listing every certificate held (id and revision)
and journals it; ``complete`` accepts only a vendor-signed result addressed to this host
and to a check-in it prepared, listing exactly what it asked about, stores it, and
re-judges trusted storage: certificates the vendor re-bound elsewhere or no longer
records stop serving (``vendor_standing.py``). Nothing unverified is stored, and
completing the same result twice changes nothing.

The Administrator carries both halves to the vendor: on demand (``tessera check-in``),
and by itself whenever a certificate's check-in policy makes a check-in due. A site
whose licenses carry no policy (the default) never needs to.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass

from services.license_server.domain.errors import (
    AnswerDoesNotMatch,
    CertificateForAnotherHost,
    RequestNotPreparedHere,
    TrustedStorageBroken,
)
from services.license_server.domain.model import CheckInRow
from services.license_server.domain.trust import TrustReport
from services.license_server.domain.trusted_storage import TrustedStorage, certificate_of
from services.license_server.domain.vendor_standing import (
    CERTIFICATE_SUPERSEDED,
    CHECK_IN_CAUSES,
    WITHDRAWN,
    withdraws,
)
from tessera.activation.v1.activation_pb2 import (
    HeldCertificate,
    HostCheckInRequest,
    VendorCheckInResult,
)
from tessera.clock import from_timestamp, to_timestamp
from tessera.common.v1.common_pb2 import SignedEnvelope
from tessera.envelope import open_envelope, seal
from tessera.server import failpoints

# A check-in prepared this long ago and never answered is forgotten.
UNANSWERED_FOR = dt.timedelta(days=7)


@dataclass(frozen=True)
class CheckInStatus:
    """Where this License Server stands with the vendor's check-in policy."""

    # Some certificate that still may serve carries a check-in policy.
    required: bool
    last_checked_at: dt.datetime | None
    # The earliest next check-in due, and when the first seats stop without one.
    due_at: dt.datetime | None
    deadline: dt.datetime | None
    superseded: bool
    superseded_by_host_id: str
    superseded_at: dt.datetime | None
    # Seats that do not serve because of check-in (superseded, not held, overdue).
    withdrawn_seats: int

    def due(self, now: dt.datetime) -> bool:
        return self.required and self.due_at is not None and self.due_at <= now


def status_of(report: TrustReport) -> CheckInStatus:
    """The check-in status a trust report implies."""
    view = report.check_in
    live = [
        v
        for v in report.verdicts
        if v.check_in_due is not None and (v.problem is None or v.problem.cause not in WITHDRAWN)
    ]
    withdrawn = sum(
        v.stored.count - v.stored.returning
        for v in report.verdicts
        if v.problem is not None and v.problem.cause in CHECK_IN_CAUSES
    )
    # Superseded when a certificate held now was re-bound elsewhere (the newest such).
    supersessions = [
        view.withdrawn[(v.document.certificate_id, v.document.revision)]
        for v in report.verdicts
        if view is not None
        and v.document is not None
        and v.problem is not None
        and v.problem.cause == CERTIFICATE_SUPERSEDED
        and (v.document.certificate_id, v.document.revision) in view.withdrawn
    ]
    by = max(
        supersessions,
        key=lambda w: w.superseded_at or dt.datetime.min.replace(tzinfo=dt.UTC),
        default=None,
    )
    return CheckInStatus(
        required=bool(live),
        last_checked_at=view.last_checked_at if view is not None else None,
        due_at=min((v.check_in_due for v in live if v.check_in_due), default=None),
        deadline=min((v.check_in_deadline for v in live if v.check_in_deadline), default=None),
        superseded=by is not None,
        superseded_by_host_id=by.superseded_by_host_id if by is not None else "",
        superseded_at=by.superseded_at if by is not None else None,
        withdrawn_seats=withdrawn,
    )


@dataclass(frozen=True)
class PreparedCheckIn:
    # None when only a due check-in was asked for and none is due.
    request_id: str | None
    request: SignedEnvelope | None
    status: CheckInStatus


@dataclass(frozen=True)
class CompletedCheckIn:
    status: CheckInStatus
    already_completed: bool


class CheckIns:
    """Check-ins of this License Server with the vendor."""

    def __init__(self, trusted_storage: TrustedStorage) -> None:
        self.storage = trusted_storage

    async def status(self) -> CheckInStatus:
        return status_of(await self.storage.check())

    async def prepare(self, only_if_due: bool) -> PreparedCheckIn:
        """A host-signed check-in request listing every certificate held; with
        ``only_if_due``, none unless a certificate's policy makes a check-in due."""
        storage = self.storage
        identity = storage.identity
        report = await storage.check()
        status = status_of(report)
        now = storage.clock.now()
        if report.storage_problem is not None:
            # The certificates are bound to another host id (or nothing can be trusted):
            # the vendor would only say so. Repair first; the repair is the check-in.
            if only_if_due:
                return PreparedCheckIn(None, None, status)
            raise TrustedStorageBroken(
                f"trusted storage is broken ({report.storage_problem}); run repair first",
                metadata={"cause": report.storage_problem.cause},
            )
        if only_if_due and not status.due(now):
            return PreparedCheckIn(None, None, status)
        held = sorted(
            (certificate_of(stored).certificate_id, stored.revision)
            for _, stored in await storage.list_certificates()
        )
        request_id = str(uuid.uuid4())
        envelope = seal(
            HostCheckInRequest(
                request_id=request_id,
                host_id=identity.host_id,
                host_public_key=identity.public_key,
                machine_binding=identity.machine_binding,
                certificates=[HeldCertificate(certificate_id=c, revision=r) for c, r in held],
                created_at=to_timestamp(now),
            ),
            identity.host_id,
            identity.signing_key,
        )
        async with storage.store.transaction() as repo:
            await repo.insert_check_in(
                CheckInRow(request_id, identity.host_id, envelope.SerializeToString(), now)
            )
        failpoints.reach("license_server.check_in.after_prepare")
        return PreparedCheckIn(request_id, envelope, status)

    async def complete(self, result_envelope: SignedEnvelope) -> CompletedCheckIn:
        """Install the vendor's signed result to a check-in this server prepared."""
        storage = self.storage
        identity = storage.identity
        result = open_envelope(result_envelope, VendorCheckInResult, storage.vendor_keys())
        if result.host_id != identity.host_id:
            raise CertificateForAnotherHost(
                f"this check-in result is for host {result.host_id}, not this License Server "
                f"({identity.host_id})",
                metadata={"host_id": result.host_id},
            )
        checked_at = from_timestamp(result.checked_at)
        exact = result_envelope.SerializeToString()
        now = storage.clock.now()
        async with storage.store.transaction() as repo:
            row = await repo.get_check_in(result.request_id, lock=True)
            if row is None or row.host_id != identity.host_id:
                raise RequestNotPreparedHere(
                    f"check-in {result.request_id!r} was not prepared by this License Server",
                    metadata={"request_id": result.request_id},
                )
            asked = HostCheckInRequest.FromString(
                SignedEnvelope.FromString(row.request_envelope).payload
            ).certificates
            if [(c.certificate_id, c.revision) for c in result.certificates] != [
                (c.certificate_id, c.revision) for c in asked
            ]:
                raise AnswerDoesNotMatch(
                    "the check-in result does not list the certificates this check-in asked about"
                )
            already = row.installed_at is not None
            if already and row.result_envelope != exact:
                raise AnswerDoesNotMatch(
                    f"check-in {result.request_id!r} was answered already, with another result"
                )
            if not already:
                await repo.install_check_in(
                    row.request_id, exact, checked_at, now, withdraws(result)
                )
                newest = await repo.newest_check_in(identity.host_id)
                assert newest is not None and newest.checked_at is not None
                await repo.forget_check_ins(
                    identity.host_id, newest.checked_at, now - UNANSWERED_FOR
                )
        if not already:
            failpoints.reach("license_server.check_in.after_install")
        return CompletedCheckIn(status_of(await storage.check()), already)
