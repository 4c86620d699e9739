"""Trusted storage: the host identity, the vendor-signed certificates this host holds,
and the sealed ledger that makes tampering with them evident.

Activation has two halves here. ``prepare_activation`` signs a request with the host key
and journals it as pending; ``install_activation`` accepts only a vendor-signed answer
addressed to this host and to a request it prepared, and adds its seats to the pool.
Both are idempotent by request id. Every change to a certificate is recorded in the
ledger in the same transaction (see ``ledger.py``); ``check`` re-judges everything and
takes broken certificates' seats out of service (see ``trust.py``). Returns and repairs
live in ``returns.py`` and ``repairs.py`` and use the pieces here.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from nacl.signing import VerifyKey

from services.license_server.domain import ledger, pools
from services.license_server.domain.errors import (
    CertificateForAnotherHost,
    CertificateMismatch,
    CertificateReturned,
    RequestIdReused,
    RequestNotPreparedHere,
    TrustedStorageBroken,
)
from services.license_server.domain.events import LeaseBus
from services.license_server.domain.ledger import Anchor, AnchorFile
from services.license_server.domain.metrics import LeaseMetrics
from services.license_server.domain.model import (
    LeaseEvent,
    LedgerEntry,
    PendingRequest,
    RequestKind,
    Seal,
    StoredCertificate,
)
from services.license_server.domain.pools import fit_pool
from services.license_server.domain.ports import DuplicateKey, LicenseStore, Queries
from services.license_server.domain.trust import TrustReport, inspect, state_of, storage_problem
from services.license_server.domain.vendor_standing import (
    CERTIFICATE_SUPERSEDED,
    CHECK_IN_OVERDUE,
    LICENSE_NOT_HELD,
    view_of,
)
from tessera.activation.v1.activation_pb2 import HostActivationRequest, VendorActivationResponse
from tessera.clock import Clock, from_timestamp, to_timestamp
from tessera.common.v1.common_pb2 import LicenseCertificate, LicenseKind, SignedEnvelope
from tessera.envelope import open_envelope, seal
from tessera.errors import InvalidInput
from tessera.ids import ACTIVATION_PREFIX, parse_id
from tessera.keys import HostIdentity
from tessera.server import failpoints

log = logging.getLogger("tessera.license_server.trust")

REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
MAX_COUNT = 100_000
# The clock high-water mark is written at most this often.
HIGH_WATER_STEP = dt.timedelta(minutes=1)


@dataclass(frozen=True)
class Installed:
    certificate: LicenseCertificate
    stored: StoredCertificate
    already_installed: bool


def request_id_or_new(request_id: str) -> str:
    if request_id and not REQUEST_ID.match(request_id):
        raise InvalidInput("request_id", "1-128 letters, digits or ._:-")
    return request_id or str(uuid.uuid4())


def certificate_of(stored: StoredCertificate) -> LicenseCertificate:
    """The document inside a stored envelope (verified when it was stored)."""
    return LicenseCertificate.FromString(SignedEnvelope.FromString(stored.envelope).payload)


def stored_from(
    document: LicenseCertificate, envelope: SignedEnvelope, installed_at: dt.datetime
) -> StoredCertificate:
    return StoredCertificate(
        certificate_id=document.certificate_id,
        request_id=document.request_id,
        feature=document.feature,
        count=document.count,
        envelope=envelope.SerializeToString(),
        installed_at=installed_at,
        expires_at=from_timestamp(document.expires_at) if document.HasField("expires_at") else None,
        revision=document.revision,
    )


class TrustedStorage:
    """The certificates this License Server holds and how they got here."""

    def __init__(
        self,
        store: LicenseStore,
        identity: HostIdentity,
        vendor_keys: Callable[[], Mapping[str, VerifyKey]],
        clock: Clock,
        anchor: AnchorFile,
        bus: LeaseBus | None = None,
        metrics: LeaseMetrics | None = None,
    ) -> None:
        self.store = store
        self.identity = identity
        self.vendor_keys = vendor_keys
        self.clock = clock
        self.anchor = anchor
        self.bus = bus or LeaseBus()
        self.metrics = metrics or LeaseMetrics()

    # Sealing, judging, recording

    async def open(self) -> None:
        """Seal trusted storage on first start (adopting certificates stored before the
        ledger existed). A database that lost its seal while this server's anchor says
        it sealed one is left unsealed: ``check`` reports it and repair re-seals it."""
        now = self.clock.now()
        anchor = self.anchor.read()
        try:
            async with self.store.transaction() as repo:
                if await repo.get_seal(lock=True) is not None:
                    return
                live = [c for c in await repo.list_certificates() if c.returned_at is None]
                if anchor is not None and live:
                    log.error("trusted storage has lost its seal; run repair")
                    return
                start = (anchor.sequence, anchor.hash) if anchor else (0, ledger.GENESIS_HASH)
                written = await self._reseal(
                    repo, now, start, [(ledger.ADOPTED, c) for c in live], clock_set_back_at=None
                )
        except DuplicateKey:
            return  # another replica sealed it at the same moment
        self.anchor.advance(written)

    async def judge(self) -> TrustReport:
        """Judge trusted storage now, changing nothing (``check`` acts on the verdict)."""
        now = self.clock.now()
        anchor = self.anchor.read()
        async with self.store.transaction() as repo:
            _, report = await self._judged(repo, now, anchor, lock=False)
        return report

    async def check(self) -> TrustReport:
        """Judge trusted storage now and take broken certificates out of service (or put
        repaired ones back); advances or latches the clock high-water mark."""
        now = self.clock.now()
        anchor = self.anchor.read()
        events: list[LeaseEvent] = []
        async with self.store.transaction() as repo:
            seal_row, report = await self._judged(repo, now, anchor, lock=True)
            if seal_row is not None and report.storage_problem is None:
                await self._move_high_water(repo, seal_row, report, now)
            for verdict in report.verdicts:
                cause = verdict.problem.cause if verdict.problem else None
                detail = verdict.problem.detail if verdict.problem else None
                stored = verdict.stored
                if (stored.broken_cause, stored.broken_detail) != (cause, detail):
                    if cause is not None:
                        log.error("certificate %s is broken: %s", stored.certificate_id, detail)
                    await repo.update_certificate(
                        replace(stored, broken_cause=cause, broken_detail=detail)
                    )
            # Every pool, not only the ones whose certificates changed: a pool row edited
            # by hand is put right too.
            withdrawn = _withdrawn_by_check_in(report)
            for feature in await repo.pool_features():
                why, message = withdrawn.get(
                    feature,
                    (
                        pools.TRUSTED_STORAGE_BROKEN,
                        f"trusted storage broke for the {feature} license behind this lease",
                    ),
                )
                events += await fit_pool(repo, feature, now, why, message)
        self.publish(events)
        return report

    async def _judged(
        self, repo: Queries, now: dt.datetime, anchor: Anchor | None, *, lock: bool
    ) -> tuple[Seal | None, TrustReport]:
        # The anchor is read before the transaction: read inside, it could name an entry
        # committed after this transaction's snapshot, which would look like a restore.
        seal_row = await repo.get_seal(lock=lock)
        report = inspect(
            seal_row,
            await repo.ledger_since_last_seal(),
            await repo.list_certificates(),
            self.identity,
            self.vendor_keys(),
            anchor,
            await repo.ledger_hash_at(anchor.sequence) if anchor else None,
            now,
            view_of(
                await repo.installed_check_ins(self.identity.host_id),
                self.identity.host_id,
                self.vendor_keys(),
            ),
        )
        return seal_row, report

    async def require_sound(self, repo: Queries) -> Seal:
        """The seal, locked for a ledger append; TrustedStorageBroken when storage as a
        whole is broken (copied, moved, tampered with, restored): repair it first."""
        seal_row = await repo.get_seal(lock=True)
        anchor = self.anchor.read()
        problem = storage_problem(
            seal_row,
            await repo.ledger_since_last_seal(),
            self.identity,
            anchor,
            await repo.ledger_hash_at(anchor.sequence) if anchor else None,
        )
        if problem is not None or seal_row is None:
            raise TrustedStorageBroken(
                f"trusted storage is broken ({problem}); nothing changes until it is repaired: "
                "`tessera trust` says why, `tessera repair` fixes it",
                metadata={"cause": problem.cause if problem else ""},
            )
        return seal_row

    async def record(
        self,
        repo: Queries,
        seal_row: Seal,
        now: dt.datetime,
        changes: Iterable[tuple[str, StoredCertificate]],
    ) -> Anchor:
        """Append the certificates' new states to the ledger and re-sign the seal. The
        caller advances the anchor file after its transaction commits."""
        entries = _chain(seal_row.head_sequence, seal_row.head_hash, now, changes)
        await repo.append_ledger(entries)
        assert entries, "record at least one change"
        head = entries[-1]
        await repo.put_seal(
            ledger.sign_seal(
                self.identity,
                head.sequence,
                head.hash,
                max(seal_row.clock_high_water, now),
                seal_row.clock_set_back_at,
            )
        )
        return Anchor(head.sequence, head.hash)

    async def reseal(
        self,
        repo: Queries,
        now: dt.datetime,
        changes: Sequence[tuple[str, StoredCertificate]],
    ) -> Anchor:
        """Start a new ledger segment sealed to this host and machine (repair)."""
        old = await repo.get_seal(lock=True)
        anchor = self.anchor.read()
        head = (old.head_sequence, old.head_hash) if old else (0, ledger.GENESIS_HASH)
        if anchor is not None and anchor.sequence > head[0]:
            head = (anchor.sequence, head[1])  # never reuse a number the anchor has seen
        return await self._reseal(repo, now, head, changes, clock_set_back_at=None)

    async def _reseal(
        self,
        repo: Queries,
        now: dt.datetime,
        head: tuple[int, bytes],
        changes: Sequence[tuple[str, StoredCertificate]],
        clock_set_back_at: dt.datetime | None,
    ) -> Anchor:
        sealed = ledger.next_entry(
            head[0],
            head[1],
            now,
            ledger.SEALED,
            None,
            ledger.canonical({"host_id": self.identity.host_id}),
        )
        entries = [sealed, *_chain(sealed.sequence, sealed.hash, now, changes)]
        await repo.append_ledger(entries)
        last = entries[-1]
        await repo.put_seal(
            ledger.sign_seal(self.identity, last.sequence, last.hash, now, clock_set_back_at)
        )
        return Anchor(last.sequence, last.hash)

    async def _move_high_water(
        self, repo: Queries, seal_row: Seal, report: TrustReport, now: dt.datetime
    ) -> None:
        if report.clock_set_back:
            if seal_row.clock_set_back_at is None:
                log.error(
                    "the clock is behind its high-water mark %s: time-limited licenses stop "
                    "until repair",
                    seal_row.clock_high_water.isoformat(),
                )
                await repo.put_seal(
                    ledger.sign_seal(
                        self.identity,
                        seal_row.head_sequence,
                        seal_row.head_hash,
                        seal_row.clock_high_water,
                        now,
                    )
                )
        elif now >= seal_row.clock_high_water + HIGH_WATER_STEP:
            await repo.put_seal(
                ledger.sign_seal(
                    self.identity,
                    seal_row.head_sequence,
                    seal_row.head_hash,
                    now,
                    seal_row.clock_set_back_at,
                )
            )

    def publish(self, events: Sequence[LeaseEvent]) -> None:
        """Tell the streams what a committed change did to their leases (and count the
        leases it revoked)."""
        for event in events:
            self.bus.publish(event)
        self.metrics.revoked(events)

    # Activation

    async def prepare_activation(
        self, activation_id: str, count: int, request_id: str
    ) -> tuple[str, SignedEnvelope]:
        """A host-signed activation request, journaled as pending (same id, same bytes)."""
        activation_id = parse_id(ACTIVATION_PREFIX, activation_id, "activation_id")
        if not 1 <= count <= MAX_COUNT:
            raise InvalidInput("count", f"must be between 1 and {MAX_COUNT}, not {count}")
        request_id = request_id_or_new(request_id)
        now = self.clock.now()
        document = HostActivationRequest(
            request_id=request_id,
            activation_id=activation_id,
            count=count,
            host_id=self.identity.host_id,
            host_public_key=self.identity.public_key,
            machine_binding=self.identity.machine_binding,
            created_at=to_timestamp(now),
            kind=LicenseKind.LICENSE_KIND_NETWORK,
        )
        envelope = seal(document, self.identity.host_id, self.identity.signing_key)
        pending = PendingRequest(
            request_id, activation_id, count, envelope.SerializeToString(), installed_at=None
        )
        existing = await self.journal_request(pending, now)
        if existing is None:
            failpoints.reach("license_server.activate.after_prepare")
            return request_id, envelope
        if existing.kind is not RequestKind.ACTIVATE or (
            existing.activation_id,
            existing.count,
        ) != (activation_id, count):
            raise RequestIdReused(
                f"request id {request_id!r} was prepared for another request; use a new "
                "request id (or none)",
                metadata={"request_id": request_id},
            )
        return request_id, SignedEnvelope.FromString(existing.request_envelope)

    async def journal_request(
        self, pending: PendingRequest, now: dt.datetime
    ) -> PendingRequest | None:
        """Journal a signed request; the one journaled before under its id, if any."""
        for _attempt in range(2):
            try:
                async with self.store.transaction() as repo:
                    existing = await repo.get_pending_request(pending.request_id)
                    if existing is None:
                        await repo.insert_pending_request(pending, now)
                    return existing
            except DuplicateKey:
                continue  # a concurrent call with the same request id won; read its answer
        raise AssertionError("unreachable: a duplicate key is visible on retry")

    async def install_activation(self, response_envelope: SignedEnvelope) -> Installed:
        """Install a vendor-signed answer addressed to this host and to a request it made."""
        trusted = self.vendor_keys()
        response = open_envelope(response_envelope, VendorActivationResponse, trusted)
        certificate = self.open_certificate(response.certificate, trusted)
        if response.host_id != self.identity.host_id:
            raise CertificateForAnotherHost(
                f"this answer is for host {response.host_id}, not this License Server "
                f"({self.identity.host_id}); install it on the License Server that asked",
                metadata={"host_id": response.host_id},
            )
        now = self.clock.now()
        for _attempt in range(2):
            try:
                return await self._install(response.request_id, certificate, response, now)
            except DuplicateKey:
                continue  # a concurrent install of the same answer won; it is installed
        raise AssertionError("unreachable: a duplicate key is visible on retry")

    def open_certificate(
        self, envelope: SignedEnvelope, trusted: Mapping[str, VerifyKey]
    ) -> LicenseCertificate:
        """Verify a vendor certificate bound to this host for network seats."""
        certificate = open_envelope(envelope, LicenseCertificate, trusted)
        if certificate.host_id != self.identity.host_id:
            raise CertificateForAnotherHost(
                f"the certificate is bound to host {certificate.host_id}, not "
                f"{self.identity.host_id}; install it on the License Server that asked",
                metadata={"host_id": certificate.host_id},
            )
        if certificate.kind != LicenseKind.LICENSE_KIND_NETWORK:
            raise CertificateMismatch(
                "only network licenses are installed on a License Server; a local license "
                "goes into its client host's local license store"
            )
        return certificate

    async def _install(
        self,
        request_id: str,
        certificate: LicenseCertificate,
        response: VendorActivationResponse,
        now: dt.datetime,
    ) -> Installed:
        async with self.store.transaction() as repo:
            pending = await repo.get_pending_request(request_id)
            if pending is None or pending.kind is not RequestKind.ACTIVATE:
                raise RequestNotPreparedHere(
                    f"request {request_id!r} was not prepared by this License Server; install "
                    "the answer on the License Server that prepared the request",
                    metadata={"request_id": request_id},
                )
            if (
                certificate.request_id != pending.request_id
                or certificate.activation_id != pending.activation_id
                or certificate.count != pending.count
            ):
                raise CertificateMismatch(
                    "the certificate does not match the request it answers; ask the vendor "
                    "again with the same request"
                )
            existing = await repo.get_certificate_for_request(pending.request_id)
            if existing is not None:
                if existing.returned_at is not None:
                    # An old answer replayed after the return: "already installed" would
                    # tell the caller the returned seats serve again.
                    raise CertificateReturned(
                        f"certificate {existing.certificate_id} answering request "
                        f"{request_id!r} was returned to the vendor; activate anew",
                        metadata={"certificate_id": existing.certificate_id},
                    )
                return Installed(certificate_of(existing), existing, already_installed=True)
            seal_row = await self.require_sound(repo)
            stored = stored_from(certificate, response.certificate, now)
            await repo.insert_certificate(stored)
            await repo.mark_request_installed(pending.request_id, now)
            written = await self.record(repo, seal_row, now, [(ledger.INSTALLED, stored)])
            events = await fit_pool(
                repo, stored.feature, now, pools.TRUSTED_STORAGE_BROKEN, "trusted storage changed"
            )
        self.anchor.advance(written)
        self.publish(events)
        failpoints.reach("license_server.activate.after_install")
        return Installed(certificate, stored, already_installed=False)

    async def list_certificates(self) -> list[tuple[LicenseCertificate, StoredCertificate]]:
        """Certificates held now (returned ones are gone)."""
        async with self.store.transaction() as repo:
            stored = await repo.list_certificates()
        return [(certificate_of(s), s) for s in stored if s.returned_at is None]


def _withdrawn_by_check_in(report: TrustReport) -> dict[str, tuple[tuple[str, str], str]]:
    """Per feature, why leases go when a check-in withdrew its seats (the reason told on
    the stream, and the message)."""
    reasons = {
        CERTIFICATE_SUPERSEDED: pools.CERTIFICATE_SUPERSEDED,
        LICENSE_NOT_HELD: pools.LICENSE_NOT_HELD,
        CHECK_IN_OVERDUE: pools.CHECK_IN_OVERDUE,
    }
    withdrawn: dict[str, tuple[tuple[str, str], str]] = {}
    for verdict in report.verdicts:
        if verdict.problem is not None and verdict.problem.cause in reasons:
            withdrawn.setdefault(
                verdict.stored.feature,
                (
                    reasons[verdict.problem.cause],
                    f"the {verdict.stored.feature} license behind this lease stopped serving: "
                    f"{verdict.problem.detail}",
                ),
            )
    return withdrawn


def _chain(
    sequence: int,
    previous_hash: bytes,
    now: dt.datetime,
    changes: Iterable[tuple[str, StoredCertificate]],
) -> list[LedgerEntry]:
    entries = []
    for action, certificate in changes:
        entry = ledger.next_entry(
            sequence,
            previous_hash,
            now,
            action,
            certificate.certificate_id,
            state_of(certificate).as_json(),
        )
        entries.append(entry)
        sequence, previous_hash = entry.sequence, entry.hash
    return entries
