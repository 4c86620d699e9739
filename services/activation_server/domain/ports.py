"""What the Activation Server's rules need from the outside, as Protocols.

The rules own the transaction (``async with store.transaction() as records``) and ask
the records for what they decide on; ``store/`` implements these Protocols with SQL and
``server.py`` hands the store to the rules, so nothing under ``domain/`` imports it and
a test can decide over an in-memory fake. The queries return the plain records of
``model.py``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Protocol, TypeVar

from nacl.signing import SigningKey

from services.activation_server.domain.model import (
    ActivationRecord,
    AuditEntry,
    AuditHead,
    CheckInRecord,
    CheckInStanding,
    Entitlement,
    EntitlementLine,
    HostGeneration,
    Keyring,
    NewLine,
    RepairRecord,
    ReturnRecord,
)


class DuplicateRequest(Exception):
    """Another transaction recorded this request id first (raised by the ``insert_*``
    queries of a decision's record; the transaction is then rolled back)."""


class AuditTrail(Protocol):
    """The hash-chained audit log within one transaction."""

    async def head(self) -> AuditHead:
        """The newest entry's sequence and hash (sequence 0 and GENESIS when empty)."""
        ...

    async def append(
        self, at: dt.datetime, action: str, subject: str, actor: str, detail: Mapping[str, object]
    ) -> AuditEntry:
        """Chain a new entry onto the head. The head stays locked until the transaction
        ends, so append last, just before commit."""
        ...

    async def entries(
        self, after_sequence: int, limit: int, subject: str | None
    ) -> list[AuditEntry]:
        """Up to ``limit`` entries after ``after_sequence``, in sequence order."""
        ...


class Audited(Protocol):
    """Records that carry the audit log, so a decision audits in its own transaction."""

    @property
    def audit(self) -> AuditTrail: ...


class OrderQueries(Protocol):
    """The feature catalog, orders and their lines' seats."""

    async def known_features(self, names: Iterable[str]) -> set[str]: ...

    async def insert_entitlement(
        self,
        entitlement_id: str,
        customer_organization: str,
        contact: str,
        created_at: dt.datetime,
        lines: Iterable[tuple[str, NewLine]],
    ) -> None: ...

    async def get_entitlement(self, entitlement_id: str) -> Entitlement | None: ...

    async def lock_entitlement(self, entitlement_id: str) -> None:
        """Hold the order until the transaction ends (activation and return cycling are
        limited per order)."""
        ...

    async def get_line(self, activation_id: str) -> tuple[EntitlementLine, str] | None:
        """The line and its customer organization."""
        ...

    async def take_seats(self, activation_id: str, count: int) -> bool:
        """Activate ``count`` more seats of a line if that many are left."""
        ...

    async def credit_seats(self, activation_id: str, count: int) -> bool:
        """Give ``count`` activated seats back to a line, never below none."""
        ...


class ActivationQueries(Protocol):
    """Activations and the certificates they issued."""

    async def get_activation(self, host_id: str, request_id: str) -> ActivationRecord | None: ...

    async def find_certificate(self, certificate_id: str) -> ActivationRecord | None:
        """The activation whose certificate this is, locked until the transaction ends."""
        ...

    async def activation_id_of(self, certificate_id: str) -> str | None:
        """The line a certificate was activated from, if the certificate exists."""
        ...

    async def held_by(self, holder_host_id: str) -> list[ActivationRecord]:
        """The active network activations a host holds, locked, in certificate id order."""
        ...

    async def holds_local_licenses(self, holder_host_id: str) -> bool: ...

    async def insert_activation(self, record: ActivationRecord) -> None:
        """Record an activation; DuplicateRequest when its request id is recorded."""
        ...

    async def save_certificate(self, record: ActivationRecord) -> None:
        """Store what changes over an activation's life (holder, count, revision, state,
        the current certificate, when it was returned)."""
        ...

    async def list_activations(
        self, entitlement_id: str | None, host_id: str | None
    ) -> list[ActivationRecord]: ...

    async def network_activations_since(
        self, entitlement_id: str, since: dt.datetime
    ) -> list[dt.datetime]:
        """When each network activation of the order was granted after ``since``."""
        ...

    async def certificates_by_id(self, certificate_ids: Iterable[str]) -> list[ActivationRecord]:
        """The activations whose certificates these are (unknown ids are left out)."""
        ...


class ReturnQueries(Protocol):
    """Recorded return decisions."""

    async def get_return(self, host_id: str, request_id: str) -> ReturnRecord | None: ...

    async def insert_return(self, record: ReturnRecord) -> None:
        """Record a return decision; DuplicateRequest when its request id is recorded."""
        ...

    async def credited_returns_since(
        self, entitlement_id: str, since: dt.datetime
    ) -> list[dt.datetime]:
        """When each return of the order credited seats after ``since``."""
        ...


class RepairQueries(Protocol):
    """Recorded repairs and the host generations they made."""

    async def lock_repair_host(self, host_public_key: bytes) -> None:
        """Hold the host key's repairs until the transaction ends."""
        ...

    async def get_repair(self, host_id: str, request_id: str) -> RepairRecord | None: ...

    async def insert_repair(self, record: RepairRecord) -> None:
        """Record a repair; DuplicateRequest when its request id is recorded."""
        ...

    async def repairs_since(self, host_public_key: bytes, since: dt.datetime) -> list[dt.datetime]:
        """When each repair of the host key was granted after ``since``."""
        ...

    async def newest_generation(self, host_public_key: bytes) -> int:
        """The host key's newest generation: 0 until a repair re-bound its licenses."""
        ...

    async def insert_generation(self, generation: HostGeneration) -> None: ...

    async def generations_of(self, host_public_key: bytes) -> list[HostGeneration]:
        """Every re-binding of the host key's licenses, oldest first."""
        ...


class CheckInQueries(Protocol):
    """Recorded check-ins."""

    async def get_check_in(self, host_id: str, request_id: str) -> CheckInRecord | None: ...

    async def insert_check_in(self, record: CheckInRecord) -> None:
        """Record a check-in; DuplicateRequest when its request id is recorded."""
        ...

    async def check_ins_since(
        self, host_id: str, standing: CheckInStanding, since: dt.datetime
    ) -> int:
        """How many check-ins of the host with this standing were recorded since then."""
        ...


class VendorRecords(
    Audited,
    OrderQueries,
    ActivationQueries,
    ReturnQueries,
    RepairQueries,
    CheckInQueries,
    Protocol,
):
    """Everything the vendor's rules read and write, within one transaction."""


Records = TypeVar("Records", covariant=True)


class Transactions(Protocol[Records]):
    """Opens the transactions a use case runs in: committed when the block ends, rolled
    back when it raises."""

    def transaction(self) -> AbstractAsyncContextManager[Records]: ...


class VendorStore(Transactions[VendorRecords], Protocol):
    """The Activation Server's database."""

    def snapshot(self) -> AbstractAsyncContextManager[VendorRecords]:
        """A read-only transaction that sees one consistent state throughout (reading the
        audit log while decisions append to it)."""
        ...


class KeyFiles(Protocol):
    """Where the vendor signing keys are kept (files several replicas may share)."""

    @property
    def first_key(self) -> Path: ...

    def version(self) -> object:
        """Changes whenever the record of the keys is rewritten."""
        ...

    def load(self, now: dt.datetime) -> tuple[Keyring, bool]:
        """The keyring, and whether the first key was just created (at ``now``)."""
        ...

    def add_active(self, signing_key: SigningKey, created_at: dt.datetime) -> Keyring:
        """Store a new key, publish its public half, then make it the one that signs."""
        ...
