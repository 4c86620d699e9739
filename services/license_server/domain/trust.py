"""Judging trusted storage: which certificates serve, and if not, why.

``inspect`` is a pure function of what is stored (seal, ledger segment, certificate
rows), what this server is (host key, machine), the vendor keys, the anchor file, the
newest check-in with the vendor and the time. Storage-wide causes break every
certificate; per-certificate causes break one.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from google.protobuf.message import DecodeError
from nacl.signing import VerifyKey

from services.license_server.domain.ledger import (
    SEALED,
    Anchor,
    CertificateState,
    computed_hash,
    envelope_digest,
    is_authentic,
)
from services.license_server.domain.model import LedgerEntry, Seal, StoredCertificate
from services.license_server.domain.vendor_standing import (
    CHECK_IN_OVERDUE,
    CheckInView,
    Standing,
    overdue_detail,
    standing_of,
)
from tessera.clock import from_timestamp
from tessera.common.v1.common_pb2 import LicenseCertificate, SignedEnvelope
from tessera.envelope import open_envelope
from tessera.errors import EnvelopeRejected, UnknownSigningKey
from tessera.keys import HostIdentity

# Why a certificate does not serve.
DATABASE_COPIED = "DATABASE_COPIED"
MACHINE_CHANGED = "MACHINE_CHANGED"
LEDGER_TAMPERED = "LEDGER_TAMPERED"
BACKUP_RESTORED = "BACKUP_RESTORED"
CLOCK_SET_BACK = "CLOCK_SET_BACK"
BAD_SIGNATURE = "BAD_SIGNATURE"
UNTRUSTED_VENDOR_KEY = "UNTRUSTED_VENDOR_KEY"
WRONG_HOST = "CERTIFICATE_FOR_ANOTHER_HOST"

# How far the clock may step back (NTP corrections, DST mistakes) before it counts.
CLOCK_TOLERANCE = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class Problem:
    cause: str
    detail: str

    def __str__(self) -> str:
        return f"{self.cause}: {self.detail}"


@dataclass(frozen=True)
class Verdict:
    """One certificate's standing: broken (cause set), expired, or serving."""

    stored: StoredCertificate
    document: LicenseCertificate | None
    problem: Problem | None
    expired: bool
    # With a check-in policy: when the next check-in is due, and when the seats stop
    # serving without one (vendor_standing.py).
    check_in_due: dt.datetime | None = None
    check_in_deadline: dt.datetime | None = None


@dataclass(frozen=True)
class TrustReport:
    host_id: str
    sealed_host_id: str
    # The storage-wide problem, if any: it breaks every certificate and blocks changes.
    storage_problem: Problem | None
    clock_set_back: bool
    clock_high_water: dt.datetime | None
    verdicts: list[Verdict]
    # The newest verified check-in with the vendor, if any.
    check_in: CheckInView | None = None

    @property
    def problems(self) -> list[Problem]:
        found = [] if self.storage_problem is None else [self.storage_problem]
        for verdict in self.verdicts:
            if verdict.problem is not None and verdict.problem not in found:
                found.append(verdict.problem)
        return found

    @property
    def healthy(self) -> bool:
        return all(v.problem is None for v in self.verdicts) and self.storage_problem is None


def inspect(
    seal: Seal | None,
    segment: Sequence[LedgerEntry],
    rows: Sequence[StoredCertificate],
    identity: HostIdentity,
    vendor_keys: Mapping[str, VerifyKey],
    anchor: Anchor | None,
    anchored_hash: bytes | None,
    now: dt.datetime,
    check_in: CheckInView | None = None,
) -> TrustReport:
    """Judge trusted storage; ``anchored_hash`` is the stored hash of the entry the anchor
    names (None when there is no such entry), ``check_in`` the newest verified check-in
    with the vendor."""
    storage = storage_problem(seal, segment, identity, anchor, anchored_hash)
    clock_set_back = seal is not None and (
        seal.clock_set_back_at is not None or now < seal.clock_high_water - CLOCK_TOLERANCE
    )
    expected = _expected_states(segment)
    sealed_host_id = seal.host_id if seal is not None else identity.host_id
    verdicts = []
    for row in rows:
        if row.returned_at is not None:
            continue  # returned (or removed by a repair): it never serves again
        state = expected.get(row.certificate_id)
        document, problem = _judge(row, state, sealed_host_id, vendor_keys)
        expires_at = (
            from_timestamp(document.expires_at)
            if document is not None and document.HasField("expires_at")
            else None
        )
        standing = Standing(None, None, None)
        if document is not None and problem is None and storage is None:
            standing = standing_of(document, check_in)
            if standing.withdrawn is not None:
                problem = Problem(standing.withdrawn.cause, standing.withdrawn.detail)
        # A check-in deadline is a time limit too: a clock set back would stretch it.
        limited = expires_at is not None or standing.deadline is not None
        if storage is not None:
            problem = storage
        elif problem is None and clock_set_back and limited:
            assert seal is not None
            problem = Problem(
                CLOCK_SET_BACK,
                "the clock was set back behind "
                f"{seal.clock_high_water.isoformat(timespec='seconds')}, "
                "so this time-limited license cannot be trusted to expire",
            )
        elif problem is None and standing.deadline is not None and now > standing.deadline:
            assert standing.due is not None
            problem = Problem(CHECK_IN_OVERDUE, overdue_detail(standing.due, standing.deadline))
        verdicts.append(
            Verdict(
                row,
                document,
                problem,
                expires_at is not None and expires_at <= now,
                standing.due,
                standing.deadline,
            )
        )
    return TrustReport(
        host_id=identity.host_id,
        sealed_host_id=sealed_host_id,
        storage_problem=storage,
        clock_set_back=clock_set_back,
        clock_high_water=seal.clock_high_water if seal is not None else None,
        verdicts=verdicts,
        check_in=check_in,
    )


