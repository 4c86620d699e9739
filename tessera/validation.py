"""Checks on free text that arrives in requests, shared by every service."""

from __future__ import annotations

import re

from tessera.errors import InvalidInput

# Control characters have no place in names; NUL is refused by PostgreSQL outright.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def checked_text(field: str, value: str, max_length: int, *, required: bool = False) -> str:
    """``value`` stripped, or InvalidInput when it is missing, too long or has control chars."""
    value = value.strip()
    if required and not value:
        raise InvalidInput(field, "is required")
    if len(value) > max_length:
        raise InvalidInput(field, f"at most {max_length} characters")
    if _CONTROL.search(value):
        raise InvalidInput(field, "must not contain control characters")
    return value
