"""Activation decisions: a host's signed request in, a vendor-signed certificate out.

The decision is one transaction: the seats are taken with a conditional update (never
more than were sold, whatever runs concurrently), the certificate is signed and the exact
answer bytes are recorded under the request id, so a retry gets the same answer. A
refusal of a correctly signed request is audited in a transaction of its own, since the
deciding one rolls back.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict

from services.activation_server.domain.certificates import first_issue
from services.activation_server.domain.decisions import RefusalNote, decide_once
from services.activation_server.domain.errors import (
    ActivationIdNotFound,
    ActivationLimitReached,
    LineExpired,
    LocalLineNotActivatable,
    NetworkLineNotLocal,
    NotEnoughSeatsLeft,
    RequestIdReused,
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
    LicenseKind,
    Registration,
)
from services.activation_server.domain.ports import VendorRecords, VendorStore
from services.activation_server.domain.vendor_key import Signer
from tessera.activation.v1.activation_pb2 import HostActivationRequest, VendorActivationResponse
from tessera.clock import Clock
from tessera.common.v1.common_pb2 import LicenseKind as LicenseKindProto
from tessera.common.v1.common_pb2 import SignedEnvelope
from tessera.errors import InvalidInput
from tessera.ids import ACTIVATION_PREFIX, ENTITLEMENT_PREFIX, parse_id
from tessera.validation import checked_text

MAX_COUNT = 100_000
MAX_REGISTRATION_TEXT = 256


def verify_host_request(envelope: SignedEnvelope) -> HostActivationRequest:
    """A HostActivationRequest shown to be signed by the host key it names."""
    return verify_host_signed(envelope, HostActivationRequest)


def checked_registration(registration: Registration | None) -> Registration | None:
    """The operator's details, each field stripped and checked; None when all are empty."""
    if registration is None:
        return None
    checked = Registration(
        organization=checked_text(
            "registration.organization", registration.organization, MAX_REGISTRATION_TEXT
        ),
        contact_name=checked_text(
            "registration.contact_name", registration.contact_name, MAX_REGISTRATION_TEXT
        ),
        email=checked_text("registration.email", registration.email, MAX_REGISTRATION_TEXT),
        phone=checked_text("registration.phone", registration.phone, MAX_REGISTRATION_TEXT),
        site=checked_text("registration.site", registration.site, MAX_REGISTRATION_TEXT),
    )
    return None if checked == Registration() else checked


