"""Trusted storage: the host identity and the vendor-signed certificates this host holds.

Activation has two halves here. ``prepare_activation`` signs a request with the host key
and journals it as pending; ``install_activation`` accepts only a vendor-signed answer
addressed to this host and to a request it prepared, and adds its seats to the pool.
Both are idempotent by request id.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from nacl.signing import VerifyKey

from services.license_server.domain.errors import (
    CertificateForAnotherHost,
    CertificateMismatch,
    RequestIdReused,
    RequestNotPreparedHere,
)
from services.license_server.domain.events import LeaseBus, SeatsFreed
from services.license_server.domain.model import PendingRequest, StoredCertificate
from services.license_server.store.repository import DuplicateKey, LicenseStore
from tessera.activation.v1.activation_pb2 import HostActivationRequest, VendorActivationResponse
from tessera.clock import Clock, from_timestamp, to_timestamp
from tessera.common.v1.common_pb2 import LicenseCertificate, LicenseKind, SignedEnvelope
from tessera.envelope import open_envelope, seal
from tessera.errors import InvalidInput
from tessera.ids import ACTIVATION_PREFIX, parse_id
from tessera.keys import HostIdentity

REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
MAX_COUNT = 100_000


@dataclass(frozen=True)
class Installed:
    certificate: LicenseCertificate
    stored: StoredCertificate
    already_installed: bool


class TrustedStorage:
    """The certificates this License Server holds and how they got here."""

    def __init__(
        self,
        store: LicenseStore,
        identity: HostIdentity,
        vendor_keys: Callable[[], Mapping[str, VerifyKey]],
        clock: Clock,
        bus: LeaseBus | None = None,
    ) -> None:
        self.store = store
        self.identity = identity
        self.vendor_keys = vendor_keys
        self.clock = clock
        self.bus = bus or LeaseBus()

    async def prepare_activation(
        self, activation_id: str, count: int, request_id: str
    ) -> tuple[str, SignedEnvelope]:
        """A host-signed activation request, journaled as pending (same id, same bytes)."""
        activation_id = parse_id(ACTIVATION_PREFIX, activation_id, "activation_id")
        if not 1 <= count <= MAX_COUNT:
            raise InvalidInput("count", f"must be between 1 and {MAX_COUNT}, not {count}")
        if request_id and not REQUEST_ID.match(request_id):
            raise InvalidInput("request_id", "1-128 letters, digits or ._:-")
        request_id = request_id or str(uuid.uuid4())
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
        for _attempt in range(2):
            try:
                async with self.store.transaction() as repo:
                    existing = await repo.get_pending_request(request_id)
                    if existing is None:
                        await repo.insert_pending_request(pending, now)
                        return request_id, envelope
            except DuplicateKey:
                continue  # a concurrent call with the same request id won; read its answer
            if (existing.activation_id, existing.count) != (activation_id, count):
                raise RequestIdReused(
                    f"request id {request_id!r} was prepared for another activation"
                )
            return request_id, SignedEnvelope.FromString(existing.request_envelope)
        raise AssertionError("unreachable: a duplicate key is visible on retry")

    async def install_activation(self, response_envelope: SignedEnvelope) -> Installed:
        """Install a vendor-signed answer addressed to this host and to a request it made."""
        trusted = self.vendor_keys()
        response = open_envelope(response_envelope, VendorActivationResponse, trusted)
        host_id = self.identity.host_id
        if response.host_id != host_id:
            raise CertificateForAnotherHost(
                f"this answer is for host {response.host_id}, not this License Server ({host_id})",
                metadata={"host_id": response.host_id},
            )
        certificate = open_envelope(response.certificate, LicenseCertificate, trusted)
        if certificate.host_id != host_id:
            raise CertificateForAnotherHost(
                f"the certificate is bound to host {certificate.host_id}, not {host_id}"
            )
        if certificate.kind != LicenseKind.LICENSE_KIND_NETWORK:
            raise CertificateMismatch("only network licenses are installed on a License Server")
        now = self.clock.now()
        for _attempt in range(2):
            try:
                installed = await self._install(response.request_id, certificate, response, now)
                # New seats: waiters for the feature may be served now.
                self.bus.publish(SeatsFreed(certificate.feature))
                return installed
            except DuplicateKey:
                continue  # a concurrent install of the same answer won; it is installed
        raise AssertionError("unreachable: a duplicate key is visible on retry")

    async def _install(
        self,
        request_id: str,
        certificate: LicenseCertificate,
        response: VendorActivationResponse,
        now: dt.datetime,
    ) -> Installed:
        async with self.store.transaction() as repo:
            pending = await repo.get_pending_request(request_id)
            if pending is None:
                raise RequestNotPreparedHere(
                    f"request {request_id!r} was not prepared by this License Server",
                    metadata={"request_id": request_id},
                )
            if (
                certificate.request_id != pending.request_id
                or certificate.activation_id != pending.activation_id
                or certificate.count != pending.count
            ):
                raise CertificateMismatch("the certificate does not match the request it answers")
            existing = await repo.get_certificate_for_request(pending.request_id)
            if existing is not None:
                return Installed(certificate, existing, already_installed=True)
            stored = StoredCertificate(
                certificate_id=certificate.certificate_id,
                request_id=certificate.request_id,
                feature=certificate.feature,
                count=certificate.count,
                envelope=response.certificate.SerializeToString(),
                installed_at=now,
            )
            expires_at = (
                from_timestamp(certificate.expires_at)
                if certificate.HasField("expires_at")
                else None
            )
            await repo.insert_certificate(stored, expires_at)
            await repo.mark_request_installed(pending.request_id, now)
            await repo.announce(SeatsFreed(certificate.feature))
            return Installed(certificate, stored, already_installed=False)

    async def list_certificates(self) -> list[tuple[LicenseCertificate, StoredCertificate]]:
        async with self.store.transaction() as repo:
            stored = await repo.list_certificates()
        return [
            (LicenseCertificate.FromString(SignedEnvelope.FromString(s.envelope).payload), s)
            for s in stored
        ]
