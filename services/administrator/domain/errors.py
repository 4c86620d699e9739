"""What the Administrator refuses, and why. Status codes are in ``../errors.py``."""

from __future__ import annotations

from tessera.errors import DomainError


class OperationIdReused(DomainError):
    """An operation id came back with different parameters: not a retry, a conflict."""

    reason = "OPERATION_ID_REUSED"


class OperationHostChanged(DomainError):
    """The address of a journaled operation now answers with another License Server."""

    reason = "OPERATION_HOST_CHANGED"
