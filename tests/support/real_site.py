"""A whole Tessera site as real processes, driven with plain (synchronous) gRPC, for the
suites that attack it: fuzzing, forgery and faults.

``RealSite`` starts the Activation Server, the License Server and the Administrator with
``python -m services.<name>`` on loopback, over SQLite files in a temporary directory, with
the bearer tokens each service creates in its data directory. ``state_of`` reads what the
three databases hold (read-only), so a test can prove that a refused call changed nothing.
"""

from __future__ import annotations

import collections
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tessera.activation.v1 import activation_pb2 as apb
from tessera.activation.v1 import activation_pb2_grpc as apb_grpc
from tessera.admin.v1 import admin_pb2, admin_pb2_grpc
from tessera.auth import bearer_metadata
from tessera.common.v1.common_pb2 import LicenseKind
from tessera.license.v1 import license_pb2_grpc as lpb_grpc
from tests.support.processes import ROOT, free_port

START_WITHIN = 30.0


@dataclass
class Service:
    """One service process: its name, port, data directory and database file."""

    name: str
    module: str
    port: int
    data_dir: Path
    database: Path
    args: list[str]
    env: Mapping[str, str] = field(default_factory=dict)
    url: str = ""  # another database than the SQLite file (e.g. PostgreSQL)
    process: subprocess.Popen[bytes] | None = None
    channel: grpc.Channel | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def database_url(self) -> str:
        return self.url or f"sqlite+aiosqlite:///{self.database}"

    def token(self) -> str:
        """The bearer token the service created in its data directory for its operator or
        vendor staff ('' if none)."""
        for name in ("operator-token", "vendor-token"):
            path = self.data_dir / name
            if path.exists():
                return path.read_text().strip()
        return ""

    def credentials(self) -> tuple[tuple[str, str], ...]:
        token = self.token()
        return bearer_metadata(token) if token else ()


class _Details(
    collections.namedtuple(
        "_Details",
        ["method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"],
    ),
    grpc.ClientCallDetails,
):
    """Call details with other metadata (grpc.ClientCallDetails has no constructor)."""


