"""What the License Server's rules need from the database, said as small Protocols.

The rules (leasing, trusted storage, check-ins, repairs) ask questions and make changes
within one transaction; they never know that SQL answers them. As etcd's lease package
declares the few interfaces it needs of the store (``RangeDeleter``, ``Checkpointer``)
so that it never imports the store, this module declares what the rules need and the
store (``services/license_server/store/``) implements it, importing from the domain only
these ports and ``domain.model``. So the arrows point one way: the domain never imports
SQLAlchemy or the store, only ``server.py`` names both sides, and a rule can be tested
against an in-memory fake (tests/test_license_server_domain_rules.py).

A transaction is opened with ``LicenseStore.transaction()`` and yields ``Queries``: the
queries of both aggregates, ``LeaseQueries`` (seat pools, leases, the queue, replicas,
requirements, lease events) and ``TrustQueries`` (trusted storage: pending requests,
certificates, the ledger and its seal, check-ins with the vendor). A rule that needs only
one aggregate takes only its Protocol. A transaction the database may roll back for a
conflict with another replica's (a deadlock, a serialization failure) is run with
``LicenseStore.retrying_transaction``: the store tells conflicts from other errors and
runs the work again, so the domain never sees the database's own exceptions.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol, TypeVar

from services.license_server.domain.model import (
    CheckInRow,
    Lease,
    LeaseEvent,
    LedgerEntry,
    PendingRequest,
    PoolInformation,
    Seal,
    StoredCertificate,
    Waiter,
)

T = TypeVar("T")


class DuplicateKey(Exception):
    """Another transaction inserted the same key first (a pending request, a
    certificate, the seal or a ledger entry); the caller's transaction is rolled back."""


