"""Readable, checksummed identifiers: Entitlement IDs and activation IDs.

An ID reads like ``ENT-7K3M-QX2P-9D4B``: a prefix, eleven random Crockford base32
characters and one check character. Operators type these from paper certificates, so a
typo is caught here, before any network call: the check is Damm's algorithm over the
quasigroup ``x * y = a*x + y`` in GF(32), which is totally anti-symmetric, so every single
wrong character and every swap of two neighbours is detected (Luhn mod 32 misses 0<->Z).
Crockford's alphabet has no I, L, O or U; the parser reads
I and L as 1 and O as 0, ignores case, spaces and dashes.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Final

from tessera.errors import InvalidInput

ALPHABET: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_VALUE = {char: index for index, char in enumerate(ALPHABET)}
_CONFUSABLE = str.maketrans({"I": "1", "L": "1", "O": "0"})
_BODY_LENGTH: Final = 11

ENTITLEMENT_PREFIX: Final = "ENT"
ACTIVATION_PREFIX: Final = "ACT"


def crockford(data: bytes, length: int) -> str:
    """The first ``length`` Crockford base32 characters of ``data`` (big-endian bits)."""
    number = int.from_bytes(data, "big")
    bits = len(data) * 8
    chars = []
    for position in range(length):
        shift = bits - 5 * (position + 1)
        if shift < 0:
            raise ValueError("not enough bytes for the requested length")
        chars.append(ALPHABET[(number >> shift) & 31])
    return "".join(chars)


def fingerprint(data: bytes, groups: int = 4) -> str:
    """A short human-readable fingerprint of ``data``: groups of four base32 characters."""
    text = crockford(hashlib.sha256(data).digest(), 4 * groups)
    return "-".join(text[i : i + 4] for i in range(0, len(text), 4))


# x^5 + x^2 + 1, primitive over GF(2); multiplying by its root ``a`` is a shift and a xor.
_POLYNOMIAL = 0b100101


def _times_a(value: int) -> int:
    value <<= 1
    return value ^ _POLYNOMIAL if value & 0b100000 else value


def _damm(chars: str) -> int:
    interim = 0
    for char in chars:
        interim = _times_a(interim) ^ _VALUE[char]
    return interim


def check_character(body: str) -> str:
    """The check character that makes Damm's interim of ``body`` + it come out 0."""
    return ALPHABET[_times_a(_damm(body))]


def new_id(prefix: str) -> str:
    """A fresh random ID with ``prefix``, e.g. ``new_id("ENT")``."""
    body = "".join(secrets.choice(ALPHABET) for _ in range(_BODY_LENGTH))
    return _format(prefix, body + check_character(body))


def parse_id(prefix: str, text: str, field: str) -> str:
    """The canonical form of an ID typed by a person, or InvalidInput saying what is wrong."""
    if not text or not text.strip():
        raise InvalidInput(field, "is required")
    cleaned = text.upper().replace("-", "").replace(" ", "").translate(_CONFUSABLE)
    if not cleaned.startswith(prefix):
        raise InvalidInput(field, f"{text!r} is not an ID of the form {prefix}-XXXX-XXXX-XXXX")
    chars = cleaned[len(prefix) :]
    if len(chars) != _BODY_LENGTH + 1 or any(char not in _VALUE for char in chars):
        raise InvalidInput(field, f"{text!r} is not an ID of the form {prefix}-XXXX-XXXX-XXXX")
    if _damm(chars) != 0:
        raise InvalidInput(field, f"{text!r} has a typo: its check character does not match")
    return _format(prefix, chars)


def _format(prefix: str, chars: str) -> str:
    return f"{prefix}-{chars[0:4]}-{chars[4:8]}-{chars[8:12]}"
