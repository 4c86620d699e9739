"""Returns: a host gives seats back and the vendor answers with a signed receipt.

Only the host that holds a certificate, with the key that activated it, may return it;
those checks, and a certificate that is unknown or local, end the call with an error.
Every other decision is a signed VendorReturnReceipt recorded under the request id, so a
retry gets the same bytes: CREDITED (the seats go back to the entitlement line; a
partial return re-issues the certificate for the seats kept) or REFUSED with a reason,
after which the License Server serves the withheld seats again.

Vendor staff may also force the return of a certificate stranded on a host that died.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from enum import StrEnum

from services.activation_server.domain.audit import VENDOR_ACTOR
from services.activation_server.domain.certificates import reissue
from services.activation_server.domain.decisions import RefusalNote, decide_once
from services.activation_server.domain.errors import (
    CertificateNotFound,
    CertificateNotHeld,
    LocalLicenseNotReturnable,
    RequestIdReused,
    ReturnFromAnotherHost,
)
from services.activation_server.domain.host_requests import (
    checked_request_id,
    verify_host_signed,
)
from services.activation_server.domain.limits import Limits, iso_time, next_allowed
from services.activation_server.domain.metrics import VendorMetrics
from services.activation_server.domain.model import (
    ActivationRecord,
    ActivationState,
    EntitlementLine,
    LicenseKind,
    ReturnOutcome,
    ReturnRecord,
)
from services.activation_server.domain.ports import VendorRecords, VendorStore
from services.activation_server.domain.vendor_key import Signer
from tessera.activation.v1.activation_pb2 import HostReturnRequest, VendorReturnReceipt
from tessera.activation.v1.activation_pb2 import ReturnOutcome as ReturnOutcomeProto
from tessera.clock import Clock, from_timestamp, to_timestamp
from tessera.common.v1.common_pb2 import LicenseCertificate, SignedEnvelope
from tessera.validation import checked_text

MAX_CERTIFICATE_ID = 64
MAX_REASON = 1024


class ReturnRefusal(StrEnum):
    """Why a signed receipt refuses a return (``refusal_reason``)."""

    RETURN_LIMIT_REACHED = "RETURN_LIMIT_REACHED"
    PARTIAL_RETURN_NOT_ALLOWED = "PARTIAL_RETURN_NOT_ALLOWED"
    COUNT_ABOVE_HELD = "COUNT_ABOVE_HELD"
    STALE_REVISION = "STALE_REVISION"
    CERTIFICATE_EXPIRED = "CERTIFICATE_EXPIRED"
    CERTIFICATE_NOT_HELD = CertificateNotHeld.reason


class Returns:
    """Decides return requests from License Servers, and forced returns by vendor staff."""

    def __init__(
        self,
        store: VendorStore,
        signer: Signer,
        clock: Clock,
        limits: Limits,
        metrics: VendorMetrics | None = None,
    ) -> None:
        self.store = store
        self.signer = signer
        self.clock = clock
        self.limits = limits
        self.metrics = metrics or VendorMetrics()

    async def return_seats(self, envelope: SignedEnvelope) -> SignedEnvelope:
        """Decide a signed HostReturnRequest; the same request id gets the same receipt."""
        return await decide_once(
            self.store,
            self.clock,
            lambda: _Return(
                verify_host_signed(envelope, HostReturnRequest),
                self.signer,
                self.clock,
                self.limits,
            ),
            self.metrics.return_,
            "activation_server.return.after_commit",
        )

    async def force_return(self, certificate_id: str, reason: str) -> ActivationRecord:
        """Credit back every seat a certificate holds, without its host: for a License
        Server that died with licenses on it. Needs a reason; audited."""
        certificate_id = checked_text(
            "certificate_id", certificate_id, MAX_CERTIFICATE_ID, required=True
        )
        reason = checked_text("reason", reason, MAX_REASON, required=True)
        async with self.store.transaction() as repo:
            activation = await repo.find_certificate(certificate_id)
            if activation is None:
                raise CertificateNotFound(
                    f"no certificate {certificate_id}", metadata={"certificate_id": certificate_id}
                )
            if activation.state is not ActivationState.ACTIVE:
                raise CertificateNotHeld(
                    f"certificate {certificate_id} was already returned ({activation.state.value})",
                    metadata={"certificate_id": certificate_id},
                )
            if not await repo.credit_seats(activation.activation_id, activation.count):
                raise RuntimeError(
                    f"{activation.activation_id} has fewer seats activated than "
                    f"{certificate_id} holds"
                )
            now = self.clock.now()
            updated = replace(
                activation, count=0, state=ActivationState.FORCE_RETURNED, returned_at=now
            )
            await repo.save_certificate(updated)
            await repo.audit.append(
                now,
                "force_return",
                activation.activation_id,
                VENDOR_ACTOR,
                {
                    "certificate_id": certificate_id,
                    "host_id": activation.holder_host_id,
                    "credited": activation.count,
                    "reason": reason,
                },
            )
        self.metrics.forced_return()
        return updated


class _Return:
    """One verified return request, as ``decide_once`` decides it (a ``Decision``)."""

    def __init__(
        self, request: HostReturnRequest, signer: Signer, clock: Clock, limits: Limits
    ) -> None:
        checked_request_id(request.request_id)
        self.certificate_id = checked_text(
            "certificate_id", request.certificate_id, MAX_CERTIFICATE_ID, required=True
        )
        self.request = request
        self.signer = signer
        self.clock = clock
        self.limits = limits

    async def recorded(self, repo: VendorRecords) -> ReturnRecord | None:
        return await repo.get_return(self.request.host_id, self.request.request_id)

    def replay(self, recorded: ReturnRecord) -> SignedEnvelope:
        return _replay(recorded, self.request, self.certificate_id)

    async def decide(self, repo: VendorRecords) -> SignedEnvelope:
        request, certificate_id = self.request, self.certificate_id
        activation = await repo.find_certificate(certificate_id)
        if activation is None:
            raise CertificateNotFound(
                f"no certificate {certificate_id}", metadata={"certificate_id": certificate_id}
            )
        if (
            activation.holder_host_id != request.host_id
            or activation.host_public_key != request.host_public_key
        ):
            raise ReturnFromAnotherHost(
                f"certificate {certificate_id} is held by another host; only the License "
                "Server that holds it, with the key that activated it, may return it",
                metadata={"certificate_id": certificate_id},
            )
        if activation.kind is LicenseKind.LOCAL:
            raise LocalLicenseNotReturnable(
                f"certificate {certificate_id} is a local license; local licenses cannot be "
                "returned",
                metadata={"certificate_id": certificate_id},
            )
        # A concurrent retry may have decided while this one waited for the certificate.
        previous = await repo.get_return(request.host_id, request.request_id)
        if previous is not None:
            return _replay(previous, request, certificate_id)
        found = await repo.get_line(activation.activation_id)
        assert found is not None  # an activation's line is never deleted
        line, _ = found
        now = self.clock.now()
        refusal = _refusal(activation, line, request, now)
        if refusal is None:
            refusal = await self._cycling_refusal(repo, activation.entitlement_id, now)
        if refusal is not None:
            reason, message = refusal
            return await self._refuse(repo, request, activation, now, reason, message)
        return await self._credit(repo, request, activation, now)

    async def _cycling_refusal(
        self, repo: VendorRecords, entitlement_id: str, now: dt.datetime
    ) -> tuple[ReturnRefusal, str] | None:
        """RETURN_LIMIT_REACHED when the order's credited returns in the window are used up."""
        # Returns of one order are decided one at a time, so none slips past the limit.
        await repo.lock_entitlement(entitlement_id)
        window = self.limits.return_window
        credited = await repo.credited_returns_since(entitlement_id, now - window)
        limit = self.limits.max_returns_per_entitlement
        allowed_at = next_allowed(credited, limit, window)
        if allowed_at is None:
            return None
        when = (
            f"the next return is allowed from {iso_time(allowed_at)}"
            if limit
            else "this Activation Server accepts no returns"
        )
        return (
            ReturnRefusal.RETURN_LIMIT_REACHED,
            f"{entitlement_id} had {len(credited)} returns in the last {window.days} days "
            f"(at most {limit}); {when}",
        )

    async def _refuse(
        self,
        repo: VendorRecords,
        request: HostReturnRequest,
        activation: ActivationRecord,
        now: dt.datetime,
        reason: ReturnRefusal,
        message: str,
    ) -> SignedEnvelope:
        receipt = self.signer.seal(
            VendorReturnReceipt(
                request_id=request.request_id,
                host_id=request.host_id,
                certificate_id=activation.certificate_id,
                outcome=ReturnOutcomeProto.RETURN_OUTCOME_REFUSED,
                credited=0,
                refusal_reason=reason.value,
                refusal_message=message,
                decided_at=to_timestamp(now),
            )
        )
        await self._record(repo, request, activation, ReturnOutcome.REFUSED, 0, receipt, now)
        await repo.audit.append(
            now,
            "return.refused",
            activation.activation_id,
            request.host_id,
            {
                "request_id": request.request_id,
                "certificate_id": activation.certificate_id,
                "count": request.count,
                "revision": request.revision,
                "reason": reason.value,
                "message": message,
            },
        )
        return receipt

    async def _credit(
        self,
        repo: VendorRecords,
        request: HostReturnRequest,
        activation: ActivationRecord,
        now: dt.datetime,
    ) -> SignedEnvelope:
        if not await repo.credit_seats(activation.activation_id, request.count):
            raise RuntimeError(
                f"{activation.activation_id} has fewer seats activated than "
                f"{activation.certificate_id} holds"
            )
        kept = activation.count - request.count
        remaining: SignedEnvelope | None = None
        if kept == 0:
            updated = replace(activation, count=0, state=ActivationState.RETURNED, returned_at=now)
        else:
            remaining = reissue(activation, self.signer, now, count=kept)
            updated = replace(
                activation,
                count=kept,
                revision=activation.revision + 1,
                certificate_envelope=remaining.SerializeToString(),
            )
        await repo.save_certificate(updated)
        receipt = self.signer.seal(
            VendorReturnReceipt(
                request_id=request.request_id,
                host_id=request.host_id,
                certificate_id=activation.certificate_id,
                outcome=ReturnOutcomeProto.RETURN_OUTCOME_CREDITED,
                credited=request.count,
                remaining_certificate=remaining,
                decided_at=to_timestamp(now),
            )
        )
        await self._record(
            repo, request, activation, ReturnOutcome.CREDITED, request.count, receipt, now
        )
        await repo.audit.append(
            now,
            "return.credited",
            activation.activation_id,
            request.host_id,
            {
                "request_id": request.request_id,
                "certificate_id": activation.certificate_id,
                "credited": request.count,
                "kept": kept,
                "revision": updated.revision,
            },
        )
        return receipt

    async def _record(
        self,
        repo: VendorRecords,
        request: HostReturnRequest,
        activation: ActivationRecord,
        outcome: ReturnOutcome,
        credited: int,
        receipt: SignedEnvelope,
        now: dt.datetime,
    ) -> None:
        await repo.insert_return(
            ReturnRecord(
                host_id=request.host_id,
                request_id=request.request_id,
                certificate_id=activation.certificate_id,
                count=request.count,
                revision=request.revision,
                outcome=outcome,
                credited=credited,
                entitlement_id=activation.entitlement_id,
                receipt_envelope=receipt.SerializeToString(),
                decided_at=now,
            )
        )

    async def refusal_note(self, repo: VendorRecords) -> RefusalNote:
        return RefusalNote(
            "return.refused",
            await repo.activation_id_of(self.certificate_id) or self.certificate_id,
            self.request.host_id,
            {
                "request_id": self.request.request_id,
                "certificate_id": self.certificate_id,
                "count": self.request.count,
                "revision": self.request.revision,
            },
        )

    def refusal_reason(self, answer: SignedEnvelope) -> str:
        return VendorReturnReceipt.FromString(answer.payload).refusal_reason


