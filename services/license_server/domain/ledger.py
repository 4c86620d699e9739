"""The trusted storage ledger: hash-chained entries, the host-signed seal, the anchor file.

Every change to a certificate in trusted storage appends an entry recording the
certificate's whole state afterwards; ``hash = SHA-256(previous hash || entry)``. The
seal row names the host key and machine the storage belongs to, the ledger head and the
clock high-water mark, and is signed by the host key, so the chain cannot be rewritten
without it. The anchor file, kept in the data directory beside the host key (outside the
database), remembers the newest head this server wrote: a database older than its anchor
was restored from a backup. A repair starts a new segment with a ``sealed`` entry.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from services.license_server.domain.model import LedgerEntry, Seal
from tessera.keys import HostIdentity

GENESIS_HASH = b"\0" * 32

SEALED = "sealed"
INSTALLED = "installed"
ADOPTED = "adopted"
RETURN_PREPARED = "return_prepared"
RETURNED = "returned"
RETURN_REFUSED = "return_refused"
REISSUED = "reissued"
REMOVED = "removed"
KEPT = "kept"
RETURN_SETTLED = "return_settled"

_SEAL_CONTEXT = b"tessera-trust-seal-v1\0"


@dataclass(frozen=True)
class CertificateState:
    """What the ledger says a certificate is after a change."""

    count: int
    revision: int
    returning: int
    returned: bool
    envelope_sha256: str

    def as_json(self) -> str:
        return canonical(
            {
                "count": self.count,
                "revision": self.revision,
                "returning": self.returning,
                "returned": self.returned,
                "envelope_sha256": self.envelope_sha256,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> CertificateState:
        value = json.loads(text)
        return cls(
            count=int(value["count"]),
            revision=int(value["revision"]),
            returning=int(value["returning"]),
            returned=bool(value["returned"]),
            envelope_sha256=str(value["envelope_sha256"]),
        )


def envelope_digest(envelope: bytes) -> str:
    return hashlib.sha256(envelope).hexdigest()


def computed_hash(entry: LedgerEntry) -> bytes:
    """The hash ``entry`` should carry, from its content and its predecessor's hash."""
    return entry_hash(
        entry.previous_hash,
        entry.sequence,
        entry.at,
        entry.action,
        entry.certificate_id,
        entry.state,
    )


def entry_hash(
    previous_hash: bytes,
    sequence: int,
    at: dt.datetime,
    action: str,
    certificate_id: str | None,
    state: str,
) -> bytes:
    content = canonical(
        [sequence, at.astimezone(dt.UTC).isoformat(), action, certificate_id or "", state]
    )
    return hashlib.sha256(previous_hash + content.encode()).digest()


def next_entry(
    previous_sequence: int,
    previous_hash: bytes,
    at: dt.datetime,
    action: str,
    certificate_id: str | None,
    state: str,
) -> LedgerEntry:
    sequence = previous_sequence + 1
    return LedgerEntry(
        sequence=sequence,
        at=at,
        action=action,
        certificate_id=certificate_id,
        state=state,
        previous_hash=previous_hash,
        hash=entry_hash(previous_hash, sequence, at, action, certificate_id, state),
    )


def is_authentic(seal: Seal) -> bool:
    """True when the host key named in the seal signed exactly this content."""
    try:
        VerifyKey(seal.host_public_key).verify(_seal_bytes(seal), seal.signature)
    except (BadSignatureError, ValueError, TypeError):
        return False
    return True


def sign_seal(
    identity: HostIdentity,
    head_sequence: int,
    head_hash: bytes,
    clock_high_water: dt.datetime,
    clock_set_back_at: dt.datetime | None,
) -> Seal:
    unsigned = Seal(
        host_id=identity.host_id,
        host_public_key=identity.public_key,
        machine_binding=identity.machine_binding,
        head_sequence=head_sequence,
        head_hash=head_hash,
        clock_high_water=clock_high_water,
        clock_set_back_at=clock_set_back_at,
        signature=b"",
    )
    signature = identity.signing_key.sign(_seal_bytes(unsigned)).signature
    return Seal(**{**unsigned.__dict__, "signature": signature})


def _seal_bytes(seal: Seal) -> bytes:
    return (
        _SEAL_CONTEXT
        + canonical(
            [
                seal.host_id,
                seal.host_public_key.hex(),
                seal.machine_binding.hex(),
                seal.head_sequence,
                seal.head_hash.hex(),
                seal.clock_high_water.astimezone(dt.UTC).isoformat(),
                seal.clock_set_back_at.astimezone(dt.UTC).isoformat()
                if seal.clock_set_back_at
                else "",
            ]
        ).encode()
    )


@dataclass(frozen=True)
class Anchor:
    """The newest ledger head this server wrote, remembered outside the database."""

    sequence: int
    hash: bytes


class AnchorFile:
    """The anchor in the data directory, written atomically (mode 0600)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> Anchor | None:
        try:
            value = json.loads(self.path.read_text())
            return Anchor(int(value["sequence"]), bytes.fromhex(value["hash"]))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            # An unreadable anchor proves nothing either way; it is rewritten on the next
            # change, and the seal still guards the chain.
            return None

    def advance(self, anchor: Anchor) -> None:
        """Remember ``anchor`` unless a newer head is remembered already (replicas)."""
        current = self.read()
        if current is not None and current.sequence >= anchor.sequence:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        scratch = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(canonical({"sequence": anchor.sequence, "hash": anchor.hash.hex()}))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(scratch, self.path)


def canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
