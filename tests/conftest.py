"""Shared fixtures: databases (SQLite and real PostgreSQL), clocks, sites, vendors.

``site`` (all three services in process, the License Server on the test's ``clock``),
``real_clock_site`` (the same on the real clock), ``host_b`` (a second License Server
beside ``site``), ``vendor`` (the Activation Server alone), ``lone_license_server`` with
``signing_vendor`` (a License Server alone, the vendor's key in the test's hands) and
``processes`` (services as real processes). The classes behind them live in
tests/support/ (databases.py says how PostgreSQL tests find their server).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from services.license_server import config as ls_config
from services.license_server import server as ls_server
from tests.support.clock import FakeClock
from tests.support.databases import DatabaseFactory
from tests.support.in_process_site import Site, start_site
from tests.support.processes import Processes
from tests.support.tokens import LICENSE_SERVER_FLAGS
from tests.support.trust import LicenseServerUnderTest, SigningVendor
from tests.support.vendor import ActivationServerUnderTest, start_vendor


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
    """A clock that moves only when the test says so."""
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


@pytest.fixture
async def site(tmp_path: Path, databases: DatabaseFactory, clock: FakeClock) -> AsyncIterator[Site]:
    """All three services in process; the License Server's time is the test's ``clock``."""
    site = await start_site(tmp_path, databases, license_clock=clock)
    yield site
    await site.close()


@pytest.fixture
async def real_clock_site(tmp_path: Path, databases: DatabaseFactory) -> AsyncIterator[Site]:
    """All three services in process on the real clock (for clients, the CLI and examples
    whose own timers must meet the server's)."""
    site = await start_site(tmp_path, databases)
    yield site
    await site.close()


@pytest.fixture
async def vendor(
    tmp_path: Path, databases: DatabaseFactory, clock: FakeClock
) -> AsyncIterator[ActivationServerUnderTest]:
    """The vendor's Activation Server alone, in process, on the test's ``clock``."""
    vendor = await start_vendor(tmp_path, databases, clock)
    yield vendor
    await vendor.close()


@pytest.fixture
async def signing_vendor(tmp_path: Path) -> SigningVendor:
    """A vendor key in the test's hands, published to ``tmp_path / "vendor-keys.pub"``
    (where ``lone_license_server`` reads it); it signs answers the test composes."""
    vendor = SigningVendor()
    vendor.publish(tmp_path / "vendor-keys.pub")
    return vendor


@pytest.fixture
async def lone_license_server(
    tmp_path: Path, databases: DatabaseFactory, clock: FakeClock
) -> AsyncIterator[LicenseServerUnderTest]:
    """A License Server alone on the test's ``clock``; the test plays the vendor with a
    SigningVendor that publishes its keys to ``tmp_path / "vendor-keys.pub"``."""
    server = LicenseServerUnderTest(
        data_dir=tmp_path / "license_server",
        database_url=await databases.new("license"),
        vendor_keys=tmp_path / "vendor-keys.pub",
        machine_id="machine-a",
        clock=clock,
    )
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def host_b(
    site: Site, databases: DatabaseFactory, clock: FakeClock
) -> AsyncIterator[ls_server.LicenseServer]:
    """A second License Server on another machine, trusting the same vendor."""
    server = await ls_server.build(
        ls_config.load_settings(
            [
                "--listen", "127.0.0.1:0",
                "--data-dir", str(site.tmp_path / "license_server_b"),
                "--database-url", await databases.new("license_b"),
                "--vendor-keys", str(site.tmp_path / "activation_server" / "vendor-keys.pub"),
                "--machine-id", "other-machine",
                "--sweep-interval", "3600",
                *LICENSE_SERVER_FLAGS,
            ],
            environ={},
        ),
        clock=clock,
    )  # fmt: skip
    yield server
    await server.stop(0)
