"""Activation decisions: a host's signed request in, a vendor-signed certificate out.

The decision is one transaction: the seats are taken with a conditional update (never
more than were sold, whatever runs concurrently), the certificate is signed and the exact
answer bytes are recorded under the request id, so a retry gets the same answer.
"""

from __future__ import annotations

import re
import uuid

from nacl.signing import VerifyKey

from services.activation_server.domain.errors import (
    ActivationIdNotFound,
    HostKeyMismatch,
    LineExpired,
    LocalLineNotActivatable,
    NetworkLineNotLocal,
    NotEnoughSeatsLeft,
    RequestIdReused,
)
from services.activation_server.domain.model import ActivationRecord, LicenseKind
from services.activation_server.domain.vendor_key import VendorKey
from services.activation_server.store.repository import (
    ActivationStore,
    DuplicateRequest,
    Repository,
)
from tessera.activation.v1.activation_pb2 import HostActivationRequest, VendorActivationResponse
from tessera.clock import Clock, to_timestamp
from tessera.common.v1.common_pb2 import LicenseCertificate, SignedEnvelope
from tessera.common.v1.common_pb2 import LicenseKind as LicenseKindProto
from tessera.envelope import open_with_key
from tessera.errors import InvalidInput, MalformedPayload, WrongPayloadType
from tessera.ids import ACTIVATION_PREFIX, ENTITLEMENT_PREFIX, parse_id
from tessera.keys import host_id as compute_host_id
from tessera.validation import checked_text

REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
MAX_COUNT = 100_000


def verify_host_request(envelope: SignedEnvelope) -> HostActivationRequest:
    """Check a request is signed by the host key it names, bound to the host id it claims.

    The key travels inside the payload, so the payload is parsed once to find it and the
    signature is then checked over the exact bytes received.
    """
    if envelope.payload_type != HostActivationRequest.DESCRIPTOR.full_name:
        raise WrongPayloadType(
            f"expected a signed {HostActivationRequest.DESCRIPTOR.full_name}, "
            f"got {envelope.payload_type or 'nothing'}"
        )
    claimed = HostActivationRequest()
    try:
        claimed.ParseFromString(envelope.payload)
        verify_key = VerifyKey(claimed.host_public_key)
    except Exception as error:
        raise MalformedPayload(f"the activation request does not parse: {error}") from error
    request = open_with_key(envelope, HostActivationRequest, verify_key)
    expected = compute_host_id(request.host_public_key, request.machine_binding)
    if request.host_id != expected or envelope.key_id != expected:
        raise HostKeyMismatch(
            f"host id {request.host_id!r} does not belong to the key that signed the request",
            metadata={"host_id": request.host_id},
        )
    return request


class Activations:
    """Decides activation requests from License Servers."""

    def __init__(self, store: ActivationStore, vendor_key: VendorKey, clock: Clock) -> None:
        self.store = store
        self.vendor_key = vendor_key
        self.clock = clock

    async def activate(self, envelope: SignedEnvelope) -> SignedEnvelope:
        """Decide a signed HostActivationRequest; the same request id gets the same answer."""
        request = verify_host_request(envelope)
        if not REQUEST_ID.match(request.request_id):
            raise InvalidInput("request_id", "1-128 letters, digits or ._:-")
        activation_id = parse_id(ACTIVATION_PREFIX, request.activation_id, "activation_id")
        if not 1 <= request.count <= MAX_COUNT:
            raise InvalidInput("count", f"must be between 1 and {MAX_COUNT}, not {request.count}")
        try:
            async with self.store.transaction() as repo:
                return await self._decide(repo, request, activation_id)
        except DuplicateRequest:
            # A concurrent retry of the same request won the race; answer as it did.
            async with self.store.transaction() as repo:
                return await self._decide(repo, request, activation_id)

    async def _decide(
        self, repo: Repository, request: HostActivationRequest, activation_id: str
    ) -> SignedEnvelope:
        previous = await repo.get_activation(request.host_id, request.request_id)
        if previous is not None:
            return _replay(previous, request, activation_id)
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
        certificate = LicenseCertificate(
            certificate_id=str(uuid.uuid4()),
            entitlement_id=line.entitlement_id,
            activation_id=activation_id,
            feature=line.feature,
            count=request.count,
            kind=LicenseKindProto.LICENSE_KIND_LOCAL
            if wants_local
            else LicenseKindProto.LICENSE_KIND_NETWORK,
            host_id=request.host_id,
            request_id=request.request_id,
            issued_at=to_timestamp(now),
            expires_at=to_timestamp(line.expires_at),
            customer_organization=customer_organization,
        )
        response = self.vendor_key.seal(
            VendorActivationResponse(
                request_id=request.request_id,
                host_id=request.host_id,
                certificate=self.vendor_key.seal(certificate),
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
            )
        )
        await repo.append_audit(
            now,
            "activation.granted",
            activation_id,
            {
                "request_id": request.request_id,
                "host_id": request.host_id,
                "count": request.count,
                "certificate_id": certificate.certificate_id,
                "kind": line.kind.value,
            },
        )
        return response

    async def list(self, entitlement_id: str, host_id: str) -> list[ActivationRecord]:
        """Activations, optionally of one entitlement and/or one host."""
        if entitlement_id:
            entitlement_id = parse_id(ENTITLEMENT_PREFIX, entitlement_id, "entitlement_id")
        host_id = checked_text("host_id", host_id, 64)
        async with self.store.transaction() as repo:
            return await repo.list_activations(entitlement_id or None, host_id or None)


def _replay(
    previous: ActivationRecord, request: HostActivationRequest, activation_id: str
) -> SignedEnvelope:
    if (previous.activation_id, previous.count, previous.host_id) != (
        activation_id,
        request.count,
        request.host_id,
    ):
        raise RequestIdReused(
            f"request id {request.request_id!r} was already used for another activation",
            metadata={"request_id": request.request_id},
        )
    return SignedEnvelope.FromString(previous.response_envelope)
