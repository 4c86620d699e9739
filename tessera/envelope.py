"""Signed envelopes: ``{payload, payload type, key id, signature}``.

The signature covers the exact payload bytes, with the payload type as domain separation,
so a certificate can never be passed off as a request. Receivers verify the bytes they
received before parsing them; nobody re-serializes before verifying.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from google.protobuf.message import DecodeError, Message
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from tessera.common.v1.common_pb2 import SignedEnvelope
from tessera.errors import BadSignature, MalformedPayload, UnknownSigningKey, WrongPayloadType

M = TypeVar("M", bound=Message)

_CONTEXT = b"tessera-envelope-v1\0"


def _signed_bytes(payload_type: str, payload: bytes) -> bytes:
    return _CONTEXT + payload_type.encode() + b"\0" + payload


def seal(document: Message, key_id: str, signing_key: SigningKey) -> SignedEnvelope:
    """Serialize ``document`` once and sign those exact bytes."""
    payload = document.SerializeToString(deterministic=True)
    payload_type = document.DESCRIPTOR.full_name
    signature = signing_key.sign(_signed_bytes(payload_type, payload)).signature
    return SignedEnvelope(
        payload=payload, payload_type=payload_type, key_id=key_id, signature=signature
    )


def open_envelope(
    envelope: SignedEnvelope, document_type: type[M], trusted: Mapping[str, VerifyKey]
) -> M:
    """Verify ``envelope`` against the ``trusted`` keys and parse its document.

    Raises UnknownSigningKey, BadSignature, WrongPayloadType or MalformedPayload.
    """
    _check_type(envelope, document_type)
    verify_key = trusted.get(envelope.key_id)
    if verify_key is None:
        raise UnknownSigningKey(
            f"the document is signed with key {envelope.key_id!r}, which is not trusted here",
            metadata={"key_id": envelope.key_id},
        )
    return open_with_key(envelope, document_type, verify_key)


def open_with_key(envelope: SignedEnvelope, document_type: type[M], verify_key: VerifyKey) -> M:
    """Verify ``envelope`` with one known key (e.g. a host key) and parse its document."""
    expected = _check_type(envelope, document_type)
    try:
        verify_key.verify(
            _signed_bytes(envelope.payload_type, envelope.payload), envelope.signature
        )
    except (BadSignatureError, ValueError, TypeError) as error:
        raise BadSignature(
            f"the signature on the {expected} does not match its content: it was altered or forged",
            metadata={"key_id": envelope.key_id},
        ) from error
    document = document_type()
    try:
        document.ParseFromString(envelope.payload)
    except DecodeError as error:
        raise MalformedPayload(f"the signed {expected} does not parse: {error}") from error
    return document


def _check_type(envelope: SignedEnvelope, document_type: type[Message]) -> str:
    expected: str = document_type.DESCRIPTOR.full_name
    if envelope.payload_type != expected:
        raise WrongPayloadType(
            f"expected a signed {expected}, got {envelope.payload_type or 'nothing'}",
            metadata={"expected": expected},
        )
    return expected
