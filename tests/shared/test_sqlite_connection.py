"""The embedded SQLite engine: every statement is one trip to aiosqlite's thread, and
what SQLAlchemy reads back (rows, row counts, errors) is what sqlite3 said."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from tessera.server.serving import REFUSALS
from tessera.storage import create_engine, sqlite_connection
from tessera.storage.sqlite_connection import UnsupportedSQLite, check_sqlite

metadata = MetaData()
seats = Table(
    "seats",
    metadata,
    Column("feature", String, primary_key=True),
    Column("used", Integer, nullable=False),
)


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'one-trip.db'}")
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
    yield engine
    await engine.dispose()


@pytest.fixture
def trips(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The name of every function aiosqlite runs on its thread, from now on."""
    ran: list[str] = []
    execute = aiosqlite.Connection._execute

    async def counted(self: aiosqlite.Connection, fn: Callable[..., Any], *args: Any) -> Any:
        ran.append(getattr(fn, "__name__", repr(fn)))
        return await execute(self, fn, *args)  # type: ignore[no-untyped-call]

    monkeypatch.setattr(aiosqlite.Connection, "_execute", counted)
    return ran


async def test_a_transaction_takes_one_trip_per_statement(
    engine: AsyncEngine, trips: list[str]
) -> None:
    async with engine.begin() as connection:
        await connection.execute(
            insert(seats), [{"feature": f"feature.{n}", "used": n} for n in range(5)]
        )
        changed = await connection.execute(
            update(seats).where(seats.c.used >= 3).values(used=seats.c.used + 10)
        )
        assert changed.rowcount == 2
        returned = await connection.execute(
            update(seats)
            .where(seats.c.used < 2)
            .values(used=seats.c.used + 1)
            .returning(seats.c.feature, seats.c.used)
        )
        assert sorted(returned.all()) == [("feature.0", 1), ("feature.1", 2)]
        rows = (await connection.execute(select(seats).order_by(seats.c.feature))).all()
        assert [used for _, used in rows] == [1, 2, 2, 13, 14]
    # Four statements (the first with BEGIN IMMEDIATE), COMMIT: five trips, no cursor
    # opened or closed apart, no reset after the COMMIT.
    assert trips == ["_run"] * 4 + ["commit"]


async def test_a_transaction_that_runs_nothing_takes_no_trip(
    engine: AsyncEngine, trips: list[str]
) -> None:
    async with engine.begin():
        pass
    async with engine.connect() as connection:
        await connection.begin()
        await connection.rollback()
    assert trips == []


async def test_the_write_lock_is_taken_with_the_first_statement(tmp_path: Path) -> None:
    """BEGIN IMMEDIATE still comes before anything the transaction reads: a second
    connection cannot write until the first transaction ends."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'lock.db'}"
    first, second = create_engine(url), create_engine(url)
    try:
        async with first.begin() as connection:
            await connection.run_sync(metadata.create_all)
        async with first.begin() as connection, second.connect() as other:
            await connection.execute(select(seats.c.feature))  # a read: the lock is taken
            driver = (await other.get_raw_connection()).driver_connection
            assert isinstance(driver, aiosqlite.Connection)
            await driver.execute("PRAGMA busy_timeout = 0")
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                await driver.execute("BEGIN IMMEDIATE")
    finally:
        await first.dispose()
        await second.dispose()


async def test_an_update_returning_counts_its_rows_after_they_are_read(
    engine: AsyncEngine,
) -> None:
    async with engine.begin() as connection:
        await connection.execute(insert(seats), [{"feature": "a", "used": 0}])
        result = await connection.execute(update(seats).values(used=1).returning(seats.c.feature))
        assert result.scalars().all() == ["a"]
        assert result.rowcount == 1


async def test_an_error_reaches_the_caller_and_the_transaction_rolls_back(
    engine: AsyncEngine,
) -> None:
    async with engine.begin() as connection:
        await connection.execute(insert(seats), [{"feature": "a", "used": 0}])
    with pytest.raises(IntegrityError):
        async with engine.begin() as connection:
            await connection.execute(insert(seats), [{"feature": "b", "used": 0}])
            await connection.execute(insert(seats), [{"feature": "a", "used": 1}])
    async with engine.connect() as connection:
        assert (await connection.execute(select(seats.c.feature))).scalars().all() == ["a"]


async def test_sqlite_options_in_the_url_reach_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "read-only.db"
    writable = create_engine(f"sqlite+aiosqlite:///{path}")
    async with writable.begin() as connection:
        await connection.run_sync(metadata.create_all)
    await writable.dispose()
    read_only = create_engine(f"sqlite+aiosqlite:///file:{path}?mode=ro&uri=true")
    try:
        async with read_only.connect() as connection:
            assert (await connection.execute(select(seats.c.feature))).all() == []
        with pytest.raises(OperationalError, match="readonly"):
            async with read_only.begin() as connection:
                await connection.execute(insert(seats), [{"feature": "a", "used": 0}])
    finally:
        await read_only.dispose()


def test_an_sqlite_that_allows_too_few_bound_parameters_is_refused(tmp_path: Path) -> None:
    """The heartbeat flush binds thousands of lease ids: an SQLite built with the old
    limit of 999 would fail every flush, so it is refused with the reason instead."""
    connection = sqlite3.connect(tmp_path / "limited.db")
    try:
        check_sqlite(connection)  # this machine's SQLite: accepted
        connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
        with pytest.raises(UnsupportedSQLite, match="allows 999 bound parameters"):
            check_sqlite(connection)
    finally:
        connection.close()


async def test_an_engine_on_an_unsupported_sqlite_refuses_its_first_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check runs as the engine connects, before any statement: the service's
    start-up (migrations) fails with UnsupportedSQLite, which it reports without a
    traceback (tessera.server.serving.REFUSALS). Here the minimum is raised above what any
    SQLite allows, as no SQLite on this machine is limited."""
    monkeypatch.setattr(sqlite_connection, "MIN_BOUND_PARAMETERS", 2**31)
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'refused.db'}")
    try:
        with pytest.raises(UnsupportedSQLite, match="bound parameters per statement"):
            async with engine.connect() as connection:
                await connection.execute(select(1))
    finally:
        await engine.dispose()
    assert UnsupportedSQLite in REFUSALS