class LeaseQueries(Protocol):
    """Seat pools, leases, the queue, replicas and requirements, within one transaction.

    Seat counts change only through conditional UPDATEs on the pool row, never by reading
    a count and writing it back, so replicas over one database never over-allocate.
    """

    # Pools

    async def take_seats(
        self, feature: str, count: int, now: dt.datetime, ticket: int | None = None
    ) -> bool:
        """Take ``count`` seats if that many are free and nobody waits ahead (``ticket``:
        a queued caller's place in line; without one, behind every live waiter)."""
        ...

    async def give_back_seats(self, seats: Counter[str]) -> None:
        """Return seats (per feature) to their pools."""
        ...

    async def get_pool(self, feature: str) -> PoolInformation | None:
        """A feature's pool, if it has one."""
        ...

    async def list_pools(self) -> list[PoolInformation]:
        """Every pool, by feature."""
        ...

    async def pools_with_queues(self, now: dt.datetime) -> list[PoolInformation]:
        """Every pool with its number of live waiters (cheap: for a metrics scrape)."""
        ...

    async def lock_pool(self, feature: str) -> PoolInformation:
        """A feature's pool (created empty when missing), locked until commit, so
        recounts of one pool take turns."""
        ...

    async def set_pool_activated(self, feature: str, activated: int) -> bool:
        """Set a pool's activated seats, unless more are in use than that."""
        ...

    # Leases

    async def insert_leases(self, granted: Sequence[tuple[Lease, bytes]]) -> None:
        """Write new leases, each with its secret's hash."""
        ...

    async def release_leases(
        self,
        credentials: Iterable[tuple[str, bytes]],
        now: dt.datetime,
        reason: str,
        epoch: int | None = None,
    ) -> dict[tuple[str, bytes], str]:
        """Release the held leases (of ``epoch``, when given) among (lease id, secret
        hash) pairs and give their seats back; the feature of each pair released."""
        ...

    async def release_lease(
        self,
        lease_id: str,
        secret_hash: bytes,
        now: dt.datetime,
        reason: str,
        epoch: int | None = None,
    ) -> str | None:
        """``release_leases`` for one lease: its feature, or None if it was not held."""
        ...

    async def get_lease(self, lease_id: str, secret_hash: bytes) -> Lease | None:
        """The lease with this id and secret hash, held or not."""
        ...

    async def extend_lease(
        self,
        lease_id: str,
        secret_hash: bytes,
        epoch: int | None,
        now: dt.datetime,
        ttl_seconds: int | None = None,
    ) -> dt.datetime | None:
        """Push a held, unexpired lease's expiry (of ``epoch``, when given) to now + its
        TTL; the new expiry, or None if it is not such a lease. A caller that knows the
        TTL passes it."""
        ...

    async def extend_leases(
        self, lease_ids: list[str], now: dt.datetime, ttl_seconds: int
    ) -> dict[str, int]:
        """Extend many held leases of one TTL; the epoch of each id still held."""
        ...

    async def shorten_stretched_leases(
        self, now: dt.datetime, tolerance: dt.timedelta
    ) -> list[str]:
        """Cut every held lease expiring more than ``tolerance`` beyond one TTL from
        ``now`` back to now + its TTL; the ids of those cut."""
        ...

    async def bump_epochs(
        self, credentials: Iterable[tuple[str, bytes]], now: dt.datetime
    ) -> dict[tuple[str, bytes], Lease]:
        """Fence out older streams of the held, unexpired leases among (lease id, secret
        hash) pairs and extend them (resume); each pair's lease as it is now."""
        ...

    async def bump_epoch(self, lease_id: str, secret_hash: bytes, now: dt.datetime) -> Lease | None:
        """``bump_epochs`` for one lease: the lease as it is now, or None."""
        ...

    async def release_expired(self, now: dt.datetime, limit: int) -> list[tuple[str, str]]:
        """Release up to ``limit`` leases whose TTL ran out; (lease id, feature) of each."""
        ...

    async def revoke_lease(self, lease_id: str, now: dt.datetime, reason: str) -> Lease | None:
        """Release a held lease without its secret; the lease, or None if not held."""
        ...

    async def lease_exists(self, lease_id: str) -> bool:
        """Whether a lease with this id was ever granted here."""
        ...

    async def list_held_leases(self, feature: str) -> list[Lease]:
        """The held leases (of ``feature``; every feature when empty), oldest first."""
        ...

    async def newest_held_leases(self, feature: str, limit: int) -> list[Lease]:
        """Up to ``limit`` held leases of ``feature``, newest first."""
        ...

    # The queue

    async def enqueue(self, waiter: Waiter, alive_until: dt.datetime, replica_id: str) -> int:
        """Put a waiter in line, served by replica ``replica_id``; its ticket."""
        ...

    async def leave_queue(self, waiter_id: str) -> None:
        """Take a waiter out of line."""
        ...

    async def claim_waiter(self, waiter_id: str, now: dt.datetime) -> bool:
        """Take a live waiter out of line to grant it; False when it is no longer live."""
        ...

    async def keep_waiter_alive(
        self, waiter_id: str, alive_until: dt.datetime, now: dt.datetime
    ) -> bool:
        """Push a live waiter's alive_until on; False when it is no longer live."""
        ...

    async def queue_position(self, waiter: Waiter, now: dt.datetime) -> int:
        """1 + the live waiters ahead of ``waiter`` for its feature."""
        ...

    async def list_waiters(self, feature: str, now: dt.datetime) -> list[Waiter]:
        """The live waiters (of ``feature``; every feature when empty), in line order."""
        ...

    async def drop_dead_waiters(self, now: dt.datetime) -> int:
        """Drop the waiters no longer live; how many."""
        ...

    async def queued_per_feature(self, now: dt.datetime) -> dict[str, int]:
        """The live waiters per feature."""
        ...

    # Replicas

    async def register_replica(self, replica_id: str, now: dt.datetime) -> None:
        """Record a replica that serves this database."""
        ...

    async def beat_replica(self, replica_id: str) -> bool:
        """Raise a replica's beat; False when it was declared dead."""
        ...

    async def hold_replica(self, replica_id: str) -> bool:
        """Whether a replica is recorded, kept so until commit."""
        ...

    async def replica_beats(self) -> dict[str, int]:
        """Every recorded replica's beat."""
        ...

    async def drop_replica(self, replica_id: str, beat: int | None = None) -> list[str] | None:
        """Declare a replica dead (only while its beat is still ``beat``, when given) and
        drop its waiters; the features they waited for, or None when it was not."""
        ...

    async def drop_other_replicas(self, replica_id: str) -> list[str]:
        """Declare every replica but ``replica_id`` dead; the features their waiters
        waited for."""
        ...

    # Requirements

    async def declare_requirement(
        self, client_host: str, feature: str, required: int, now: dt.datetime
    ) -> None:
        """Record the seats of ``feature`` a client host says it needs (0: none)."""
        ...

    async def required_per_feature(self) -> dict[str, int]:
        """The seats declared as needed, per feature."""
        ...

    # Lease events for the other replicas

    async def announce(self, event: LeaseEvent) -> None:
        """Tell the other replicas of ``event`` when this transaction commits."""
        ...

    async def announce_all(self, events: Sequence[LeaseEvent]) -> None:
        """``announce`` for many events at once."""
        ...


