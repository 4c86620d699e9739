"""Checks on what the operator types, made before any network call or journal write."""

from __future__ import annotations

import re
import uuid

from tessera.address import parse_address
from tessera.errors import InvalidInput, InvalidLicenseServerAddress
from tessera.ids import ACTIVATION_PREFIX, parse_id

OPERATION_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
CERTIFICATE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,64}$")
MAX_COUNT = 100_000
MAX_OPERATION_ID = 128


def license_server(text: str, field: str = "license_server") -> str:
    """A License Server address as typed, after checking that it parses."""
    try:
        parse_address(text)
    except InvalidLicenseServerAddress as error:
        raise InvalidLicenseServerAddress(error.message, metadata={"field": field}) from error
    return text


def operation_id(text: str, max_length: int = MAX_OPERATION_ID) -> str:
    """The operator's idempotency key, or a fresh one when none was given."""
    if not text:
        return str(uuid.uuid4())
    if not OPERATION_ID.match(text) or len(text) > max_length:
        raise InvalidInput("operation_id", f"1-{max_length} letters, digits or ._:-")
    return text


def existing_operation_id(text: str) -> str:
    """The id of an operation to look up: required."""
    if not text:
        raise InvalidInput("operation_id", "is required")
    return operation_id(text)


def activation_id(text: str) -> str:
    return parse_id(ACTIVATION_PREFIX, text, "activation_id")


def certificate_id(text: str) -> str:
    if not text:
        raise InvalidInput("certificate_id", "is required")
    if not CERTIFICATE_ID.match(text):
        raise InvalidInput("certificate_id", "1-64 letters, digits or ._:-")
    return text


def seats(count: int) -> int:
    """Seats to activate: at least one."""
    if not 1 <= count <= MAX_COUNT:
        raise InvalidInput("count", f"must be between 1 and {MAX_COUNT}, not {count}")
    return count


def seats_to_return(count: int) -> int:
    """Seats to return: 0 means the whole certificate."""
    if not 0 <= count <= MAX_COUNT:
        raise InvalidInput(
            "count", f"must be between 0 (the whole certificate) and {MAX_COUNT}, not {count}"
        )
    return count