class _DefaultCredential(grpc.UnaryUnaryClientInterceptor):
    """Adds a service's token to unary calls that carry no authorization."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        metadata = list(details.metadata or ())
        if not any(key == "authorization" for key, _ in metadata):
            metadata += self.service.credentials()
        return continuation(
            _Details(
                details.method,
                details.timeout,
                metadata,
                details.credentials,
                details.wait_for_ready,
                getattr(details, "compression", None),
            ),
            request,
        )


class RealSite:
    """The three services as real processes; start() waits until each answers health."""

    def __init__(
        self, root: Path, ls_args: tuple[str, ...] = (), ls_database_url: str = ""
    ) -> None:
        self.root = root
        activation = Service(
            "activation", "services.activation_server", free_port(),
            root / "as", root / "as.db", [],
        )  # fmt: skip
        license_server = Service(
            "license", "services.license_server", free_port(),
            root / "ls", root / "ls.db",
            [
                "--vendor-keys", str(activation.data_dir / "vendor-keys.pub"),
                "--machine-id", "attack-machine",
                "--sweep-interval", "3600",
                *ls_args,
            ],
            url=ls_database_url,
        )  # fmt: skip
        administrator = Service(
            "admin", "services.administrator", free_port(),
            root / "admin", root / "admin.db",
            [
                "--activation-server", activation.target,
                # The License Server's administrator-token (read at each connection).
                "--license-server-token-file",
                str(license_server.data_dir / "administrator-token"),
            ],
        )  # fmt: skip
        self.services = {s.name: s for s in (activation, license_server, administrator)}

    def __getitem__(self, name: str) -> Service:
        return self.services[name]

    # Processes

    def start(self, *names: str) -> None:
        for name in names or tuple(self.services):
            self._spawn(self.services[name])
            self.wait_serving(name)

    def _spawn(self, service: Service) -> None:
        with (self.root / f"{service.name}.log").open("ab") as log:
            service.process = subprocess.Popen(
                [
                    sys.executable, "-m", service.module,
                    "--listen", service.target,
                    "--data-dir", str(service.data_dir),
                    "--database-url", service.database_url,
                    *service.args,
                ],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **service.env},
            )  # fmt: skip
        service.channel = grpc.insecure_channel(service.target)

    def wait_serving(self, name: str) -> None:
        service = self.services[name]
        assert service.channel is not None and service.process is not None
        health: Any = health_pb2_grpc.HealthStub(service.channel)
        deadline = time.monotonic() + START_WITHIN
        while time.monotonic() < deadline:
            if service.process.poll() is not None:
                raise AssertionError(f"{name} exited: {self.log(name)}")
            try:
                grpc.channel_ready_future(service.channel).result(timeout=1)
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except (grpc.RpcError, grpc.FutureTimeoutError):
                pass
        raise AssertionError(f"{name} never became healthy: {self.log(name)}")

    def healthy(self, name: str) -> bool:
        """The process is alive and its gRPC health says SERVING."""
        service = self.services[name]
        if service.process is None or service.process.poll() is not None:
            return False
        assert service.channel is not None
        try:
            stub: Any = health_pb2_grpc.HealthStub(service.channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self, name: str) -> None:
        service = self.services[name]
        if service.channel is not None:
            service.channel.close()
            service.channel = None
        if service.process is not None and service.process.poll() is None:
            service.process.send_signal(signal.SIGTERM)
            try:
                service.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                service.process.kill()
                service.process.wait()
        service.process = None

    def close(self) -> None:
        for name in self.services:
            self.stop(name)

    # Stubs

    def channel(self, name: str) -> grpc.Channel:
        channel = self.services[name].channel
        assert channel is not None, f"{name} is not running"
        return channel

    def credentialed(self, name: str) -> grpc.Channel:
        """``channel(name)``, presenting the service's operator or vendor-staff token on
        every unary call that carries no credential of its own."""
        return grpc.intercept_channel(self.channel(name), _DefaultCredential(self[name]))

    @property
    def vendor(self) -> apb_grpc.VendorServiceStub:
        return apb_grpc.VendorServiceStub(self.credentialed("activation"))

    @property
    def activation_service(self) -> apb_grpc.ActivationServiceStub:
        return apb_grpc.ActivationServiceStub(self.channel("activation"))

    @property
    def leases(self) -> lpb_grpc.LeaseServiceStub:
        return lpb_grpc.LeaseServiceStub(self.channel("license"))

    @property
    def lease_admin(self) -> lpb_grpc.LeaseAdminServiceStub:
        return lpb_grpc.LeaseAdminServiceStub(self.credentialed("license"))

    @property
    def trusted_storage(self) -> lpb_grpc.TrustedStorageServiceStub:
        return lpb_grpc.TrustedStorageServiceStub(self.credentialed("license"))

    @property
    def administrator(self) -> admin_pb2_grpc.AdministratorServiceStub:
        return admin_pb2_grpc.AdministratorServiceStub(self.credentialed("admin"))

    @property
    def license_address(self) -> str:
        return f"{self['license'].port}@127.0.0.1"

    # Licensing the site

    def sell(self, feature: str, seats: int) -> apb.Entitlement:
        reply = self.vendor.CreateEntitlement(
            apb.CreateEntitlementRequest(
                customer_organization="Attack Building Owner",
                contact="ops@example.com",
                lines=[
                    apb.NewEntitlementLine(
                        feature=feature, count=seats, kind=LicenseKind.LICENSE_KIND_NETWORK
                    )
                ],
            ),
            metadata=self["activation"].credentials(),
            timeout=30,
        )
        return reply.entitlement

    def activate(self, feature: str, seats: int) -> apb.Entitlement:
        """Sell ``seats`` of ``feature`` and activate them all onto the License Server."""
        order = self.sell(feature, seats)
        self.administrator.Activate(
            admin_pb2.ActivateRequest(
                license_server=self.license_address,
                activation_id=order.lines[0].activation_id,
                count=seats,
            ),
            metadata=self["admin"].credentials(),
            timeout=30,
        )
        return order


@dataclass(frozen=True)
class Volatile:
    """Columns that change by themselves or by design on a refusal, left out of a state."""

    tables: frozenset[str] = frozenset()
    columns: frozenset[tuple[str, str]] = frozenset()
    rows: Callable[[str, dict[str, Any]], bool] = field(default=lambda table, row: False)


def state_of(database: Path, volatile: Volatile = Volatile()) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table of a SQLite database (read-only), minus ``volatile``."""
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30)
    try:
        names = [
            row[0]
            for row in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        ]
        state: dict[str, list[tuple[Any, ...]]] = {}
        for name in sorted(names):
            if name in volatile.tables:
                continue
            cursor = connection.execute(f'SELECT * FROM "{name}"')
            columns = [d[0] for d in cursor.description]
            rows = []
            for values in cursor:
                row = dict(zip(columns, values, strict=True))
                if volatile.rows(name, row):
                    continue
                rows.append(
                    tuple(
                        (column, value)
                        for column, value in row.items()
                        if (name, column) not in volatile.columns
                    )
                )
            state[name] = sorted(rows, key=repr)
        return state
    finally:
        connection.close()


def changed_tables(
    before: Mapping[str, list[tuple[Any, ...]]], after: Mapping[str, list[tuple[Any, ...]]]
) -> set[str]:
    return {name for name in set(before) | set(after) if before.get(name) != after.get(name)}


def started_site(root: Path, ls_args: tuple[str, ...] = ()) -> Iterator[RealSite]:
    """A fixture body: a running RealSite, stopped afterwards."""
    site = RealSite(root, ls_args)
    try:
        site.start()
        yield site
    finally:
        site.close()


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo of a failed synchronous call, if the server attached one."""
    assert isinstance(error, grpc.Call)
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info
    return None


def reason_of(error: grpc.RpcError) -> str:
    """The ErrorInfo reason of a failed synchronous call, or ''."""
    info = error_info(error)
    return str(info.reason) if info is not None else ""
