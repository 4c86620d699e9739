"""SQLite connections whose statements each take one trip to the database thread.

aiosqlite runs every ``sqlite3`` call on its connection's own thread and hands the
result back to the event loop. SQLAlchemy's aiosqlite adapter makes one such call per
cursor operation: open a cursor, execute, fetch the rows, close, so a statement costs
three or four trips, each a wake-up of the database thread and then of the event loop.
On a busy loop every trip also waits its turn behind the loop's other work, and a
transaction's statements run one after another: a group commit's transaction (BEGIN,
four statements, COMMIT, and the pool's reset) took 18 trips.

The cursor here does the whole statement in one trip: execute, fetch every row, read
the row count and close the ``sqlite3`` cursor, all on the database thread; the adapter
then reads what it asks for from memory. Rows are always fetched whole, also for what
SQLAlchemy calls server-side cursors (nothing here streams results from SQLite). The
pool's reset after a COMMIT, a rollback with no transaction open, takes no trip at all,
and the engine's BEGIN IMMEDIATE travels with the transaction's first statement. That
transaction now takes five.

Everything else (transactions, COMMIT, the thread, closing) is aiosqlite's own. The
engine gets these connections through SQLAlchemy's ``async_creator``, and each one checks
first that its SQLite can run the services' SQL (``check_sqlite``).
"""

from __future__ import annotations

import sqlite3
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

import aiosqlite
from aiosqlite.context import contextmanager

_Description = tuple[tuple[Any, ...], ...] | None

# What the services' SQL needs of SQLite: RETURNING (3.35), and room for a few thousand
# bound parameters in one statement (the License Server's heartbeat flush binds up to
# 5,000 lease ids). 32,766 is SQLite's own default limit since 3.32.
MIN_SQLITE_VERSION = (3, 35, 0)
MIN_BOUND_PARAMETERS = 32_766


class UnsupportedSQLite(Exception):
    """The SQLite library Python was built with cannot run the services' SQL."""


def check_sqlite(connection: sqlite3.Connection) -> None:
    """UnsupportedSQLite, saying what is missing, unless ``connection``'s SQLite has
    RETURNING and allows MIN_BOUND_PARAMETERS bound parameters per statement."""
    if sqlite3.sqlite_version_info < MIN_SQLITE_VERSION:
        raise UnsupportedSQLite(
            f"SQLite {sqlite3.sqlite_version} is too old: 3.35 or newer is needed (RETURNING)"
        )
    limit = connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    if limit < MIN_BOUND_PARAMETERS:
        raise UnsupportedSQLite(
            f"this SQLite allows {limit} bound parameters per statement; "
            f"{MIN_BOUND_PARAMETERS} or more are needed (SQLite's default since 3.32)"
        )


def _run(
    connection: sqlite3.Connection, begin: str | None, sql: str, parameters: Any, many: bool
) -> tuple[_Description, list[Any], int, int | None]:
    """On the database thread: open the transaction with ``begin`` if one is due, run the
    statement, and return its description, rows, row count and last row id."""
    if begin is not None:
        connection.execute(begin)
    cursor = connection.cursor()
    try:
        if many:
            cursor.executemany(sql, parameters)
        elif parameters is None:
            cursor.execute(sql)
        else:
            cursor.execute(sql, parameters)
        description = cursor.description
        rows = cursor.fetchall() if description is not None else []
        # After the rows: an UPDATE ... RETURNING counts its rows as they are stepped.
        return description, rows, cursor.rowcount, cursor.lastrowid
    finally:
        cursor.close()


class OneTripCursor:
    """The part of an aiosqlite cursor that SQLAlchemy's adapter uses, filled by one trip
    per statement."""

    def __init__(self, connection: OneTripConnection) -> None:
        self._connection = connection
        self.description: _Description = None
        self.rowcount = -1
        self.lastrowid: int | None = None
        self.arraysize = 1
        self._rows: deque[Any] = deque()

    async def execute(self, sql: str, parameters: Any = None) -> OneTripCursor:
        return await self._run(sql, parameters, many=False)

    async def executemany(self, sql: str, parameters: Iterable[Any]) -> OneTripCursor:
        return await self._run(sql, parameters, many=True)

    async def _run(self, sql: str, parameters: Any, many: bool) -> OneTripCursor:
        connection = self._connection
        # aiosqlite's own way onto its thread (its cursor methods use it too).
        trip = connection._execute(  # type: ignore[no-untyped-call]
            _run, connection._conn, connection._take_begin(), sql, parameters, many
        )
        self.description, rows, self.rowcount, self.lastrowid = await trip
        self._rows = deque(rows)
        return self

    async def fetchone(self) -> Any:
        return self._rows.popleft() if self._rows else None

    async def fetchmany(self, size: int | None = None) -> Sequence[Any]:
        count = min(self.arraysize if size is None else size, len(self._rows))
        return [self._rows.popleft() for _ in range(count)]

    async def fetchall(self) -> Sequence[Any]:
        taken = list(self._rows)
        self._rows.clear()
        return taken

    async def setinputsizes(self, *sizes: Any) -> None:
        """Nothing to do: sqlite3 ignores input sizes too."""

    async def close(self) -> None:
        """Nothing to do: the sqlite3 cursor closed at the end of its trip."""
        self._rows.clear()

    def __aiter__(self) -> OneTripCursor:
        return self

    async def __anext__(self) -> Any:
        if not self._rows:
            raise StopAsyncIteration
        return self._rows.popleft()


class OneTripConnection(aiosqlite.Connection):
    """An aiosqlite connection whose cursors make one trip per statement."""

    def __init__(self, connector: Callable[[], sqlite3.Connection], iter_chunk_size: int) -> None:
        super().__init__(connector, iter_chunk_size)
        self._begin: str | None = None

    def begin_with_next_statement(self, begin: str) -> None:
        """Open a transaction with ``begin`` (a BEGIN statement) in the same trip as the
        next statement of a cursor, just before it. Nothing is open, and no lock taken,
        until then; a BEGIN that fails fails that statement. (aiosqlite's own shortcuts,
        ``execute`` and the like, do not send it: SQLAlchemy uses cursors only.)"""
        self._begin = begin

    def _take_begin(self) -> str | None:
        begin, self._begin = self._begin, None
        return begin

    @contextmanager
    async def cursor(self) -> OneTripCursor:  # type: ignore[override]
        return OneTripCursor(self)

    async def commit(self) -> None:
        """Commit the open transaction; one that never ran a statement was never opened,
        so there is nothing to commit and no trip to make."""
        if self._take_begin() is None:
            await super().commit()

    async def rollback(self) -> None:
        """Roll back the open transaction. With none open (the pool's reset of a
        connection whose transaction committed, or a transaction that never ran a
        statement) sqlite3 would do nothing, so neither does this, and it saves the trip."""
        self._take_begin()
        if self.in_transaction:
            await super().rollback()


async def connect(database: str, **options: Any) -> OneTripConnection:
    """Open ``database`` with one-trip cursors; ``options`` go to ``sqlite3.connect`` (the
    ones SQLAlchemy's dialect derives from the URL). The database thread is a daemon, so
    a process that forgot to close its engine can still exit. UnsupportedSQLite when
    the SQLite library cannot run the services' SQL (``check_sqlite``)."""
    connection = OneTripConnection(partial(sqlite3.connect, database, **options), 64)
    connection._thread.daemon = True
    await connection  # starts the thread and connects on it
    try:
        await connection._execute(check_sqlite, connection._conn)  # type: ignore[no-untyped-call]
    except UnsupportedSQLite:
        await connection.close()
        raise
    return connection
