"""Credentials and roles (tessera.server.auth), over real gRPC on loopback.

The three services run in this process on SQLite, configured with one credentials file
of digests (a token for each role). For every protected service: no credential and an
unknown token are UNAUTHENTICATED, a known token of another role is PERMISSION_DENIED,
the right role is served. Also: public methods stay public, servers keep only digests,
logs of refused and admitted calls carry no token, a site token guards leasing only when
configured, and a client certificate's common name (mutual TLS) maps to a role.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.activation_server import config as as_config
from services.activation_server import server as as_server
from services.administrator import config as admin_config
from services.administrator import server as admin_server
from services.license_server import config as ls_config
from services.license_server import errors as license_errors
from services.license_server import server as ls_server
from tessera.activation.v1 import activation_pb2 as apb
from tessera.activation.v1 import activation_pb2_grpc as apb_grpc
from tessera.admin.v1 import admin_pb2, admin_pb2_grpc
from tessera.auth import bearer_metadata
from tessera.license.v1 import license_pb2 as lpb
from tessera.license.v1 import license_pb2_grpc as lpb_grpc
from tessera.rpc import error_info, reason_of
from tessera.server.auth import (
    ACCESS,
    AccessControl,
    Credentials,
    Role,
    access_for,
    parse_credentials,
    token_digest,
)
from tessera.server.handlers import ServiceRegistrar

Code = grpc.StatusCode
TOKENS = {
    Role.VENDOR_STAFF: "cred-test-vendor-staff-7Qm2",
    Role.OPERATOR: "cred-test-operator-Zx81",
    Role.ADMINISTRATOR: "cred-test-administrator-Hn45",
    Role.CLIENT: "cred-test-site-token-Pw09",
}
UNKNOWN_TOKEN = "cred-test-nobody-knows-this-3Kd7"


@dataclass
class Trio:
    activation: as_server.ActivationServer
    license: ls_server.LicenseServer
    admin: admin_server.Administrator
    channels: list[grpc.aio.Channel]
    tmp_path: Path

    def channel(self, port: int) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.channels.append(channel)
        return channel

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()
        await self.admin.stop(0)
        await self.license.stop(0)
        await self.activation.stop(0)


def credentials_file(path: Path) -> Path:
    """One digest line per role: what an operator writes with `sha256sum`."""
    lines = ["# tessera credentials: sha256:<hex> ROLE NAME"]
    lines += [
        f"{token_digest(token)} {role.value} test-{role.value}" for role, token in TOKENS.items()
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def sqlite(tmp_path: Path, name: str) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / (name + '.db')}"


@pytest.fixture
async def trio(tmp_path: Path) -> AsyncIterator[Trio]:
    credentials = credentials_file(tmp_path / "credentials")
    activation = await as_server.build(
        as_config.load_settings(
            [
                "--listen", "127.0.0.1:0",
                "--data-dir", str(tmp_path / "as"),
                "--database-url", sqlite(tmp_path, "as"),
                "--credentials-file", str(credentials),
            ],
            environ={},
        )
    )  # fmt: skip
    license_server = await ls_server.build(
        ls_config.load_settings(
            [
                "--listen", "127.0.0.1:0",
                "--data-dir", str(tmp_path / "ls"),
                "--database-url", sqlite(tmp_path, "ls"),
                "--vendor-keys", str(tmp_path / "as" / "vendor-keys.pub"),
                "--machine-id", "credentials-machine",
                "--sweep-interval", "3600",
                "--credentials-file", str(credentials),
            ],
            environ={},
        )
    )  # fmt: skip
    admin = await admin_server.build(
        admin_config.load_settings(
            [
                "--listen", "127.0.0.1:0",
                "--data-dir", str(tmp_path / "admin"),
                "--database-url", sqlite(tmp_path, "admin"),
                "--activation-server", f"127.0.0.1:{activation.port}",
                "--credentials-file", str(credentials),
            ],
            # What the Administrator presents to License Servers, from a Secret.
            environ={"TESSERA_ADMIN_LICENSE_SERVER_TOKEN": TOKENS[Role.ADMINISTRATOR]},
        )
    )  # fmt: skip
    trio = Trio(activation, license_server, admin, [], tmp_path)
    yield trio
    await trio.close()


Call = Callable[[Trio, tuple[tuple[str, str], ...]], Awaitable[Any]]


def vendor_call(trio: Trio, metadata: tuple[tuple[str, str], ...]) -> Awaitable[Any]:
    stub = apb_grpc.VendorServiceStub(trio.channel(trio.activation.port))
    return stub.ListActivations(apb.ListActivationsRequest(), metadata=metadata)


def lease_admin_call(trio: Trio, metadata: tuple[tuple[str, str], ...]) -> Awaitable[Any]:
    stub = lpb_grpc.LeaseAdminServiceStub(trio.channel(trio.license.port))
    return stub.ListLeases(lpb.ListLeasesRequest(), metadata=metadata)


def trusted_storage_call(trio: Trio, metadata: tuple[tuple[str, str], ...]) -> Awaitable[Any]:
    stub = lpb_grpc.TrustedStorageServiceStub(trio.channel(trio.license.port))
    return stub.ListCertificates(lpb.ListCertificatesRequest(), metadata=metadata)


def leasing_call(trio: Trio, metadata: tuple[tuple[str, str], ...]) -> Awaitable[Any]:
    stub = lpb_grpc.LeaseServiceStub(trio.channel(trio.license.port))
    return stub.GetLicenseInformation(lpb.GetLicenseInformationRequest(), metadata=metadata)


def administrator_call(trio: Trio, metadata: tuple[tuple[str, str], ...]) -> Awaitable[Any]:
    stub = admin_pb2_grpc.AdministratorServiceStub(trio.channel(trio.admin.port))
    return stub.GetRegistration(admin_pb2.GetRegistrationRequest(), metadata=metadata)


# service -> (a call, the role that is served, a known role that is not)
PROTECTED: dict[str, tuple[Call, Role, Role]] = {
    "VendorService": (vendor_call, Role.VENDOR_STAFF, Role.OPERATOR),
    "LeaseAdminService": (lease_admin_call, Role.OPERATOR, Role.ADMINISTRATOR),
    "TrustedStorageService": (trusted_storage_call, Role.ADMINISTRATOR, Role.CLIENT),
    "LeaseService (site token set)": (leasing_call, Role.CLIENT, Role.VENDOR_STAFF),
    "AdministratorService": (administrator_call, Role.OPERATOR, Role.ADMINISTRATOR),
}


async def refused(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call
    return error.value


@pytest.mark.parametrize("service", list(PROTECTED))
async def test_every_protected_service_needs_a_credential_of_its_role(
    trio: Trio, service: str
) -> None:
    call, right, wrong = PROTECTED[service]

    missing = await refused(call(trio, ()))
    assert (missing.code(), reason_of(missing)) == (Code.UNAUTHENTICATED, "CREDENTIAL_MISSING")
    not_bearer = await refused(call(trio, (("authorization", f"Basic {TOKENS[right]}"),)))
    assert reason_of(not_bearer) == "CREDENTIAL_MISSING"

    unknown = await refused(call(trio, bearer_metadata(UNKNOWN_TOKEN)))
    assert (unknown.code(), reason_of(unknown)) == (Code.UNAUTHENTICATED, "CREDENTIAL_INVALID")

    other_role = await refused(call(trio, bearer_metadata(TOKENS[wrong])))
    assert (other_role.code(), reason_of(other_role)) == (
        Code.PERMISSION_DENIED,
        "ROLE_NOT_ALLOWED",
    )
    info = error_info(other_role)
    assert info is not None and info.metadata["role"] == wrong.value
    assert info.domain.startswith("tessera.")

    await call(trio, bearer_metadata(TOKENS[right]))  # served


async def test_the_operator_may_use_trusted_storage_and_leasing(trio: Trio) -> None:
    operator = bearer_metadata(TOKENS[Role.OPERATOR])
    await trusted_storage_call(trio, operator)
    await leasing_call(trio, operator)
    await leasing_call(trio, bearer_metadata(TOKENS[Role.ADMINISTRATOR]))


async def test_public_methods_need_no_credential(trio: Trio) -> None:
    activation = apb_grpc.ActivationServiceStub(trio.channel(trio.activation.port))
    keys = await activation.GetVendorKeys(apb.GetVendorKeysRequest())
    assert keys.keys
    storage = lpb_grpc.TrustedStorageServiceStub(trio.channel(trio.license.port))
    identity = await storage.GetHostIdentity(lpb.GetHostIdentityRequest())
    assert identity.host_id == trio.license.identity.host_id


async def test_the_lease_stream_is_refused_without_the_site_token(trio: Trio) -> None:
    leases = lpb_grpc.LeaseServiceStub(trio.channel(trio.license.port))
    acquire = lpb.LeaseRequest(
        acquire=lpb.LeaseAcquire(feature="client.station", count=1, client_host="ws-01")
    )
    stream = leases.Lease()
    await stream.write(acquire)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stream.read()
    assert (error.value.code(), reason_of(error.value)) == (
        Code.UNAUTHENTICATED,
        "CREDENTIAL_MISSING",
    )
    # With the site token the stream is served (and refused for want of a license).
    stream = leases.Lease(metadata=bearer_metadata(TOKENS[Role.CLIENT]))
    await stream.write(acquire)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        while True:
            await stream.read()
    assert reason_of(error.value) == "FEATURE_NOT_LICENSED"


async def test_leasing_is_open_without_a_site_token(tmp_path: Path) -> None:
    server = await ls_server.build(
        ls_config.load_settings(
            [
                "--listen", "127.0.0.1:0",
                "--data-dir", str(tmp_path / "ls"),
                "--database-url", sqlite(tmp_path, "ls"),
                "--machine-id", "open-machine",
                "--sweep-interval", "3600",
            ],
            environ={},
        )
    )  # fmt: skip
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            await lpb_grpc.LeaseServiceStub(channel).GetLicenseInformation(
                lpb.GetLicenseInformationRequest()
            )
            storage = lpb_grpc.TrustedStorageServiceStub(channel)
            refusal = await refused(storage.ListCertificates(lpb.ListCertificatesRequest()))
            assert reason_of(refusal) == "CREDENTIAL_MISSING"
            # The data directory's tokens (what the client tools read) are admitted.
            for name in ("operator-token", "administrator-token"):
                token = (tmp_path / "ls" / name).read_text().strip()
                await storage.ListCertificates(
                    lpb.ListCertificatesRequest(), metadata=bearer_metadata(token)
                )
    finally:
        await server.stop(0)


async def test_the_administrator_presents_its_own_credential_to_license_servers(
    trio: Trio, tmp_path: Path
) -> None:
    operator = bearer_metadata(TOKENS[Role.OPERATOR])
    address = f"{trio.license.port}@127.0.0.1"
    admin = admin_pb2_grpc.AdministratorServiceStub(trio.channel(trio.admin.port))
    listed = await admin.ListLicenses(
        admin_pb2.ListLicensesRequest(license_server=address), metadata=operator
    )
    assert listed.host_id == trio.license.identity.host_id

    # An Administrator holding a token the License Server does not know is refused by
    # it, and the refusal reaches the operator with the License Server named.
    stranger = await admin_server.build(
        admin_config.load_settings(
            [
                "--listen", "127.0.0.1:0",
                "--data-dir", str(tmp_path / "stranger"),
                "--database-url", sqlite(tmp_path, "stranger"),
                "--activation-server", f"127.0.0.1:{trio.activation.port}",
                "--operator-token-sha256", token_digest(TOKENS[Role.OPERATOR]),
                "--license-server-token-file", str(tmp_path / "no-such-file"),
            ],
            environ={},
        )
    )  # fmt: skip
    try:
        stub = admin_pb2_grpc.AdministratorServiceStub(trio.channel(stranger.port))
        refusal = await refused(
            stub.ListLicenses(
                admin_pb2.ListLicensesRequest(license_server=address), metadata=operator
            )
        )
        info = error_info(refusal)
        assert refusal.code() == Code.UNAUTHENTICATED
        assert info is not None and info.reason == "CREDENTIAL_MISSING"
        assert info.metadata["peer"] == "License Server"
    finally:
        await stranger.stop(0)


async def test_servers_keep_digests_only(tmp_path: Path) -> None:
    token = "plain-operator-token-for-digest-test-9Vb"
    settings = ls_config.load_settings(
        [
            "--data-dir", str(tmp_path / "ls"),
            "--operator-token", token,
            "--administrator-token-sha256", token_digest("some-administrator-token"),
        ],
        environ={"TESSERA_LS_SITE_TOKEN_SHA256": token_digest("some-site-token")},
    )  # fmt: skip
    assert token not in repr(settings)  # hashed as soon as it was read
    assert "some-administrator-token" not in repr(settings)
    credentials = settings.credentials.with_token_files(tmp_path / "ls")
    assert credentials.by_token(token) == credentials.by_token(token)
    assert credentials.by_token(token) is not None
    assert credentials.by_token("some-site-token") is not None
    # Every role was given: no token file is made in the data directory.
    assert not (tmp_path / "ls").exists()

    file = credentials_file(tmp_path / "credentials")
    text = file.read_text()
    assert not any(token in text for token in TOKENS.values())
    with pytest.raises(ValueError, match="never a token itself"):
        parse_credentials(f"{TOKENS[Role.OPERATOR]} operator someone")
    with pytest.raises(ValueError, match="unknown role"):
        parse_credentials(f"{token_digest('x')} superuser someone")


def test_a_bad_digest_flag_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        admin_config.load_settings(
            ["--data-dir", str(tmp_path), "--operator-token-sha256", "not-hex"], environ={}
        )


async def test_logs_of_refused_and_admitted_calls_carry_no_token(
    trio: Trio, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for role, token in TOKENS.items():
        metadata = bearer_metadata(token)
        for call, right, _ in PROTECTED.values():
            try:
                await call(trio, metadata)
            except grpc.aio.AioRpcError as error:
                assert right is not role or error.code() not in (
                    Code.UNAUTHENTICATED,
                    Code.PERMISSION_DENIED,
                )
    await refused(administrator_call(trio, bearer_metadata(UNKNOWN_TOKEN)))
    await refused(administrator_call(trio, ()))
    text = caplog.text
    assert "refused /tessera.admin.v1.AdministratorService/GetRegistration" in text
    assert "CREDENTIAL_INVALID" in text and "ROLE_NOT_ALLOWED" in text
    assert "admitted for test-operator" in text
    for secret in (*TOKENS.values(), UNKNOWN_TOKEN):
        assert secret not in text
        assert token_digest(secret) not in text


def test_one_table_covers_every_service_the_servers_register() -> None:
    registered = [*as_server.SERVICE_NAMES, *ls_server.SERVICE_NAMES, *admin_server.SERVICE_NAMES]
    assert sorted(registered) == sorted(ACCESS)
    descriptors = {
        name: service
        for module in (apb, lpb, admin_pb2)
        for name, service in ((s.full_name, s) for s in module.DESCRIPTOR.services_by_name.values())
    }
    for service, rules in ACCESS.items():
        methods = {method.name for method in descriptors[service].methods}
        assert set(rules) - {"*"} <= methods, service
        for method in methods:
            assert access_for(f"/{service}/{method}") is not None
    assert access_for("/grpc.health.v1.Health/Check") is not None
    assert access_for("/tessera.unknown.v1.Secret/Do") is None


# Mutual TLS: a client certificate's common name is a credential.


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["/usr/bin/openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certificates(directory: Path) -> None:
    """A CA, a server certificate for 127.0.0.1, and client certificates by name."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
            "-subj", "/CN=tessera-test-ca", cwd=directory)  # fmt: skip
    (directory / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    (directory / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name, ext in (
        ("server", "server.ext"),
        ("ops-console", "client.ext"),
        ("ws-client", "client.ext"),
        ("stranger", "client.ext"),
    ):
        subject = f"/CN={'localhost' if name == 'server' else name}"
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", subject, cwd=directory)  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "1", "-extfile", ext,
                cwd=directory)  # fmt: skip


class LeaseAdmin(lpb_grpc.LeaseAdminServiceServicer):
    async def ListLeases(
        self, request: lpb.ListLeasesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> lpb.ListLeasesResponse:
        return lpb.ListLeasesResponse()


async def test_a_client_certificate_common_name_maps_to_a_role(tmp_path: Path) -> None:
    make_certificates(tmp_path)
    read = lambda name: (tmp_path / name).read_bytes()  # noqa: E731
    credentials = parse_credentials(
        "x509:ops-console operator ops-console\nx509:ws-client client ws\n"
    ).merged(Credentials().with_token(TOKENS[Role.OPERATOR], Role.OPERATOR, "ops-token"))
    server = grpc.aio.server()
    ServiceRegistrar(server, [AccessControl(credentials, license_errors.ERRORS)]).add_servicer(
        lpb_grpc.add_LeaseAdminServiceServicer_to_server, LeaseAdmin()
    )
    port = server.add_secure_port(
        "127.0.0.1:0",
        grpc.ssl_server_credentials(
            [(read("server.key"), read("server.pem"))],
            root_certificates=read("ca.pem"),
            # Verified client certificates only: an unverified one would name anyone.
            require_client_auth=True,
        ),
    )
    await server.start()

    def channel(name: str) -> grpc.aio.Channel:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=read("ca.pem"),
            private_key=read(f"{name}.key"),
            certificate_chain=read(f"{name}.pem"),
        )
        return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials)

    async def list_leases(name: str, metadata: Any = ()) -> lpb.ListLeasesResponse:
        async with channel(name) as opened:
            stub = lpb_grpc.LeaseAdminServiceStub(opened)
            return await stub.ListLeases(lpb.ListLeasesRequest(), metadata=metadata)

    try:
        await list_leases("ops-console")  # operator by certificate
        denied = await refused(list_leases("ws-client"))
        assert (denied.code(), reason_of(denied)) == (Code.PERMISSION_DENIED, "ROLE_NOT_ALLOWED")
        unknown = await refused(list_leases("stranger"))
        assert (unknown.code(), reason_of(unknown)) == (Code.UNAUTHENTICATED, "CREDENTIAL_INVALID")
        # A bearer token works over TLS too, and is judged before the certificate.
        await list_leases("stranger", bearer_metadata(TOKENS[Role.OPERATOR]))
        wrong = await refused(list_leases("ops-console", bearer_metadata(UNKNOWN_TOKEN)))
        assert reason_of(wrong) == "CREDENTIAL_INVALID"
    finally:
        await server.stop(0)
