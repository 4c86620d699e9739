"""Local licenses: node-locked to one client host, verified by the client offline.

A client host (a WorkStation, an Enterprise Server on a site under construction) keeps a
local license store: a directory holding its own Ed25519 host key (mode 0600), the
vendor-signed certificates issued to it, and a clock high-water mark. The store signs an
activation request (kind LICENSE_KIND_LOCAL) that the operator takes through the
Administrator to the vendor; the vendor's answer is installed here. At start-up the client
asks the store for a valid license of a feature before it looks for a network lease.

A local license cannot be returned or repaired. Setting the clock back past the highest
time the store has seen (beyond a small tolerance) invalidates every local license, so a
time-limited demo license cannot be stretched by turning the clock back.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from nacl.signing import VerifyKey

from tessera.activation.v1.activation_pb2 import HostActivationRequest, VendorActivationResponse
from tessera.clock import Clock, SystemClock, from_timestamp, to_timestamp
from tessera.common.v1.common_pb2 import LicenseCertificate, LicenseKind, SignedEnvelope
from tessera.envelope import open_envelope, seal
from tessera.errors import DomainError, InvalidInput
from tessera.ids import ACTIVATION_PREFIX, parse_id
from tessera.keys import HostIdentity, load_or_create_signing_key, machine_binding, read_machine_id

CLOCK_TOLERANCE = dt.timedelta(minutes=5)


class LocalLicenseRejected(DomainError):
    """A vendor answer cannot be installed in this local license store."""

    reason = "LOCAL_LICENSE_REJECTED"


class ClockSetBack(DomainError):
    """The clock is earlier than a time this store has already seen."""

    reason = "CLOCK_SET_BACK"


@dataclass(frozen=True)
class LocalLicenseCheck:
    """What the store found for a feature: a valid certificate, or why there is none."""

    certificate: LicenseCertificate | None
    problems: tuple[str, ...]


class LocalLicenseStore:
    """A client host's local licenses in ``directory``."""

    def __init__(self, directory: Path, machine_id: str = "", clock: Clock | None = None) -> None:
        self.directory = directory
        self.clock = clock or SystemClock()
        key_file = load_or_create_signing_key(directory / "client.key")
        self.identity = HostIdentity(
            key_file.signing_key, machine_binding(machine_id or read_machine_id())
        )
        self._licenses = directory / "licenses"
        self._high_water = directory / "clock.json"

    @property
    def host_id(self) -> str:
        return self.identity.host_id

    def prepare_request(
        self, activation_id: str, count: int = 1, request_id: str = ""
    ) -> SignedEnvelope:
        """A request for a local license, signed by this client host's key."""
        activation_id = parse_id(ACTIVATION_PREFIX, activation_id, "activation_id")
        if not 1 <= count <= 1000:
            raise InvalidInput("count", f"must be between 1 and 1000, not {count}")
        document = HostActivationRequest(
            request_id=request_id or str(uuid.uuid4()),
            activation_id=activation_id,
            count=count,
            host_id=self.identity.host_id,
            host_public_key=self.identity.public_key,
            machine_binding=self.identity.machine_binding,
            created_at=to_timestamp(self.clock.now()),
            kind=LicenseKind.LICENSE_KIND_LOCAL,
        )
        return seal(document, self.identity.host_id, self.identity.signing_key)

    def install(
        self, response: SignedEnvelope, trusted: Mapping[str, VerifyKey]
    ) -> LicenseCertificate:
        """Verify the vendor's answer and keep its certificate; installing twice is a no-op."""
        answer = open_envelope(response, VendorActivationResponse, trusted)
        certificate = open_envelope(answer.certificate, LicenseCertificate, trusted)
        if answer.host_id != self.host_id or certificate.host_id != self.host_id:
            raise LocalLicenseRejected(
                f"this license is for host {certificate.host_id}, not this one ({self.host_id})"
            )
        if certificate.kind != LicenseKind.LICENSE_KIND_LOCAL:
            raise LocalLicenseRejected("this is a network license; it belongs on a License Server")
        self._licenses.mkdir(parents=True, exist_ok=True)
        path = self._licenses / f"{certificate.certificate_id}.lic"
        _write_atomically(path, answer.certificate.SerializeToString())
        return certificate

    def check(self, feature: str, trusted: Mapping[str, VerifyKey]) -> LocalLicenseCheck:
        """A valid local license of ``feature`` for this host, verified offline."""
        now = self.clock.now()
        problems: list[str] = []
        try:
            self._advance_high_water(now)
        except ClockSetBack as error:
            return LocalLicenseCheck(None, (error.message,))
        for path in sorted(self._licenses.glob("*.lic")) if self._licenses.exists() else []:
            try:
                envelope = SignedEnvelope.FromString(path.read_bytes())
                certificate = open_envelope(envelope, LicenseCertificate, trusted)
            except Exception as error:
                problems.append(f"{path.name}: {error}")
                continue
            if certificate.feature != feature:
                continue
            if (
                certificate.host_id != self.host_id
                or certificate.kind != LicenseKind.LICENSE_KIND_LOCAL
            ):
                problems.append(f"{path.name}: not a local license for this host")
                continue
            if certificate.HasField("expires_at") and from_timestamp(certificate.expires_at) <= now:
                problems.append(f"{path.name}: expired at {from_timestamp(certificate.expires_at)}")
                continue
            return LocalLicenseCheck(certificate, tuple(problems))
        if not problems:
            problems.append(f"no local license of {feature} on this host")
        return LocalLicenseCheck(None, tuple(problems))

    def _advance_high_water(self, now: dt.datetime) -> None:
        seen = now
        if self._high_water.exists():
            seen = dt.datetime.fromisoformat(json.loads(self._high_water.read_text())["seen"])
            if now + CLOCK_TOLERANCE < seen:
                raise ClockSetBack(
                    f"the clock reads {now.isoformat()}, but this host has already seen "
                    f"{seen.isoformat()}: local licenses are invalid while the clock is set back"
                )
        latest = max(now, seen)
        self.directory.mkdir(parents=True, exist_ok=True)
        _write_atomically(self._high_water, json.dumps({"seen": latest.isoformat()}).encode())


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