def storage_problem(
    seal: Seal | None,
    segment: Sequence[LedgerEntry],
    identity: HostIdentity,
    anchor: Anchor | None,
    anchored_hash: bytes | None,
) -> Problem | None:
    """What breaks the whole of trusted storage, if anything."""
    if seal is None:
        return Problem(LEDGER_TAMPERED, "the seal of trusted storage is missing")
    if not is_authentic(seal):
        return Problem(LEDGER_TAMPERED, "the seal's signature does not match its content")
    if seal.host_public_key != identity.public_key:
        return Problem(
            DATABASE_COPIED,
            f"trusted storage belongs to host {seal.host_id}, not to this License Server "
            f"({identity.host_id}): the database was copied from another server",
        )
    if seal.machine_binding != identity.machine_binding:
        return Problem(
            MACHINE_CHANGED,
            f"trusted storage is sealed to host {seal.host_id} on another machine; on this "
            f"machine the host id is {identity.host_id}",
        )
    broken_chain = _chain_problem(seal, segment)
    if broken_chain is not None:
        return Problem(LEDGER_TAMPERED, broken_chain)
    if anchor is not None and anchor.sequence > seal.head_sequence:
        return Problem(
            BACKUP_RESTORED,
            f"the ledger ends at entry {seal.head_sequence} but this server wrote entry "
            f"{anchor.sequence}: an older copy of the database was restored",
        )
    if anchor is not None and anchored_hash != anchor.hash:
        return Problem(
            BACKUP_RESTORED,
            f"ledger entry {anchor.sequence} is not the one this server wrote: the database "
            "was replaced by another copy",
        )
    return None


def _chain_problem(seal: Seal, segment: Sequence[LedgerEntry]) -> str | None:
    if not segment or segment[0].action != SEALED:
        return "the ledger has no seal entry"
    previous: LedgerEntry | None = None
    for entry in segment:
        if computed_hash(entry) != entry.hash:
            return f"ledger entry {entry.sequence} was edited"
        if previous is not None:
            if entry.sequence != previous.sequence + 1:
                return f"ledger entries {previous.sequence + 1}-{entry.sequence - 1} are missing"
            if entry.previous_hash != previous.hash:
                return f"ledger entry {entry.sequence} does not follow entry {previous.sequence}"
        previous = entry
    last = segment[-1]
    if (last.sequence, last.hash) != (seal.head_sequence, seal.head_hash):
        return (
            f"the ledger ends at entry {last.sequence} but the seal names entry "
            f"{seal.head_sequence}: entries were deleted or added"
        )
    return None


def _expected_states(segment: Sequence[LedgerEntry]) -> dict[str, CertificateState]:
    states: dict[str, CertificateState] = {}
    for entry in segment:
        if entry.certificate_id:
            states[entry.certificate_id] = CertificateState.from_json(entry.state)
    return states


def state_of(certificate: StoredCertificate) -> CertificateState:
    """The ledger's view of a stored certificate."""
    return CertificateState(
        count=certificate.count,
        revision=certificate.revision,
        returning=certificate.returning,
        returned=certificate.returned_at is not None,
        envelope_sha256=envelope_digest(certificate.envelope),
    )


def _judge(
    row: StoredCertificate,
    expected: CertificateState | None,
    sealed_host_id: str,
    vendor_keys: Mapping[str, VerifyKey],
) -> tuple[LicenseCertificate | None, Problem | None]:
    try:
        document = open_envelope(
            SignedEnvelope.FromString(row.envelope), LicenseCertificate, vendor_keys
        )
    except UnknownSigningKey as error:
        return None, Problem(UNTRUSTED_VENDOR_KEY, error.message)
    except (EnvelopeRejected, DecodeError, ValueError) as error:
        return None, Problem(BAD_SIGNATURE, f"the certificate does not verify: {error}")
    signed_expiry = from_timestamp(document.expires_at) if document.HasField("expires_at") else None
    if (document.certificate_id, document.feature, document.count, signed_expiry) != (
        row.certificate_id,
        row.feature,
        row.count,
        row.expires_at,
    ):
        return document, Problem(LEDGER_TAMPERED, "the stored row differs from its certificate")
    if document.host_id != sealed_host_id:
        return document, Problem(
            WRONG_HOST, f"the certificate is bound to host {document.host_id}, not this one"
        )
    if expected is None:
        return document, Problem(LEDGER_TAMPERED, "the certificate is not in the ledger")
    actual = state_of(row)
    if actual != expected:
        return document, Problem(
            LEDGER_TAMPERED, "the certificate's stored state differs from the ledger"
        )
    return document, None
