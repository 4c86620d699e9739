"""Returning seats to the vendor: withhold first, sign, then install the vendor's receipt.

``prepare`` takes the seats out of the pool in the same transaction that signs the
request, so they stop serving before the vendor can credit them back; leases on them are
refused (SEATS_IN_USE) or, when forced, revoked with LICENSE_RETURNED. ``complete``
installs the vendor-signed receipt: credited seats leave for good (a partial return
installs the re-issued certificate), a refusal puts the seats back, and a vendor that no
longer records the certificate as this host's makes it leave too. Both are idempotent.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace

from services.license_server.domain import ledger, pools
from services.license_server.domain.errors import (
    AnswerDoesNotMatch,
    CertificateForAnotherHost,
    CertificateNotFound,
    CertificateReturned,
    PartialReturnNotAllowed,
    RequestIdReused,
    RequestNotPreparedHere,
    ReturnInProgress,
)
from services.license_server.domain.model import (
    LeaseEnded,
    PendingRequest,
    RequestKind,
    StoredCertificate,
)
from services.license_server.domain.pools import fit_pool
from services.license_server.domain.ports import DuplicateKey
from services.license_server.domain.trusted_storage import (
    TrustedStorage,
    certificate_of,
    request_id_or_new,
    stored_from,
)
from tessera.activation.v1.activation_pb2 import (
    HostReturnRequest,
    ReturnOutcome,
    VendorReturnReceipt,
)
from tessera.clock import to_timestamp
from tessera.common.v1.common_pb2 import LicenseCertificate, SignedEnvelope
from tessera.envelope import open_envelope, seal
from tessera.errors import InvalidInput
from tessera.server import failpoints
from tessera.validation import checked_text

# The vendor's refusal that means "this host does not hold the certificate any more".
CERTIFICATE_NOT_HELD = "CERTIFICATE_NOT_HELD"


@dataclass(frozen=True)
class Prepared:
    request_id: str
    request: SignedEnvelope
    revoked_leases: int


@dataclass(frozen=True)
class Completed:
    credited: bool
    count: int
    remaining: tuple[LicenseCertificate, StoredCertificate] | None
    already_completed: bool


class Returns:
    """Gives seats back to the vendor, never serving a seat the vendor has credited."""

    def __init__(self, trusted_storage: TrustedStorage) -> None:
        self.storage = trusted_storage

    async def prepare(
        self, certificate_id: str, count: int, request_id: str, force: bool
    ) -> Prepared:
        certificate_id = checked_text("certificate_id", certificate_id, 64, required=True)
        if count < 0:
            raise InvalidInput("count", f"must be 0 (all seats) or more, not {count}")
        request_id = request_id_or_new(request_id)
        storage = self.storage
        now = storage.clock.now()
        for _attempt in range(2):
            try:
                async with storage.store.transaction() as repo:
                    # Lock first: a concurrent prepare with this request id is then seen.
                    seal_row = await storage.require_sound(repo)
                    existing = await repo.get_pending_request(request_id)
                    if existing is not None:
                        return _same_request(existing, certificate_id, count)
                    stored = await repo.get_certificate(certificate_id)
                    if stored is None:
                        raise CertificateNotFound(
                            f"no certificate {certificate_id} in trusted storage; "
                            "`tessera licenses` lists the certificates held",
                            metadata={"certificate_id": certificate_id},
                        )
                    _check_returnable(stored, count)
                    seats = count or stored.count
                    document = certificate_of(stored)
                    envelope = seal(
                        HostReturnRequest(
                            request_id=request_id,
                            host_id=storage.identity.host_id,
                            host_public_key=storage.identity.public_key,
                            machine_binding=storage.identity.machine_binding,
                            certificate_id=certificate_id,
                            count=seats,
                            revision=stored.revision,
                            created_at=to_timestamp(now),
                        ),
                        storage.identity.host_id,
                        storage.identity.signing_key,
                    )
                    withheld = replace(stored, returning=seats, return_request_id=request_id)
                    await repo.update_certificate(withheld)
                    await repo.insert_pending_request(
                        PendingRequest(
                            request_id=request_id,
                            activation_id=document.activation_id,
                            count=seats,
                            request_envelope=envelope.SerializeToString(),
                            installed_at=None,
                            kind=RequestKind.RETURN,
                            certificate_id=certificate_id,
                        ),
                        now,
                    )
                    written = await storage.record(
                        repo, seal_row, now, [(ledger.RETURN_PREPARED, withheld)]
                    )
                    events = await fit_pool(
                        repo,
                        stored.feature,
                        now,
                        pools.LICENSE_RETURNED,
                        f"the {stored.feature} license behind this lease is being returned "
                        "to the vendor",
                        revoke=force,
                    )
            except DuplicateKey:
                continue  # a concurrent prepare with the same request id won; read it
            storage.anchor.advance(written)
            storage.publish(events)
            failpoints.reach("license_server.return.after_prepare")
            revoked = sum(isinstance(event, LeaseEnded) for event in events)
            return Prepared(request_id, envelope, revoked)
        raise AssertionError("unreachable: a duplicate key is visible on retry")

    async def complete(self, receipt_envelope: SignedEnvelope) -> Completed:
        storage = self.storage
        trusted = storage.vendor_keys()
        receipt = open_envelope(receipt_envelope, VendorReturnReceipt, trusted)
        if receipt.host_id != storage.identity.host_id:
            raise CertificateForAnotherHost(
                f"this receipt is for host {receipt.host_id}, not this License Server "
                f"({storage.identity.host_id}); install it on the License Server that asked",
                metadata={"host_id": receipt.host_id},
            )
        remaining_document = None
        if receipt.HasField("remaining_certificate"):
            remaining_document = storage.open_certificate(receipt.remaining_certificate, trusted)
        now = storage.clock.now()
        async with storage.store.transaction() as repo:
            # Lock first, so a duplicate delivery of this receipt waits and then sees it done.
            await repo.get_seal(lock=True)
            pending = await repo.get_pending_request(receipt.request_id)
            if pending is None or pending.kind is not RequestKind.RETURN:
                raise RequestNotPreparedHere(
                    f"return {receipt.request_id!r} was not prepared by this License Server; "
                    "install the receipt on the License Server that prepared the return",
                    metadata={"request_id": receipt.request_id},
                )
            if pending.certificate_id != receipt.certificate_id:
                raise AnswerDoesNotMatch(
                    f"the receipt is for another certificate than return {receipt.request_id!r} "
                    "returns; ask the vendor again with the same request"
                )
            credited = receipt.outcome == ReturnOutcome.RETURN_OUTCOME_CREDITED
            if pending.installed_at is not None:
                remaining = None
                stored = await repo.get_certificate(receipt.certificate_id)
                if credited and stored is not None and stored.returned_at is None:
                    remaining = (certificate_of(stored), stored)
                return Completed(credited, receipt.credited, remaining, already_completed=True)
            seal_row = await storage.require_sound(repo)
            stored = await repo.get_certificate(receipt.certificate_id)
            assert stored is not None, "a prepared return's certificate is never deleted"
            action, after = _after_receipt(receipt, pending, stored, remaining_document, now)
            await repo.update_certificate(after)
            await repo.mark_request_installed(pending.request_id, now)
            written = await storage.record(repo, seal_row, now, [(action, after)])
            events = await fit_pool(
                repo,
                stored.feature,
                now,
                pools.LICENSE_RETURNED,
                f"the {stored.feature} license behind this lease was returned to the vendor",
            )
        storage.anchor.advance(written)
        storage.publish(events)
        failpoints.reach("license_server.return.after_complete")
        kept = None
        if action == ledger.REISSUED and remaining_document is not None:
            kept = (remaining_document, after)
        return Completed(credited, receipt.credited, kept, already_completed=False)


def _same_request(existing: PendingRequest, certificate_id: str, count: int) -> Prepared:
    if (
        existing.kind is not RequestKind.RETURN
        or existing.certificate_id != certificate_id
        or (count and existing.count != count)
    ):
        raise RequestIdReused(
            f"request id {existing.request_id!r} was prepared for another request; use a new "
            "request id (or none)",
            metadata={"request_id": existing.request_id},
        )
    return Prepared(existing.request_id, SignedEnvelope.FromString(existing.request_envelope), 0)


def _check_returnable(stored: StoredCertificate, count: int) -> None:
    if stored.returned_at is not None:
        raise CertificateReturned(
            f"certificate {stored.certificate_id} was returned already; nothing to return",
            metadata={"certificate_id": stored.certificate_id},
        )
    if stored.returning:
        raise ReturnInProgress(
            f"return {stored.return_request_id} of certificate {stored.certificate_id} is "
            "under way; complete it first",
            metadata={"request_id": stored.return_request_id or ""},
        )
    if count > stored.count:
        raise InvalidInput(
            "count", f"certificate {stored.certificate_id} holds {stored.count} seat(s)"
        )
    if 0 < count < stored.count and not certificate_of(stored).partial_return_allowed:
        raise PartialReturnNotAllowed(
            f"certificate {stored.certificate_id} returns as a whole ({stored.count} seats): "
            "what one activation brought is returned together (leave the count out)",
            metadata={"certificate_id": stored.certificate_id},
        )


def _after_receipt(
    receipt: VendorReturnReceipt,
    pending: PendingRequest,
    stored: StoredCertificate,
    remaining: LicenseCertificate | None,
    now: dt.datetime,
) -> tuple[str, StoredCertificate]:
    """The ledger action and the certificate as it stands after the vendor's receipt.

    A repair installed between the return's two halves may have moved the certificate on
    already (re-issued it with a higher revision, or removed it when the vendor had
    credited it): then the receipt only settles what is still withheld for this return.
    """
    ours = stored.return_request_id == pending.request_id
    released = replace(stored, returning=0, return_request_id=None) if ours else stored
    if receipt.outcome == ReturnOutcome.RETURN_OUTCOME_REFUSED:
        if receipt.refusal_reason == CERTIFICATE_NOT_HELD:
            return ledger.REMOVED, replace(released, returned_at=stored.returned_at or now)
        return ledger.RETURN_REFUSED, released
    if receipt.outcome != ReturnOutcome.RETURN_OUTCOME_CREDITED:
        raise AnswerDoesNotMatch("the receipt neither credits nor refuses the return")
    if receipt.credited != pending.count:
        raise AnswerDoesNotMatch(
            f"the receipt credits {receipt.credited} seat(s); {pending.count} were returned"
        )
    if stored.returned_at is not None:
        return ledger.RETURN_SETTLED, released
    if not receipt.HasField("remaining_certificate"):
        return ledger.RETURNED, replace(released, returned_at=now)
    if remaining is None or remaining.certificate_id != stored.certificate_id:
        raise AnswerDoesNotMatch("the receipt's certificate for the seats kept is another one")
    if remaining.revision <= stored.revision:
        return ledger.RETURN_SETTLED, released  # a repair already re-issued the seats kept
    if remaining.count != stored.count - receipt.credited:
        raise AnswerDoesNotMatch("the receipt's certificate does not hold the seats kept")
    kept = stored_from(remaining, receipt.remaining_certificate, stored.installed_at)
    return ledger.REISSUED, replace(kept, broken_cause=stored.broken_cause)