def _refusal(
    activation: ActivationRecord,
    line: EntitlementLine,
    request: HostReturnRequest,
    now: dt.datetime,
) -> tuple[ReturnRefusal, str] | None:
    """The rule that refuses this return, if one does (the cycling limit aside)."""
    certificate_id = activation.certificate_id
    if activation.state is not ActivationState.ACTIVE:
        return (
            ReturnRefusal.CERTIFICATE_NOT_HELD,
            f"certificate {certificate_id} was already returned ({activation.state.value})",
        )
    if request.revision != activation.revision:
        return (
            ReturnRefusal.STALE_REVISION,
            f"certificate {certificate_id} is at revision {activation.revision}, "
            f"not {request.revision}; install the current certificate and return again",
        )
    certificate = LicenseCertificate.FromString(
        SignedEnvelope.FromString(activation.certificate_envelope).payload
    )
    if certificate.HasField("expires_at") and from_timestamp(certificate.expires_at) <= now:
        # Crediting it back would let the seats be activated again with a fresh term.
        return (
            ReturnRefusal.CERTIFICATE_EXPIRED,
            f"certificate {certificate_id} expired at "
            f"{from_timestamp(certificate.expires_at).isoformat(timespec='seconds')}; "
            "expired licenses are not credited back",
        )
    if not 1 <= request.count <= activation.count:
        return (
            ReturnRefusal.COUNT_ABOVE_HELD,
            f"certificate {certificate_id} holds {activation.count} seats; "
            f"{request.count} cannot be returned",
        )
    if request.count < activation.count and not line.partial_return_allowed:
        return (
            ReturnRefusal.PARTIAL_RETURN_NOT_ALLOWED,
            f"{line.activation_id} does not allow partial returns: return all "
            f"{activation.count} seats of certificate {certificate_id} together",
        )
    return None


def _replay(
    previous: ReturnRecord, request: HostReturnRequest, certificate_id: str
) -> SignedEnvelope:
    if (previous.certificate_id, previous.count, previous.revision) != (
        certificate_id,
        request.count,
        request.revision,
    ):
        raise RequestIdReused(
            f"request id {request.request_id!r} was already used for another return",
            metadata={"request_id": request.request_id},
        )
    return SignedEnvelope.FromString(previous.receipt_envelope)
