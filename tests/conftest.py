"""Shared fixtures: databases (SQLite and real PostgreSQL), clocks, in-process services.

The classes behind them live in tests/support/ (databases.py says how PostgreSQL tests
find their server).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.support.clock import FakeClock
from tests.support.databases import DatabaseFactory
from tests.support.processes import Processes


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def databases(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[DatabaseFactory]:
    """Fresh databases on SQLite and on PostgreSQL (each test runs once per kind)."""
    factory = DatabaseFactory(request.param, tmp_path)
    yield factory
    await factory.drop_all()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    """Services as real processes; each is killed at the end, stopped ones (SIGSTOP) too."""
    processes = Processes(tmp_path)
    yield processes
    for process in processes.running.values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGCONT)  # stopped, it would not end the test
    processes.kill_all()
