"""Each service's Alembic migrations agree with its tables and run up, again, down and up."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData, inspect, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from services.activation_server import server as activation_server
from services.activation_server.store import tables as activation_tables
from services.administrator import server as administrator
from services.administrator.store import tables as administrator_tables
from services.license_server import server as license_server
from services.license_server.store import tables as license_tables
from tessera.storage import create_engine, migrate
from tests.support.databases import DatabaseFactory

SERVICES = {
    "activation_server": (activation_server.MIGRATIONS, activation_tables.metadata),
    "license_server": (license_server.MIGRATIONS, license_tables.metadata),
    "administrator": (administrator.MIGRATIONS, administrator_tables.metadata),
}


@pytest.fixture(params=sorted(SERVICES))
async def service(
    request: pytest.FixtureRequest, databases: DatabaseFactory
) -> AsyncIterator[tuple[AsyncEngine, Path, MetaData]]:
    migrations, metadata = SERVICES[request.param]
    engine = create_engine(await databases.new(request.param))
    yield engine, migrations, metadata
    await engine.dispose()


def _schema(connection: Connection) -> dict[str, Any]:
    inspector = inspect(connection)
    schema: dict[str, Any] = {}
    for table in inspector.get_table_names():
        schema[table] = {
            "columns": {
                column["name"]: column["nullable"] for column in inspector.get_columns(table)
            },
            "primary_key": set(inspector.get_pk_constraint(table)["constrained_columns"]),
            "indexes": {index["name"] for index in inspector.get_indexes(table)},
            "checks": {check["name"] for check in inspector.get_check_constraints(table)},
        }
    return schema


def _expected(metadata: MetaData) -> dict[str, Any]:
    return {
        table.name: {
            "columns": {column.name: column.nullable for column in table.columns},
            "primary_key": {column.name for column in table.primary_key.columns},
            "checks": {
                constraint.name
                for constraint in table.constraints
                if constraint.__class__.__name__ == "CheckConstraint"
            },
        }
        for table in metadata.sorted_tables
    }


async def schema_of(engine: AsyncEngine) -> dict[str, Any]:
    async with engine.connect() as connection:
        return await connection.run_sync(_schema)


async def version_of(engine: AsyncEngine) -> str | None:
    async with engine.connect() as connection:
        version = await connection.scalar(text("SELECT version_num FROM alembic_version"))
    return None if version is None else str(version)


def head_of(migrations: Path) -> str | None:
    config = Config()
    config.set_main_option("script_location", str(migrations))
    return ScriptDirectory.from_config(config).get_current_head()


async def alembic(engine: AsyncEngine, migrations: Path, action: str, revision: str) -> None:
    """Run an Alembic command on ``engine`` the way tessera.storage.migrate does."""
    config = Config()
    config.set_main_option("script_location", str(migrations))
    async with engine.begin() as connection:

        def run(sync_connection: Connection) -> None:
            config.attributes["connection"] = sync_connection
            getattr(command, action)(config, revision)

        await connection.run_sync(run)


async def test_upgrade_to_head_creates_the_tables_of_the_metadata(
    service: tuple[AsyncEngine, Path, MetaData],
) -> None:
    engine, migrations, metadata = service
    await migrate(engine, migrations)
    schema = await schema_of(engine)
    expected = _expected(metadata)
    assert set(schema) - {"alembic_version"} == set(expected)
    for name, table in expected.items():
        assert schema[name]["columns"] == table["columns"], name
        assert schema[name]["primary_key"] == table["primary_key"], name
        assert table["checks"] <= schema[name]["checks"], name
    for table in metadata.sorted_tables:
        for index in table.indexes:
            assert index.name in schema[table.name]["indexes"], index.name
    assert await version_of(engine) == head_of(migrations)


async def test_migrating_twice_is_a_no_op(service: tuple[AsyncEngine, Path, MetaData]) -> None:
    engine, migrations, metadata = service
    await migrate(engine, migrations)
    before = await schema_of(engine)
    async with engine.connect() as connection:
        rows_before = {
            table.name: (await connection.execute(select(table))).all()
            for table in metadata.sorted_tables
        }
    await migrate(engine, migrations)
    assert await schema_of(engine) == before
    assert await version_of(engine) == head_of(migrations)
    async with engine.connect() as connection:
        rows_after = {
            table.name: (await connection.execute(select(table))).all()
            for table in metadata.sorted_tables
        }
    assert rows_after == rows_before  # e.g. the catalog is not inserted twice


async def test_downgrade_to_base_then_upgrade_again(
    service: tuple[AsyncEngine, Path, MetaData],
) -> None:
    engine, migrations, _ = service
    await migrate(engine, migrations)
    at_head = await schema_of(engine)

    await alembic(engine, migrations, "downgrade", "base")
    assert set(await schema_of(engine)) <= {"alembic_version"}
    assert await version_of(engine) is None

    await alembic(engine, migrations, "upgrade", "head")
    assert await schema_of(engine) == at_head
    await migrate(engine, migrations)
    assert await schema_of(engine) == at_head
    assert await version_of(engine) == head_of(migrations)
