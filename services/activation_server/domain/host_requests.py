"""Requests signed by a host's key: activation, return, repair and check-in.

The host's public key travels inside the payload, so the payload is parsed once to find
it and the signature is then checked over the exact bytes received. The host id the
request claims must be the fingerprint of that key bound to the machine it names.
"""

from __future__ import annotations

import re
from typing import TypeVar

from nacl.signing import VerifyKey

from services.activation_server.domain.errors import HostKeyMismatch
from tessera.activation.v1.activation_pb2 import (
    HostActivationRequest,
    HostCheckInRequest,
    HostRepairRequest,
    HostReturnRequest,
)
from tessera.common.v1.common_pb2 import SignedEnvelope
from tessera.envelope import open_with_key
from tessera.errors import InvalidInput, MalformedPayload, WrongPayloadType
from tessera.keys import host_id as compute_host_id

HostRequest = TypeVar(
    "HostRequest", HostActivationRequest, HostReturnRequest, HostRepairRequest, HostCheckInRequest
)

REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def verify_host_signed(envelope: SignedEnvelope, document_type: type[HostRequest]) -> HostRequest:
    """The request, once it is shown to be signed by the host key it names, bound to the
    host id it claims; BadSignature, HostKeyMismatch or WrongPayloadType otherwise."""
    expected_type = document_type.DESCRIPTOR.full_name
    if envelope.payload_type != expected_type:
        raise WrongPayloadType(
            f"expected a signed {expected_type}, got {envelope.payload_type or 'nothing'}"
        )
    claimed = document_type()
    try:
        claimed.ParseFromString(envelope.payload)
        verify_key = VerifyKey(claimed.host_public_key)
    except Exception as error:
        raise MalformedPayload(f"the signed request does not parse: {error}") from error
    request = open_with_key(envelope, document_type, verify_key)
    expected = compute_host_id(request.host_public_key, request.machine_binding)
    if request.host_id != expected or envelope.key_id != expected:
        raise HostKeyMismatch(
            f"host id {request.host_id!r} does not belong to the key that signed the request",
            metadata={"host_id": request.host_id},
        )
    return request


def checked_request_id(request_id: str) -> str:
    """A host's request id: the idempotency key of what it asks."""
    if not REQUEST_ID.match(request_id):
        raise InvalidInput("request_id", "1-128 letters, digits or ._:-")
    return request_id
