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

The high-water mark cannot be deleted or swapped away. It is kept twice, signed with the
store's key: in ``clock.json`` (which also lists the licenses installed and the ones a
rollback voided) and in every license's record (``licenses/<id>.lic``: the vendor's
certificate, the store's high-water mark, and whether it is void). The floor the clock is
held to is the highest of these and of the certificates' own issue times (signed by the
vendor). ``clock.json`` missing while licenses are installed, or older than a license's
record (an older copy put back), is a rollback: the licenses installed then are void for
good. A mark or record whose signature fails is refused as altered and left as it is.
What no offline check can see is the whole directory put back as it was, or rewritten
with the store's key by someone who holds it: the issue times still bound how far back the
clock may go.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import sys
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from tessera.activation.v1.activation_pb2 import HostActivationRequest, VendorActivationResponse
from tessera.clock import Clock, SystemClock, from_timestamp, to_timestamp
from tessera.common.v1.common_pb2 import LicenseCertificate, LicenseKind, SignedEnvelope
from tessera.envelope import open_envelope, seal
from tessera.errors import DomainError, InvalidInput
from tessera.ids import ACTIVATION_PREFIX, parse_id
from tessera.keys import HostIdentity, load_or_create_signing_key, machine_binding, read_machine_id

CLOCK_TOLERANCE = dt.timedelta(minutes=5)
# How far the vendor's clock may run ahead of this host's before a license's issue time
# proves that this host's clock is set back.
ISSUE_TOLERANCE = dt.timedelta(hours=1)
# The high-water mark (and every record with it) is rewritten at most this often.
HIGH_WATER_STEP = dt.timedelta(minutes=1)

_CONTEXT = b"tessera-local-license-store-v1\0"
MARK_FORMAT = "tessera-local-clock-v1"
RECORD_FORMAT = "tessera-local-license-v1"


class LocalLicenseRejected(DomainError):
    """A vendor answer cannot be installed in this local license store."""

    reason = "LOCAL_LICENSE_REJECTED"


class ClockSetBack(DomainError):
    """The clock is earlier than a time this store has already seen."""

    reason = "CLOCK_SET_BACK"


class LocalStoreTampered(DomainError):
    """The store's high-water mark (``clock.json``) does not verify: it was edited, or it
    is another store's. The store leaves it as it is and serves no license."""

    reason = "LOCAL_STORE_TAMPERED"


@dataclass(frozen=True)
class LocalLicenseCheck:
    """What the store found for a feature: a valid certificate, or why there is none."""

    certificate: LicenseCertificate | None
    problems: tuple[str, ...]


@dataclass(frozen=True)
class _Record:
    """One installed license as the store keeps it."""

    certificate_id: str
    envelope: bytes
    seen: dt.datetime
    voided: str


