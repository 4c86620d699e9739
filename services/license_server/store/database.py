"""The License Server's database as the domain sees it: transactions that yield the
queries of both aggregates, and the retry of a transaction a conflict rolled back.
Implements ``domain.ports.LicenseStore``; only ``server.py`` (and the tests) build it."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from services.license_server.store.leases import SqlLeaseQueries
from services.license_server.store.trust import SqlTrustQueries
from tessera.storage import TransactionalStore

log = logging.getLogger(__name__)

T = TypeVar("T")

# Times a transaction is tried again after PostgreSQL rolled it back for a deadlock or a
# serialization failure with another replica's transaction.
RETRIES_ON_CONFLICT = 3
# SQLSTATEs of those two.
CONFLICTS = frozenset({"40P01", "40001"})


class SqlQueries(SqlLeaseQueries, SqlTrustQueries):
    """Both aggregates' queries within one transaction (``domain.ports.Queries``)."""

    def __init__(self, session: AsyncSession, origin: str = "") -> None:
        SqlLeaseQueries.__init__(self, session, origin)


class SqlLicenseStore(TransactionalStore[SqlQueries]):
    """The License Server's database. ``origin`` names this process in the lease events
    it announces, so it can ignore its own when they come back over NOTIFY."""

    def __init__(self, engine: AsyncEngine, origin: str = "") -> None:
        super().__init__(engine, lambda session: SqlQueries(session, origin))
        self.origin = origin

    async def retrying_transaction(self, work: Callable[[SqlQueries], Awaitable[T]]) -> T:
        """``work`` within one transaction, again (a few times) in a new one when
        PostgreSQL chose this transaction to break a deadlock with another replica's, or
        to keep serializability: it was rolled back whole, so doing it again is doing it
        once. Any other error is raised as it is."""
        for attempt in range(RETRIES_ON_CONFLICT + 1):
            try:
                async with self.transaction() as queries:
                    return await work(queries)
            except DBAPIError as error:
                if attempt == RETRIES_ON_CONFLICT or not _conflict(error):
                    raise
                log.info("a transaction was rolled back by a conflict; retrying")
        raise AssertionError("unreachable")  # pragma: no cover


def _conflict(error: DBAPIError) -> bool:
    return getattr(error.orig, "sqlstate", None) in CONFLICTS
