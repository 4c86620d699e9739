"""Database plumbing shared by the three services: engines, migrations, UTC times.

Each service owns its own database, chosen by a SQLAlchemy URL: SQLite through aiosqlite
(the embedded default, a file in the data directory) or PostgreSQL through asyncpg. The
service's Alembic migrations run at start; on PostgreSQL an advisory lock keeps replicas
that start together from migrating at once.
"""

from __future__ import annotations

import datetime as dt
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, Generic, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import DateTime, Executable, RowMapping, event, text
from sqlalchemy.dialects.sqlite.aiosqlite import SQLiteDialect_aiosqlite
from sqlalchemy.engine import Connection, Dialect, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.ext.asyncio import AsyncSession as AsyncSession
from sqlalchemy.types import TypeDecorator

from tessera.storage import sqlite_connection


class UTCDateTime(TypeDecorator[dt.datetime]):
    """An aware UTC datetime on every database (SQLite stores it naive, in UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; use aware UTC datetimes")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(
        self, value: dt.datetime | None, dialect: Dialect
    ) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def sqlite_url(data_dir: Path, name: str) -> str:
    """The default database URL: a SQLite file in the service's data directory."""
    return f"sqlite+aiosqlite:///{(data_dir / name).resolve()}"


def create_engine(url: str) -> AsyncEngine:
    """An async engine for ``url``, tuned for the embedded SQLite default when it is one."""
    if url.startswith("sqlite"):
        # The file and sqlite3.connect's options, as SQLAlchemy reads them from the URL.
        [database], options = SQLiteDialect_aiosqlite().create_connect_args(make_url(url))
        options.setdefault("timeout", 30)
        if database != ":memory:" and not options.get("uri"):
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        # One connection: SQLite writes one transaction at a time anyway, and waiting in
        # the pool's queue is cheap where SQLite's busy handler sleeps and retries.
        # Statements take one trip each to aiosqlite's thread (tessera.storage.sqlite_connection).
        engine = create_async_engine(
            url,
            async_creator=partial(sqlite_connection.connect, database, **options),
            pool_size=1,
            max_overflow=0,
            pool_timeout=60,
        )
        _make_sqlite_transactions_immediate(engine)
        return engine
    return create_async_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)


def _make_sqlite_transactions_immediate(engine: AsyncEngine) -> None:
    # pysqlite's own BEGIN handling defers the write lock, so two writers can deadlock
    # upgrading from read to write. BEGIN IMMEDIATE takes the lock up front and waits.
    @event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def on_begin(connection: Connection) -> None:
        # Sent with the transaction's first statement, in the same trip to SQLite's thread.
        driver = connection.connection.driver_connection
        assert isinstance(driver, sqlite_connection.OneTripConnection)
        driver.begin_with_next_statement("BEGIN IMMEDIATE")


R = TypeVar("R")


async def first_row(session: AsyncSession, query: Executable) -> RowMapping | None:
    """The first row of ``query`` as a mapping, or None."""
    return (await session.execute(query)).mappings().first()


class TransactionalStore(Generic[R]):
    """A service's database: one session factory, one repository per transaction.

    The domain owns the transaction (``async with store.transaction() as repo``); the
    repository owns the SQL and returns plain records, so nothing lazy-loads later.
    """

    def __init__(self, engine: AsyncEngine, repository: Callable[[AsyncSession], R]) -> None:
        self.engine = engine
        self._repository = repository
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[R]:
        async with self._sessions() as session, session.begin():
            yield self._repository(session)


async def migrate(engine: AsyncEngine, migrations: Path) -> None:
    """Apply the Alembic migrations in ``migrations`` up to head."""
    config = Config()
    config.set_main_option("script_location", str(migrations))
    async with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            lock_key = zlib.crc32(str(migrations.name + migrations.parent.parent.name).encode())
            await connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": lock_key})

        def upgrade(sync_connection: Connection) -> None:
            config.attributes["connection"] = sync_connection
            command.upgrade(config, "head")

        await connection.run_sync(upgrade)
