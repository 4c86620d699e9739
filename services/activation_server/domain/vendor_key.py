"""The vendor signing keys: what makes a certificate worth something.

One key signs at a time; every key ever used keeps verifying, so License Servers trust
the whole set (``GetVendorKeys``, ``vendor-keys.pub``) and a rotation needs no downtime.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from google.protobuf.message import Message
from nacl.signing import SigningKey

from services.activation_server.domain.audit import VENDOR_ACTOR
from services.activation_server.domain.model import Keyring, VendorPublicKey
from services.activation_server.domain.ports import Audited, KeyFiles, Transactions
from tessera.clock import Clock
from tessera.common.v1.common_pb2 import SignedEnvelope
from tessera.envelope import seal
from tessera.keys import vendor_key_id

log = logging.getLogger("tessera.activation_server")


class Signer(Protocol):
    """Signs the vendor's answers and certificates."""

    def seal(self, document: Message) -> SignedEnvelope: ...


@dataclass(frozen=True)
class VendorKey:
    """One Ed25519 key the Activation Server signs certificates and answers with."""

    signing_key: SigningKey

    @property
    def key_id(self) -> str:
        return vendor_key_id(self.signing_key.verify_key)

    @property
    def public_key_hex(self) -> str:
        return bytes(self.signing_key.verify_key).hex()

    def seal(self, document: Message) -> SignedEnvelope:
        return seal(document, self.key_id, self.signing_key)


class VendorKeys:
    """Every vendor key: the active one signs, all of them verify.

    The keys live in files (see ``store/key_files.py``) that several replicas may share;
    each replica re-reads them when the record of the active key changes.
    """

    def __init__(self, files: KeyFiles, store: Transactions[Audited], clock: Clock) -> None:
        self.files = files
        self.store = store
        self.clock = clock
        self._keyring, created = files.load(clock.now())
        self._version = files.version()
        if created:
            log.warning(
                "created a new vendor signing key %s at %s", self.active.key_id, files.first_key
            )

    @property
    def active(self) -> VendorKey:
        """The key that signs now."""
        keyring = self._current()
        [key] = [key for key in keyring.keys if key.key_id == keyring.active_key_id]
        return VendorKey(key.signing_key)

    def seal(self, document: Message) -> SignedEnvelope:
        return self.active.seal(document)

    def public_keys(self) -> list[VendorPublicKey]:
        """Every key to trust, oldest first."""
        keyring = self._current()
        return [
            VendorPublicKey(
                key_id=key.key_id,
                public_key=bytes(key.signing_key.verify_key),
                active=key.key_id == keyring.active_key_id,
                created_at=key.created_at,
            )
            for key in keyring.keys
        ]

    async def rotate(self) -> VendorPublicKey:
        """Make a new key the one that signs; the old ones keep verifying. Audited."""
        now = self.clock.now()
        new_key = SigningKey.generate()
        previous = self.active.key_id
        key_id = vendor_key_id(new_key.verify_key)
        async with self.store.transaction() as repo:
            # The files change inside the transaction: a failed write records nothing.
            self._keyring = self.files.add_active(new_key, now)
            self._version = self.files.version()
            await repo.audit.append(
                now,
                "key.rotated",
                key_id,
                VENDOR_ACTOR,
                {"key_id": key_id, "previous_key_id": previous},
            )
        log.warning("vendor signing key rotated: %s signs from now on (was %s)", key_id, previous)
        [published] = [key for key in self.public_keys() if key.key_id == key_id]
        return published

    def _current(self) -> Keyring:
        version = self.files.version()
        if version != self._version:
            self._keyring, _ = self.files.load(self.clock.now())
            self._version = version
        return self._keyring
