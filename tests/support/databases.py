"""Empty databases for a test: SQLite files in its directory, or fresh PostgreSQL databases.

PostgreSQL tests need TESSERA_TEST_POSTGRES_URL, e.g.
``postgresql+asyncpg://postgres@127.0.0.1:5432/postgres``; each test gets a fresh database
created on that server and dropped afterwards. Without the URL they skip, except under
CI=true, where a missing PostgreSQL is a failure.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import make_url

POSTGRES_URL = os.environ.get("TESSERA_TEST_POSTGRES_URL", "")
IN_CI = os.environ.get("CI", "").lower() == "true"


def require_postgres() -> str:
    """The PostgreSQL server's URL; skips the test without one (fails it under CI=true)."""
    if POSTGRES_URL:
        return POSTGRES_URL
    if IN_CI:
        pytest.fail("CI=true but TESSERA_TEST_POSTGRES_URL is not set: PostgreSQL tests must run")
    pytest.skip("TESSERA_TEST_POSTGRES_URL is not set; PostgreSQL tests skipped")


def plain_dsn(url: str) -> str:
    """The URL as libpq/asyncpg spell it (no SQLAlchemy driver name)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class DatabaseFactory:
    """Makes empty databases of one kind for a test and removes them afterwards."""

    def __init__(self, kind: str, tmp_path: Path) -> None:
        self.kind = kind
        self.tmp_path = tmp_path
        self.created: list[str] = []

    async def new(self, name: str) -> str:
        if self.kind == "sqlite":
            return f"sqlite+aiosqlite:///{self.tmp_path / (name + '.db')}"
        server = require_postgres()
        database = f"tessera_test_{name}_{uuid.uuid4().hex[:12]}"
        connection = await asyncpg.connect(plain_dsn(server))
        try:
            await connection.execute(f'CREATE DATABASE "{database}"')
        finally:
            await connection.close()
        self.created.append(database)
        return make_url(server).set(database=database).render_as_string(hide_password=False)

    async def drop_all(self) -> None:
        if not self.created:
            return
        connection = await asyncpg.connect(plain_dsn(POSTGRES_URL))
        try:
            for database in self.created:
                await connection.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        finally:
            await connection.close()