@dataclass
class _State:
    """What the store holds, read and verified under its lock."""

    seen: dt.datetime | None
    licenses: set[str]
    voided: dict[str, str]
    records: dict[str, _Record]
    # Files in licenses/ that are not a record of this store, and why.
    unreadable: dict[str, str] = field(default_factory=dict)
    # Why the mark cannot be trusted (missing or older than the records): a rollback.
    rollback: str = ""
    # Whether clock.json must be written again.
    changed: bool = False


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
        self._lock = directory / ".lock"

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
        """Verify the vendor's answer and keep its certificate; installing twice is a no-op.
        Raises LocalStoreTampered when the store's mark was altered, LocalLicenseRejected
        for another host's license, a network license, or one a rollback voided here."""
        answer = open_envelope(response, VendorActivationResponse, trusted)
        certificate = open_envelope(answer.certificate, LicenseCertificate, trusted)
        if answer.host_id != self.host_id or certificate.host_id != self.host_id:
            raise LocalLicenseRejected(
                f"this license is for host {certificate.host_id}, not this one ({self.host_id})"
            )
        if certificate.kind != LicenseKind.LICENSE_KIND_LOCAL:
            raise LocalLicenseRejected("this is a network license; it belongs on a License Server")
        certificate_id = certificate.certificate_id
        with self._locked():
            state = self._open(self.clock.now())
            if certificate_id in state.voided:
                self._save(state)  # a rollback found just now is kept, too
                raise LocalLicenseRejected(
                    f"license {certificate_id} is void on this host "
                    f"({state.voided[certificate_id]}); ask for a new local license",
                    metadata={"certificate_id": certificate_id},
                )
            envelope = answer.certificate.SerializeToString()
            known = state.records.get(certificate_id)
            if known is None or known.envelope != envelope:
                assert state.seen is not None
                state.records[certificate_id] = _Record(certificate_id, envelope, state.seen, "")
                state.licenses.add(certificate_id)
                state.changed = True
            self._save(state)
        return certificate

    def check(self, feature: str, trusted: Mapping[str, VerifyKey]) -> LocalLicenseCheck:
        """A valid local license of ``feature`` for this host, verified offline."""
        try:
            with self._locked():
                # Read under the lock: a reading taken before waiting for another process
                # could be older than the mark that process writes meanwhile.
                now = self.clock.now()
                state = self._open(now)
                self._save(state)
        except LocalStoreTampered as error:
            return LocalLicenseCheck(None, (error.message,))
        problems = [f"{name}: {why}" for name, why in sorted(state.unreadable.items())]
        verified: list[tuple[str, LicenseCertificate, str]] = []
        for certificate_id, record in sorted(state.records.items()):
            name = f"{certificate_id}.lic"
            try:
                envelope = SignedEnvelope.FromString(record.envelope)
                certificate = open_envelope(envelope, LicenseCertificate, trusted)
            except Exception as error:
                problems.append(f"{name}: {error}")
                continue
            if (
                certificate.host_id != self.host_id
                or certificate.kind != LicenseKind.LICENSE_KIND_LOCAL
                or certificate.certificate_id != certificate_id
            ):
                problems.append(f"{name}: not a local license for this host")
                continue
            verified.append((name, certificate, state.voided.get(certificate_id, "")))
        clock_problem = self._clock_problem(now, state.seen, [c for _, c, _ in verified])
        if clock_problem:
            return LocalLicenseCheck(None, (clock_problem,))
        for name, certificate, voided in verified:
            if certificate.feature != feature:
                continue
            if voided:
                problems.append(f"{name}: void: {voided}; ask for a new local license")
                continue
            if certificate.HasField("expires_at") and from_timestamp(certificate.expires_at) <= now:
                problems.append(f"{name}: expired at {from_timestamp(certificate.expires_at)}")
                continue
            return LocalLicenseCheck(certificate, tuple(problems))
        if not problems:
            problems.append(f"no local license of {feature} on this host")
        return LocalLicenseCheck(None, tuple(problems))

    # The high-water mark

    def _clock_problem(
        self, now: dt.datetime, seen: dt.datetime | None, certificates: list[LicenseCertificate]
    ) -> str:
        if seen is not None and now + CLOCK_TOLERANCE < seen:
            return ClockSetBack(
                f"the clock reads {now.isoformat()}, but this host has already seen "
                f"{seen.isoformat()}: local licenses are invalid while the clock is set back"
            ).message
        for certificate in certificates:
            issued = from_timestamp(certificate.issued_at)
            if now + ISSUE_TOLERANCE < issued:
                return ClockSetBack(
                    f"the clock reads {now.isoformat()}, but local license "
                    f"{certificate.certificate_id} was issued at {issued.isoformat()}: local "
                    "licenses are invalid while the clock is set back"
                ).message
        return ""

    def _open(self, now: dt.datetime) -> _State:
        """Read and verify the mark and the records; note a rollback (and void what it
        touched) and move the mark on to ``now``. Raises LocalStoreTampered."""
        state = self._read_mark()
        present = sorted(self._licenses.glob("*.lic")) if self._licenses.exists() else []
        for path in present:
            try:
                record = self._read_record(path)
            except (OSError, ValueError, KeyError, TypeError, BadSignatureError) as error:
                state.unreadable[path.name] = (
                    f"not a license record of this store ({error or type(error).__name__}): "
                    "altered, or copied from another host"
                )
                continue
            state.records[record.certificate_id] = record
            if record.voided:
                state.voided.setdefault(record.certificate_id, record.voided)
        if state.seen is None:
            if present:
                state.rollback = (
                    f"{self._high_water.name}, the store's clock high-water mark, was missing "
                    "while local licenses were installed (deleted, or the store was rolled back)"
                )
        else:
            newer = [r for r in state.records.values() if r.seen > state.seen]
            uncovered = [i for i in state.records if i not in state.licenses]
            if newer or uncovered:
                state.rollback = (
                    f"{self._high_water.name}, the store's clock high-water mark, is older than "
                    "the licenses installed (an older copy was put back)"
                )
        if state.rollback:
            found = f"{state.rollback}; found at {now.isoformat(timespec='seconds')}"
            for certificate_id in state.records:
                state.voided.setdefault(certificate_id, found)
            state.changed = True
        seen = [r.seen for r in state.records.values()]
        if state.seen is not None:
            seen.append(state.seen)
        floor = max(seen, default=None)
        latest = now if floor is None else max(now, floor)
        if state.seen is None or latest >= state.seen + HIGH_WATER_STEP:
            state.changed = True
        state.seen = latest
        state.licenses |= set(state.records)
        if any(r.voided != state.voided.get(i, "") for i, r in state.records.items()):
            state.changed = True
        return state

    def _save(self, state: _State) -> None:
        """Write the mark, then every record with it: a crash in between leaves records
        older than the mark, never newer (which would read as a rollback)."""
        if not state.changed:
            return
        assert state.seen is not None
        self.directory.mkdir(parents=True, exist_ok=True)
        seen = state.seen.isoformat()
        _write_atomically(
            self._high_water,
            self._signed(
                {
                    "format": MARK_FORMAT,
                    "host_id": self.host_id,
                    "seen": seen,
                    "licenses": sorted(state.licenses),
                    "voided": dict(sorted(state.voided.items())),
                }
            ),
        )
        if state.records:
            self._licenses.mkdir(parents=True, exist_ok=True)
        for certificate_id, record in sorted(state.records.items()):
            _write_atomically(
                self._licenses / f"{certificate_id}.lic",
                self._signed(
                    {
                        "format": RECORD_FORMAT,
                        "host_id": self.host_id,
                        "certificate_id": certificate_id,
                        "certificate": base64.b64encode(record.envelope).decode(),
                        "seen": seen,
                        "voided": state.voided.get(certificate_id, ""),
                    }
                ),
            )
        state.changed = False

    def _read_mark(self) -> _State:
        try:
            data = self._high_water.read_bytes()
        except FileNotFoundError:
            return _State(seen=None, licenses=set(), voided={}, records={})
        try:
            document = self._verified(data, MARK_FORMAT)
            voided = document["voided"]
            if not isinstance(voided, dict):
                raise TypeError("voided is not a map")
            return _State(
                seen=_time(document["seen"]),
                licenses={str(c) for c in document["licenses"]},
                voided={str(c): str(why) for c, why in voided.items()},
                records={},
            )
        except (ValueError, KeyError, TypeError, BadSignatureError) as error:
            raise LocalStoreTampered(
                f"{self._high_water} does not verify ({error or type(error).__name__}): the "
                "store's clock high-water mark was altered or is another store's. It is left "
                "as it is and no local license serves until the original is put back; if it "
                "cannot be, ask for new local licenses",
                metadata={"path": str(self._high_water)},
            ) from error

    def _read_record(self, path: Path) -> _Record:
        document = self._verified(path.read_bytes(), RECORD_FORMAT)
        certificate_id = str(document["certificate_id"])
        if path.name != f"{certificate_id}.lic":
            raise ValueError(f"it holds license {certificate_id}")
        return _Record(
            certificate_id=certificate_id,
            envelope=base64.b64decode(str(document["certificate"]), validate=True),
            seen=_time(document["seen"]),
            voided=str(document["voided"]),
        )

    def _signed(self, body: dict[str, Any]) -> bytes:
        signature = self.identity.signing_key.sign(_CONTEXT + _canonical(body)).signature
        document = {**body, "signature": signature.hex()}
        return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()

    def _verified(self, data: bytes, expected: str) -> dict[str, Any]:
        """The document in ``data`` signed by this store's key, minus its signature."""
        document = json.loads(data)
        if not isinstance(document, dict):
            raise ValueError("not a JSON object")
        signature = bytes.fromhex(str(document.pop("signature")))
        if document.get("format") != expected:
            raise ValueError(f"not a {expected} document")
        if document.get("host_id") != self.host_id:
            raise ValueError(f"it belongs to host {document.get('host_id')}")
        self.identity.signing_key.verify_key.verify(_CONTEXT + _canonical(document), signature)
        return document

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One process at a time reads and writes the store (a WorkStation and a tool may
        start together): interleaved writes could leave a record newer than the mark."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self._lock, "a+b") as handle:
            _lock_file(handle.fileno())
            try:
                yield
            finally:
                _unlock_file(handle.fileno())


def _canonical(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _time(value: object) -> dt.datetime:
    moment = dt.datetime.fromisoformat(str(value))
    if moment.tzinfo is None:
        raise ValueError(f"time {value!r} has no time zone")
    return moment


if sys.platform == "win32":
    import msvcrt

    def _lock_file(fd: int) -> None:
        msvcrt.locking(fd, msvcrt.LK_LOCK, 1)

    def _unlock_file(fd: int) -> None:
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

    def _sync_directory(path: Path) -> None:
        pass  # NTFS orders the metadata of a rename; a directory cannot be opened here

else:
    import fcntl

    def _lock_file(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX)

    def _unlock_file(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)

    def _sync_directory(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` whole, durably: the rename is synced before the
    next file is written, so files reach the disk in the order they were written."""
    temporary = path.with_suffix(path.suffix + ".tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _sync_directory(path.parent)