class Activations:
    """Decides activation requests from License Servers and client hosts."""

    def __init__(
        self,
        store: VendorStore,
        signer: Signer,
        clock: Clock,
        metrics: VendorMetrics | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.store = store
        self.signer = signer
        self.clock = clock
        self.metrics = metrics or VendorMetrics()
        self.limits = limits or Limits()

    async def activate(
        self, envelope: SignedEnvelope, registration: Registration | None = None
    ) -> SignedEnvelope:
        """Decide a signed HostActivationRequest; the same request id gets the same answer."""
        return await decide_once(
            self.store,
            self.clock,
            lambda: _Activation(
                verify_host_request(envelope), registration, self.signer, self.clock, self.limits
            ),
            self.metrics.activation,
            "activation_server.activate.after_commit",
        )

    async def list(self, entitlement_id: str, host_id: str) -> list[ActivationRecord]:
        """Activations, optionally of one entitlement and/or held by one host."""
        if entitlement_id:
            entitlement_id = parse_id(ENTITLEMENT_PREFIX, entitlement_id, "entitlement_id")
        host_id = checked_text("host_id", host_id, 64)
        async with self.store.transaction() as repo:
            return await repo.list_activations(entitlement_id or None, host_id or None)


class _Activation:
    """One verified activation request, as ``decide_once`` decides it (a ``Decision``):
    the request's fields are checked as it is made."""

    def __init__(
        self,
        request: HostActivationRequest,
        registration: Registration | None,
        signer: Signer,
        clock: Clock,
        limits: Limits,
    ) -> None:
        checked_request_id(request.request_id)
        self.activation_id = parse_id(ACTIVATION_PREFIX, request.activation_id, "activation_id")
        if not 1 <= request.count <= MAX_COUNT:
            raise InvalidInput("count", f"must be between 1 and {MAX_COUNT}, not {request.count}")
        self.registration = checked_registration(registration)
        self.request = request
        self.signer = signer
        self.clock = clock
        self.limits = limits

    async def recorded(self, repo: VendorRecords) -> ActivationRecord | None:
        return await repo.get_activation(self.request.host_id, self.request.request_id)

    def replay(self, recorded: ActivationRecord) -> SignedEnvelope:
        return _replay(recorded, self.request, self.activation_id)

    async def decide(self, repo: VendorRecords) -> SignedEnvelope:
        request, activation_id, registration = self.request, self.activation_id, self.registration
        found = await repo.get_line(activation_id)
        if found is None:
            raise ActivationIdNotFound(
                f"no entitlement line with activation id {activation_id}",
                metadata={"activation_id": activation_id},
            )
        line, customer_organization = found
        now = self.clock.now()
        wants_local = request.kind == LicenseKindProto.LICENSE_KIND_LOCAL
        if line.kind is LicenseKind.LOCAL and not wants_local:
            raise LocalLineNotActivatable(
                f"{activation_id} is a local license line; it is issued to a client host, "
                "not activated onto a License Server"
            )
        if line.kind is LicenseKind.NETWORK and wants_local:
            raise NetworkLineNotLocal(
                f"{activation_id} is a network license line; it is activated onto a License "
                "Server, not issued to a client host"
            )
        if line.expires_at is not None and line.expires_at <= now:
            raise LineExpired(f"{activation_id} expired at {line.expires_at.isoformat()}")
        if line.kind is LicenseKind.NETWORK:
            await self._check_cycling(repo, line.entitlement_id, now)
        if not await repo.take_seats(activation_id, request.count):
            # A concurrent retry of this very request may have taken the seats while we
            # waited for the line; read committed sees its row now, so answer as it did.
            previous = await repo.get_activation(request.host_id, request.request_id)
            if previous is not None:
                return _replay(previous, request, activation_id)
            raise NotEnoughSeatsLeft(
                f"{activation_id} ({line.feature}) has {line.available} of {line.count} seats "
                f"left; {request.count} asked for",
                metadata={"activation_id": activation_id, "available": str(line.available)},
            )
        certificate = first_issue(
            line, customer_organization, request.host_id, request.request_id, request.count, now
        )
        sealed_certificate = self.signer.seal(certificate)
        response = self.signer.seal(
            VendorActivationResponse(
                request_id=request.request_id,
                host_id=request.host_id,
                certificate=sealed_certificate,
            )
        )
        await repo.insert_activation(
            ActivationRecord(
                request_id=request.request_id,
                activation_id=activation_id,
                entitlement_id=line.entitlement_id,
                feature=line.feature,
                host_id=request.host_id,
                host_public_key=request.host_public_key,
                count=request.count,
                certificate_id=certificate.certificate_id,
                response_envelope=response.SerializeToString(),
                activated_at=now,
                kind=line.kind,
                holder_host_id=request.host_id,
                activated_count=request.count,
                revision=0,
                state=ActivationState.ACTIVE,
                certificate_envelope=sealed_certificate.SerializeToString(),
                returned_at=None,
                registration=registration,
            )
        )
        await repo.audit.append(
            now,
            "activation.granted",
            activation_id,
            request.host_id,
            {
                "request_id": request.request_id,
                "host_id": request.host_id,
                "count": request.count,
                "certificate_id": certificate.certificate_id,
                "kind": line.kind.value,
                "expires_at": certificate.expires_at.ToJsonString()
                if certificate.HasField("expires_at")
                else None,
                "registration": None if registration is None else asdict(registration),
            },
        )
        return response

    async def _check_cycling(
        self, repo: VendorRecords, entitlement_id: str, now: dt.datetime
    ) -> None:
        """ActivationLimitReached when the order's network activations in the window are
        used up (activate -> return -> activate loops end here)."""
        # Activations and returns of one order are decided one at a time, so none slips
        # past the limit; the order is locked before the line, as a return does.
        await repo.lock_entitlement(entitlement_id)
        window = self.limits.activation_window
        limit = self.limits.max_activations_per_entitlement
        recent = await repo.network_activations_since(entitlement_id, now - window)
        allowed_at = next_allowed(recent, limit, window)
        if allowed_at is None:
            return
        when = (
            f"the next activation is allowed from {iso_time(allowed_at)}"
            if limit
            else "this Activation Server accepts no activations of network licenses"
        )
        error = ActivationLimitReached(
            f"{entitlement_id} had {len(recent)} activations in the last {window.days} days "
            f"(at most {limit}); {when}",
            metadata={"entitlement_id": entitlement_id, "next_allowed_at": iso_time(allowed_at)},
        )
        if limit:
            error.retry_after = (allowed_at - now).total_seconds()
        raise error

    async def refusal_note(self, repo: VendorRecords) -> RefusalNote:
        return RefusalNote(
            "activation.refused",
            self.activation_id,
            self.request.host_id,
            {"request_id": self.request.request_id, "count": self.request.count},
        )

    def refusal_reason(self, answer: SignedEnvelope) -> str:
        return ""


def _replay(
    previous: ActivationRecord, request: HostActivationRequest, activation_id: str
) -> SignedEnvelope:
    if (previous.activation_id, previous.activated_count, previous.host_id) != (
        activation_id,
        request.count,
        request.host_id,
    ):
        raise RequestIdReused(
            f"request id {request.request_id!r} was already used for another activation",
            metadata={"request_id": request.request_id},
        )
    return SignedEnvelope.FromString(previous.response_envelope)
