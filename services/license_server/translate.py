"""Proto <-> domain translation for the License Server's lease messages."""

from __future__ import annotations

import datetime as dt

from google.protobuf.duration_pb2 import Duration

from services.license_server.domain.check_ins import CheckInStatus, status_of
from services.license_server.domain.leasing import LeaseEntry
from services.license_server.domain.model import Grant, NewLease
from services.license_server.domain.trust import TrustReport
from services.license_server.domain.vendor_standing import (
    CHECK_IN_CAUSES,
    CHECK_IN_OVERDUE,
    WITHDRAWN,
)
from tessera.clock import to_timestamp
from tessera.errors import InvalidInput
from tessera.license.v1 import license_pb2 as pb

# The longest a client may wait in a queue for a seat.
MAX_WAIT_SECONDS = 24 * 3600.0


def _duration(seconds: float) -> Duration:
    # Built from its fields: it is on every grant, and this is a tenth of FromTimedelta.
    nanos = round(seconds * 1_000_000_000)
    return Duration(seconds=nanos // 1_000_000_000, nanos=nanos % 1_000_000_000)


def granted_to_proto(grant: Grant) -> pb.LeaseGranted:
    lease = grant.lease
    return pb.LeaseGranted(
        lease_id=lease.lease_id,
        lease_secret=grant.secret,
        feature=lease.feature,
        count=lease.count,
        ttl=_duration(lease.ttl_seconds),
        heartbeat_interval=_duration(grant.heartbeat_interval_seconds),
        expires_at=to_timestamp(lease.expires_at),
        epoch=lease.epoch,
        resumed=grant.resumed,
    )


def wait_timeout_from_proto(acquire: pb.LeaseAcquire) -> float:
    if not acquire.HasField("wait_timeout"):
        return 0.0
    wait = acquire.wait_timeout
    if wait.seconds < 0 or not 0 <= wait.nanos < 1_000_000_000:
        raise InvalidInput("wait_timeout", "must not be negative")
    return min(wait.seconds + wait.nanos / 1e9, MAX_WAIT_SECONDS)


def new_lease_from_proto(acquire: pb.LeaseAcquire) -> tuple[NewLease, int | None]:
    ttl = None
    if acquire.HasField("ttl"):
        if acquire.ttl.seconds < 0 or not 0 <= acquire.ttl.nanos < 1_000_000_000:
            raise InvalidInput("ttl", "must be a positive duration")
        # Round a sub-second remainder up: never a shorter lease than the client asked for.
        ttl = acquire.ttl.seconds + (1 if acquire.ttl.nanos else 0)
    new = NewLease(
        feature=acquire.feature,
        count=acquire.count,
        client_host=acquire.client_host,
        user=acquire.user,
        display_name=acquire.display_name,
    )
    return new, ttl


def lease_entry_to_proto(entry: LeaseEntry) -> pb.LeaseEntry:
    if entry.lease is not None:
        lease = entry.lease
        return pb.LeaseEntry(
            lease_id=lease.lease_id,
            state=pb.LEASE_STATE_HELD,
            feature=lease.feature,
            count=lease.count,
            client_host=lease.client_host,
            user=lease.user,
            display_name=lease.display_name,
            since=to_timestamp(lease.granted_at),
            last_heartbeat_at=to_timestamp(lease.last_heartbeat_at),
            expires_at=to_timestamp(lease.expires_at),
        )
    assert entry.waiter is not None
    waiter = entry.waiter
    return pb.LeaseEntry(
        lease_id=waiter.waiter_id,
        state=pb.LEASE_STATE_QUEUED,
        feature=waiter.request.feature,
        count=waiter.request.count,
        client_host=waiter.request.client_host,
        user=waiter.request.user,
        display_name=waiter.request.display_name,
        since=to_timestamp(waiter.enqueued_at),
    )


def health_to_proto(report: TrustReport, checked_at: dt.datetime) -> pb.TrustHealth:
    """What the operator sees of trusted storage, and what a repair would do."""
    certificates = []
    serving = broken = 0
    for verdict in report.verdicts:
        stored = verdict.stored
        cause = verdict.problem.cause if verdict.problem else None
        if cause in WITHDRAWN:
            state = pb.CertificateState.CERTIFICATE_STATE_SUPERSEDED
        elif cause == CHECK_IN_OVERDUE:
            state = pb.CertificateState.CERTIFICATE_STATE_CHECK_IN_OVERDUE
        elif verdict.problem is not None:
            state = pb.CertificateState.CERTIFICATE_STATE_BROKEN
            broken += stored.count - stored.returning
        elif verdict.expired:
            state = pb.CertificateState.CERTIFICATE_STATE_EXPIRED
        elif stored.returning:
            state = pb.CertificateState.CERTIFICATE_STATE_RETURNING
            serving += stored.count - stored.returning
        else:
            state = pb.CertificateState.CERTIFICATE_STATE_TRUSTED
            serving += stored.count
        certificates.append(
            pb.CertificateTrust(
                certificate_id=stored.certificate_id,
                feature=stored.feature,
                count=stored.count,
                state=state,
                cause=verdict.problem.cause if verdict.problem else "",
                detail=verdict.problem.detail if verdict.problem else "",
                returning=stored.returning,
                return_request_id=stored.return_request_id or "",
                check_in_deadline=to_timestamp(verdict.check_in_deadline),
            )
        )
    return pb.TrustHealth(
        healthy=report.healthy,
        host_id=report.host_id,
        sealed_host_id=report.sealed_host_id,
        certificates=certificates,
        problems=[str(problem) for problem in report.problems],
        repair_advice=_repair_advice(report, broken),
        clock_high_water=to_timestamp(report.clock_high_water),
        checked_at=to_timestamp(checked_at),
        serving_seats=serving,
        broken_seats=broken,
        check_in=check_in_status_to_proto(status_of(report)),
    )


def check_in_status_to_proto(status: CheckInStatus) -> pb.CheckInStatus:
    return pb.CheckInStatus(
        required=status.required,
        last_checked_at=to_timestamp(status.last_checked_at),
        due_at=to_timestamp(status.due_at),
        deadline=to_timestamp(status.deadline),
        superseded=status.superseded,
        superseded_by_host_id=status.superseded_by_host_id,
        superseded_at=to_timestamp(status.superseded_at),
        withdrawn_seats=status.withdrawn_seats,
    )


def _repair_advice(report: TrustReport, broken_seats: int) -> str:
    if report.healthy:
        return ""
    broken = sum(
        verdict.problem is not None and verdict.problem.cause not in CHECK_IN_CAUSES
        for verdict in report.verdicts
    )
    if not broken:
        return _check_in_advice(report)
    holder = report.sealed_host_id
    if report.storage_problem is not None and report.storage_problem.cause == "DATABASE_COPIED":
        if report.verdicts:
            return (
                f"{broken} certificate(s) with {broken_seats} seat(s) do not serve. They were "
                f"activated to host {report.sealed_host_id} with another host key, so a repair "
                "is refused (REPAIR_FROM_ANOTHER_HOST): put that host's host.key back in the "
                "data directory and restart, or have the vendor force-return them and "
                "activate again."
            )
        holder = report.host_id
    rebind = (
        f", re-bound to this machine (host {report.host_id})" if holder != report.host_id else ""
    )
    return (
        f"{broken} certificate(s) with {broken_seats} seat(s) do not serve. A repair asks the "
        f"vendor to re-issue every certificate it records for host {holder}{rebind}, replaces "
        "trusted storage with exactly those and re-seals it; certificates the vendor does not "
        "record for that host leave. At most 4 repairs per host per year."
    )


def _check_in_advice(report: TrustReport) -> str:
    """What to do when only check-ins keep certificates from serving: a repair would not
    help (the vendor re-issues only what it records as this host's)."""
    causes = {v.problem.cause for v in report.verdicts if v.problem is not None}
    advice = []
    if causes & WITHDRAWN:
        status = status_of(report)
        by = f" to host {status.superseded_by_host_id}" if status.superseded_by_host_id else ""
        advice.append(
            "The vendor no longer records some certificates as this License Server's: they "
            f"were re-bound{by} by a repair elsewhere (a copy of this server's data "
            "directory, or its replacement), or returned. They never serve here again and a "
            "repair does not bring them back; if this server is the one that should hold "
            "them, contact the vendor."
        )
    if CHECK_IN_OVERDUE in causes:
        advice.append(
            "Some licenses need a check-in with the vendor that is overdue: run "
            "`tessera check-in` (it needs the Administrator and the Internet); their seats "
            "serve again once the vendor finds them current."
        )
    return " ".join(advice)
