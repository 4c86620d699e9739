"""The vendor signing key: what makes a certificate worth something."""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import Message
from nacl.signing import SigningKey

from tessera.common.v1.common_pb2 import SignedEnvelope
from tessera.envelope import seal
from tessera.keys import vendor_key_id


@dataclass(frozen=True)
class VendorKey:
    """The Ed25519 key the Activation Server signs certificates and answers with."""

    signing_key: SigningKey

    @property
    def key_id(self) -> str:
        return vendor_key_id(self.signing_key.verify_key)

    @property
    def public_key_hex(self) -> str:
        return bytes(self.signing_key.verify_key).hex()

    def seal(self, document: Message) -> SignedEnvelope:
        return seal(document, self.key_id, self.signing_key)
