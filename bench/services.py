"""The processes under test and what they need: a License Server (or the echo server)
as a real process on loopback, a vendor (Activation Server + Administrator, in this
process) to activate seats onto it, and a throw-away PostgreSQL database."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import asyncpg
import grpc
from sqlalchemy.engine import make_url

from bench.echo_server import METHOD as ECHO_METHOD
from services.activation_server import config as as_config
from services.activation_server import server as as_server
from services.administrator import config as admin_config
from services.administrator import server as admin_server
from tessera.activation.v1 import activation_pb2 as apb
from tessera.activation.v1 import activation_pb2_grpc as apb_grpc
from tessera.admin.v1 import admin_pb2, admin_pb2_grpc
from tessera.auth import bearer_metadata
from tessera.common.v1.common_pb2 import LicenseKind
from tessera.server.serving import is_serving

ROOT = Path(__file__).resolve().parents[1]
VENDOR_TOKEN = "bench-vendor-token"
OPERATOR_TOKEN = "bench-operator-token"
FEATURE = "client.station"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ServerProcess:
    """A service run as ``python -m MODULE ARGS`` with its output in a log file."""

    def __init__(
        self,
        name: str,
        module: str,
        args: list[str],
        log_path: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.module = module
        self.args = args
        self.log_path = log_path
        # Added to the environment (e.g. LD_PRELOAD of libfaketime for a clock step).
        self.env = env or {}
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.module, *self.args],
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
        )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL: no graceful stop, nothing told to the clients."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None
        self._close_log()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, then SIGKILL if it has not stopped within ``timeout``."""
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    async def wait_until(self, probe: Probe) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited: {self.log_tail()}")
            if await probe():
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.name} did not become ready: {self.log_tail()}")


class Probe:
    """Whether a server answers yet."""

    def __init__(self, target: str, echo: bool) -> None:
        self.target = target
        self.echo = echo

    async def __call__(self) -> bool:
        if not self.echo:
            return await is_serving(self.target, deadline=0.5)
        async with grpc.aio.insecure_channel(self.target) as channel:
            call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(ECHO_METHOD)
            try:
                await call(b"ping", timeout=0.5)
            except grpc.aio.AioRpcError:
                return False
            return True