class TrustQueries(Protocol):
    """Trusted storage within one transaction: pending requests, certificates, the
    ledger and its seal, check-ins with the vendor."""

    # Requests to the vendor and the certificates they brought

    async def get_pending_request(self, request_id: str) -> PendingRequest | None:
        """A prepared request to the vendor."""
        ...

    async def insert_pending_request(
        self, request: PendingRequest, created_at: dt.datetime
    ) -> None:
        """Record a prepared request; DuplicateKey when its id is taken."""
        ...

    async def mark_request_installed(self, request_id: str, at: dt.datetime) -> None:
        """Note that the vendor's answer to a request was installed."""
        ...

    async def get_certificate_for_request(self, request_id: str) -> StoredCertificate | None:
        """The certificate a request brought, if installed."""
        ...

    async def list_certificates(self) -> list[StoredCertificate]:
        """Every certificate, oldest installed first."""
        ...

    async def get_certificate(self, certificate_id: str) -> StoredCertificate | None:
        """A certificate by id."""
        ...

    async def insert_certificate(self, certificate: StoredCertificate) -> None:
        """Store a certificate; DuplicateKey when its id is taken."""
        ...

    async def update_certificate(self, certificate: StoredCertificate) -> None:
        """Write a certificate's changing fields (re-issue, return, breakage)."""
        ...

    async def serving_seats(self, feature: str) -> int:
        """Seats of a feature in certificates that serve."""
        ...

    async def held_certificates(self, feature: str) -> list[StoredCertificate]:
        """Certificates of a feature that were not returned, serving or not."""
        ...

    async def pool_features(self) -> list[str]:
        """Every feature with a pool or a certificate."""
        ...

    async def expired_certificates(self, now: dt.datetime) -> list[StoredCertificate]:
        """Certificates expired by ``now`` and not yet retired."""
        ...

    async def retire_certificate(self, certificate: StoredCertificate, now: dt.datetime) -> bool:
        """Mark an expired certificate retired; False when it already was."""
        ...

    # Check-ins with the vendor

    async def withdrawn_per_feature(self, causes: Iterable[str]) -> dict[str, tuple[int, str]]:
        """Per feature, the seats one of ``causes`` keeps from serving, and one cause."""
        ...

    async def insert_check_in(self, row: CheckInRow) -> None:
        """Record a prepared check-in."""
        ...

    async def get_check_in(self, request_id: str, *, lock: bool = False) -> CheckInRow | None:
        """A check-in (held until commit with ``lock``)."""
        ...

    async def install_check_in(
        self,
        request_id: str,
        result_envelope: bytes,
        checked_at: dt.datetime,
        at: dt.datetime,
        withdraws: bool,
    ) -> None:
        """Record the vendor's answer to a check-in."""
        ...

    async def installed_check_ins(self, host_id: str) -> list[CheckInRow]:
        """Every installed check-in of ``host_id``, oldest decided first."""
        ...

    async def newest_check_in(self, host_id: str) -> CheckInRow | None:
        """The installed check-in of ``host_id`` the vendor decided last."""
        ...

    async def forget_check_ins(
        self, host_id: str, decided_before: dt.datetime, prepared_before: dt.datetime
    ) -> None:
        """Drop the check-ins of ``host_id`` that no longer matter."""
        ...

    # The ledger and its seal

    async def get_seal(self, *, lock: bool = False) -> Seal | None:
        """The seal; ``lock`` holds it until commit, so ledger appends take turns."""
        ...

    async def put_seal(self, seal: Seal) -> None:
        """Write the seal; DuplicateKey when another transaction wrote the first one."""
        ...

    async def append_ledger(self, entries: list[LedgerEntry]) -> None:
        """Append ledger entries; DuplicateKey when one's sequence is taken."""
        ...

    async def ledger_since_last_seal(self) -> list[LedgerEntry]:
        """The current segment: the newest ``sealed`` entry and everything after it."""
        ...

    async def ledger_hash_at(self, sequence: int) -> bytes | None:
        """The hash of the entry at ``sequence``, if there is one."""
        ...


class Queries(LeaseQueries, TrustQueries, Protocol):
    """The queries of both aggregates, within one transaction."""


class LicenseStore(Protocol):
    """The License Server's database: transactions that yield ``Queries``."""

    def transaction(self) -> AbstractAsyncContextManager[Queries]:
        """One transaction: committed when the block ends, rolled back when it raises."""
        ...

    async def retrying_transaction(self, work: Callable[[Queries], Awaitable[T]]) -> T:
        """``work`` within one transaction, run again (a few times) in a new one when
        the database rolled it back for a conflict with another transaction (a
        deadlock, a serialization failure): rolled back whole, doing it again is doing
        it once. ``work`` must not answer anyone before this returns."""
        ...