@dataclass
class LicenseServerConfig:
    data_dir: Path
    database_url: str
    port: int
    vendor_keys: Path
    lease_ttl: int = 90
    heartbeat_interval: float = 10.0
    sweep_interval: float = 5.0
    # Where the server serves GET /metrics (0: not served).
    metrics_port: int = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def ebo_address(self) -> str:
        return f"{self.port}@127.0.0.1"

    def args(self) -> list[str]:
        return [
            "--listen", self.target,
            "--data-dir", str(self.data_dir),
            "--database-url", self.database_url,
            "--vendor-keys", str(self.vendor_keys),
            "--machine-id", "bench-machine",
            "--lease-ttl", str(self.lease_ttl),
            "--heartbeat-interval", str(self.heartbeat_interval),
            "--sweep-interval", str(self.sweep_interval),
            "--operator-token", OPERATOR_TOKEN,
            "--log-level", "WARNING",
            # Thousands of clients from one address stand in for thousands of hosts.
            "--max-streams-per-host", "0",
            "--acquire-rate", "0",
        ] + (
            ["--metrics-listen", f"127.0.0.1:{self.metrics_port}"] if self.metrics_port else []
        )  # fmt: skip

    def counter(self, name: str) -> float:
        """The value of an unlabelled counter on the server's GET /metrics (0 if absent)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics") as page:
            for line in page.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        return 0.0


async def start_license_server(config: LicenseServerConfig, name: str) -> ServerProcess:
    config.data_dir.mkdir(parents=True, exist_ok=True)
    process = ServerProcess(
        name, "services.license_server", config.args(), config.data_dir / "server.log"
    )
    process.start()
    await process.wait_until(Probe(config.target, echo=False))
    return process


async def start_echo_server(work_dir: Path) -> tuple[ServerProcess, str]:
    port = free_port()
    target = f"127.0.0.1:{port}"
    process = ServerProcess(
        "echo server", "bench.echo_server", ["--listen", target], work_dir / "echo.log"
    )
    process.start()
    await process.wait_until(Probe(target, echo=True))
    return process, target


class Vendor:
    """An Activation Server and an Administrator in this process, only to activate
    seats onto the License Servers under test (idle while anything is measured)."""

    def __init__(
        self,
        activation: as_server.ActivationServer,
        admin: admin_server.Administrator,
        activation_dir: Path,
    ) -> None:
        self.activation = activation
        self.admin = admin
        self.activation_dir = activation_dir

    @classmethod
    async def start(cls, work_dir: Path) -> Vendor:
        logging.getLogger().setLevel(logging.WARNING)
        as_dir = work_dir / "activation_server"
        activation = await as_server.build(
            as_config.load_settings(
                [
                    "--listen", "127.0.0.1:0",
                    "--data-dir", str(as_dir),
                    "--vendor-token", VENDOR_TOKEN,
                    "--log-level", "WARNING",
                ],
                environ={},
            )
        )  # fmt: skip
        admin = await admin_server.build(
            admin_config.load_settings(
                [
                    "--listen", "127.0.0.1:0",
                    "--data-dir", str(work_dir / "administrator"),
                    "--activation-server", f"127.0.0.1:{activation.port}",
                    # The operator token is admitted here and by the License Server.
                    "--operator-token", OPERATOR_TOKEN,
                    "--license-server-token", OPERATOR_TOKEN,
                    "--log-level", "WARNING",
                ],
                environ={},
            )
        )  # fmt: skip
        return cls(activation, admin, as_dir)

    @property
    def vendor_keys(self) -> Path:
        return self.activation_dir / "vendor-keys.pub"

    async def activate(self, license_server: str, seats: int) -> None:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{self.activation.port}") as vendor_channel,
            grpc.aio.insecure_channel(f"127.0.0.1:{self.admin.port}") as admin_channel,
        ):
            created = await apb_grpc.VendorServiceStub(vendor_channel).CreateEntitlement(
                apb.CreateEntitlementRequest(
                    customer_organization="Bench",
                    lines=[
                        apb.NewEntitlementLine(
                            feature=FEATURE, count=seats, kind=LicenseKind.LICENSE_KIND_NETWORK
                        )
                    ],
                ),
                metadata=bearer_metadata(VENDOR_TOKEN),
            )
            await admin_pb2_grpc.AdministratorServiceStub(admin_channel).Activate(
                admin_pb2.ActivateRequest(
                    license_server=license_server,
                    activation_id=created.entitlement.lines[0].activation_id,
                    count=seats,
                ),
                metadata=bearer_metadata(OPERATOR_TOKEN),
            )

    async def stop(self) -> None:
        await self.admin.stop(0)
        await self.activation.stop(0)


def _plain_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def create_postgres_database(server_url: str) -> tuple[str, str]:
    """A fresh database on the server at ``server_url``: (its name, its URL)."""
    name = f"tessera_bench_{uuid.uuid4().hex[:12]}"
    connection = await asyncpg.connect(_plain_dsn(server_url), timeout=5)
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    return name, make_url(server_url).set(database=name).render_as_string(hide_password=False)


async def backend_pids(server_url: str, name: str) -> list[int]:
    """The PostgreSQL backend processes connected to database ``name`` now."""
    connection = await asyncpg.connect(_plain_dsn(server_url), timeout=5)
    try:
        rows = await connection.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            name,
        )
    finally:
        await connection.close()
    return [int(row["pid"]) for row in rows]


async def drop_postgres_database(server_url: str, name: str) -> None:
    with contextlib.suppress(Exception):
        connection = await asyncpg.connect(_plain_dsn(server_url), timeout=5)
        try:
            await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await connection.close()
