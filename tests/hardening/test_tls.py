"""Transport security and key files: TLS and mutual TLS on every service, clients that
dial them, plaintext kept to loopback, and secret files others can read refused.

Certificates are made here with the openssl command: a throwaway CA, a server
certificate for 127.0.0.1/localhost, a client certificate, and a second CA with a client
certificate of its own (a stranger's). Every byte of traffic stays on 127.0.0.1; 0.0.0.0
appears only in settings that must be refused before anything listens.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from clients import ClientTls, LicenseClient, LicenseServerUnreachable
from services.administrator.config import load_settings as admin_settings
from services.administrator.peers import ActivationServerClient, LicenseServerClient
from services.license_server.config import load_settings as license_settings
from tessera.admin.v1 import admin_pb2, admin_pb2_grpc
from tessera.auth import bearer_metadata
from tessera.errors import PeerUnavailable
from tessera.ids import ENTITLEMENT_PREFIX, new_id
from tessera.keys import InsecureKeyFile, UnreadableKeyFile, read_private_file
from tessera.server.auth import load_or_create_token
from tessera.server.serving import Endpoint, is_serving
from tessera.server.tls import PlaintextRefused, ServerTls, check_plaintext, is_loopback
from tessera.tls import open_channel, open_sync_channel
from tessera_cli.app import App
from tessera_cli.failures import UsageError
from tessera_cli.settings import Flags, resolve
from tests.support.processes import ROOT, Processes, free_port
from tests.support.tokens import OPERATOR_TOKEN

OPENSSL = "/usr/bin/openssl"


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    # A client certificate signed by another CA.
    stranger_cert: Path
    stranger_key: Path

    @property
    def server(self) -> ServerTls:
        return ServerTls(self.server_cert, self.server_key)

    @property
    def mutual(self) -> ServerTls:
        return ServerTls(self.server_cert, self.server_key, client_ca=self.ca)

    @property
    def client(self) -> ClientTls:
        return ClientTls(ca=self.ca, cert=self.client_cert, key=self.client_key)

    @property
    def anonymous(self) -> ClientTls:
        return ClientTls(ca=self.ca)

    @property
    def stranger(self) -> ClientTls:
        return ClientTls(ca=self.ca, cert=self.stranger_cert, key=self.stranger_key)


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True)


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
        "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    return cert, key


def make_leaf(
    directory: Path, name: str, ca: tuple[Path, Path], extensions: str
) -> tuple[Path, Path]:
    key, csr, cert = (directory / f"{name}{suffix}" for suffix in (".key", ".csr", ".pem"))
    ext = directory / f"{name}.ext"
    ext.write_text(extensions)
    openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}",
        cwd=directory,
    )  # fmt: skip
    openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
        "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext),
        cwd=directory,
    )  # fmt: skip
    key.chmod(0o600)
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = make_ca(directory, "tessera-test-ca")
    other_ca = make_ca(directory, "another-ca")
    server = make_leaf(
        directory,
        "server",
        ca,
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    client = make_leaf(directory, "client", ca, "extendedKeyUsage=clientAuth\n")
    stranger = make_leaf(directory, "stranger", other_ca, "extendedKeyUsage=clientAuth\n")
    return Pki(ca[0], *server, *client, *stranger)


async def serving_endpoint(tls: ServerTls | None) -> tuple[Endpoint, str]:
    """An in-process endpoint (health and reflection only) on 127.0.0.1."""
    endpoint = Endpoint(["tessera.test.v1.Nothing"], error_domain="tessera.test")
    port = endpoint.bind("127.0.0.1:0", tls)
    await endpoint.start()
    return endpoint, f"127.0.0.1:{port}"


# -- the server side -------------------------------------------------------------------------


async def test_a_tls_server_refuses_a_plaintext_client_and_answers_a_tls_one(pki: Pki) -> None:
    endpoint, target = await serving_endpoint(pki.server)
    try:
        assert not await is_serving(target)
        assert await is_serving(target, tls=pki.anonymous)
        # A client that trusts another CA does not accept the server.
        assert not await is_serving(target, tls=ClientTls(ca=pki.stranger_cert))
    finally:
        await endpoint.stop(0)


async def test_mutual_tls_refuses_clients_without_a_certificate_of_its_ca(pki: Pki) -> None:
    endpoint, target = await serving_endpoint(pki.mutual)
    try:
        assert await is_serving(target, tls=pki.client)
        assert not await is_serving(target, tls=pki.anonymous)
        assert not await is_serving(target, tls=pki.stranger)
        assert not await is_serving(target)
    finally:
        await endpoint.stop(0)


def _sync_health(target: str, tls: ClientTls | None) -> bool:
    with open_sync_channel(target, tls) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        try:
            reply = check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


async def test_the_check_in_at_exit_dials_with_the_clients_tls(pki: Pki) -> None:
    """The atexit check-in has no event loop: its synchronous channel (a lease's exit
    record keeps the client's TLS) reaches a mutual-TLS License Server, where a plaintext
    one would not."""
    endpoint, target = await serving_endpoint(pki.mutual)
    try:
        assert await asyncio.to_thread(_sync_health, target, pki.client)
        assert not await asyncio.to_thread(_sync_health, target, None)
    finally:
        await endpoint.stop(0)


def test_plaintext_is_allowed_on_loopback_only(caplog: pytest.LogCaptureFixture) -> None:
    for listen in ("127.0.0.1:27000", "localhost:27000", "[::1]:27000", "127.0.0.5:1"):
        assert is_loopback(listen), listen
        check_plaintext(listen, None, allow_plaintext=False)
    for listen in ("0.0.0.0:27000", "[::]:27000", ":27000", "10.0.0.5:27000", "es-host:27000"):
        assert not is_loopback(listen), listen
        with pytest.raises(PlaintextRefused, match="--allow-plaintext"):
            check_plaintext(listen, None, allow_plaintext=False)
    check_plaintext("0.0.0.0:27000", ServerTls(Path("c"), Path("k")), allow_plaintext=False)
    with caplog.at_level(logging.WARNING, logger="tessera.server.tls"):
        check_plaintext("0.0.0.0:27000", None, allow_plaintext=True)
    assert "PLAINTEXT" in caplog.text


def test_settings_refuse_plaintext_off_loopback_unless_allowed(pki: Pki) -> None:
    with pytest.raises(SystemExit):
        license_settings(["--listen", "0.0.0.0:27000"], environ={})
    allowed = license_settings(["--listen", "0.0.0.0:27000", "--allow-plaintext"], environ={})
    assert allowed.common.allow_plaintext and allowed.common.tls is None
    by_env = license_settings(
        ["--listen", "0.0.0.0:27000"], environ={"TESSERA_LS_ALLOW_PLAINTEXT": "true"}
    )
    assert by_env.common.allow_plaintext
    tls = license_settings(
        [],
        environ={
            "TESSERA_LS_LISTEN": "0.0.0.0:27000",
            "TESSERA_LS_TLS_CERT": str(pki.server_cert),
            "TESSERA_LS_TLS_KEY": str(pki.server_key),
            "TESSERA_LS_TLS_CLIENT_CA": str(pki.ca),
        },
    )
    assert tls.common.tls == pki.mutual and tls.common.transport == "mutual TLS"
    with pytest.raises(SystemExit):  # a certificate without its key
        license_settings(["--tls-cert", str(pki.server_cert)], environ={})
    with pytest.raises(SystemExit):  # a client certificate without its key
        admin_settings(["--activation-server-tls-cert", str(pki.client_cert)], environ={})


def test_the_plaintext_refusal_stops_the_process_with_the_reason(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "services.license_server", "--listen", "0.0.0.0:27000"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "TESSERA_LS_DATA_DIR": str(tmp_path)},
    )
    assert run.returncode == 2
    assert "refusing to serve plaintext gRPC on 0.0.0.0:27000" in run.stderr
    assert "--tls-cert" in run.stderr and "--allow-plaintext" in run.stderr


# -- key and token files ---------------------------------------------------------------------


def test_token_files_are_made_0600_and_refused_when_others_can_read_them(tmp_path: Path) -> None:
    path = tmp_path / "operator-token"
    token, created = load_or_create_token(path)
    assert created and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_token(path) == (token, False)
    path.chmod(0o644)
    with pytest.raises(InsecureKeyFile, match=f"chmod 600 {path}"):
        load_or_create_token(path)


def test_an_empty_token_file_is_refused_not_taken_as_an_empty_token(tmp_path: Path) -> None:
    """A token file left empty (by a crash of an older version mid-write) must not make
    the empty string a credential: the service refuses to start with the way out."""
    path = tmp_path / "operator-token"
    path.write_text("\n")
    path.chmod(0o600)
    with pytest.raises(UnreadableKeyFile, match="holds no token"):
        load_or_create_token(path)


def test_a_tls_key_others_can_read_is_refused(pki: Pki, tmp_path: Path) -> None:
    loose = tmp_path / "server.key"
    loose.write_bytes(read_private_file(pki.server_key))
    loose.chmod(0o640)
    with pytest.raises(InsecureKeyFile, match="chmod 600"):
        ServerTls(pki.server_cert, loose).credentials()
    with pytest.raises(InsecureKeyFile):
        open_channel("127.0.0.1:1", ClientTls(ca=pki.ca, cert=pki.client_cert, key=loose))


async def test_services_refuse_to_start_with_a_key_or_token_file_others_can_read(
    pki: Pki, tmp_path: Path
) -> None:
    loose_key = tmp_path / "tls.key"
    loose_key.write_bytes(read_private_file(pki.server_key))
    loose_key.chmod(0o644)
    vendor_data = tmp_path / "vendor"
    vendor_data.mkdir()
    (vendor_data / "vendor-token").write_text("a-token\n")
    (vendor_data / "vendor-token").chmod(0o604)
    processes = Processes(tmp_path)
    try:
        processes.start(
            "license",
            "services.license_server",
            "--listen", f"127.0.0.1:{free_port()}",
            "--data-dir", str(tmp_path / "license"),
            "--tls-cert", str(pki.server_cert),
            "--tls-key", str(loose_key),
        )  # fmt: skip
        processes.start(
            "activation",
            "services.activation_server",
            "--listen", f"127.0.0.1:{free_port()}",
            "--data-dir", str(vendor_data),
        )  # fmt: skip
        processes.start(
            "admin",
            "services.administrator",
            "--listen", f"127.0.0.1:{free_port()}",
            "--data-dir", str(tmp_path / "admin"),
            "--license-server-tls-cert", str(pki.client_cert),
            "--license-server-tls-key", str(loose_key),
        )  # fmt: skip
        statuses = await asyncio.gather(
            *(processes.wait_exit(name) for name in ("license", "activation", "admin"))
        )
    finally:
        processes.kill_all()
    assert statuses == [2, 2, 2]
    # Refused before anything was made: no database, no host key.
    assert not (tmp_path / "license").exists()
    assert not (tmp_path / "admin").exists()
    assert f"(run: chmod 600 {loose_key})" in processes.log("admin")
    license_log, activation_log = processes.log("license"), processes.log("activation")
    assert f"refusing to start: {loose_key} has mode -rw-r--r--" in license_log
    assert f"(run: chmod 600 {loose_key})" in license_log
    assert "Traceback" not in license_log
    token = vendor_data / "vendor-token"
    assert f"{token} has mode -rw----r--; a token file must be 0600" in activation_log
    assert f"(run: chmod 600 {token})" in activation_log


# -- the whole system over mutual TLS --------------------------------------------------------


async def test_clients_cli_and_administrator_reach_mutual_tls_services(
    pki: Pki, tmp_path: Path
) -> None:
    ports = {name: free_port() for name in ("activation", "license", "admin")}
    server_tls = [
        "--tls-cert", str(pki.server_cert),
        "--tls-key", str(pki.server_key),
        "--tls-client-ca", str(pki.ca),
    ]  # fmt: skip
    processes = Processes(tmp_path)
    try:
        processes.start(
            "activation",
            "services.activation_server",
            "--listen", f"127.0.0.1:{ports['activation']}",
            "--data-dir", str(tmp_path / "activation"),
            *server_tls,
        )  # fmt: skip
        processes.start(
            "license",
            "services.license_server",
            "--listen", f"127.0.0.1:{ports['license']}",
            "--data-dir", str(tmp_path / "license"),
            "--machine-id", "tls-test",
            *server_tls,
        )  # fmt: skip
        # How the Administrator dials its peers, by environment this time.
        peer_env = {
            f"TESSERA_ADMIN_{peer}_TLS_{part}": str(path)
            for peer in ("ACTIVATION_SERVER", "LICENSE_SERVER")
            for part, path in (("CA", pki.ca), ("CERT", pki.client_cert), ("KEY", pki.client_key))
        }
        processes.start(
            "admin",
            "services.administrator",
            "--listen", f"127.0.0.1:{ports['admin']}",
            "--data-dir", str(tmp_path / "admin"),
            "--activation-server", f"127.0.0.1:{ports['activation']}",
            *server_tls,
            env=peer_env,
        )  # fmt: skip
        await asyncio.gather(
            *(processes.wait_serving(name, port, tls=pki.client) for name, port in ports.items())
        )
        for name in ports:
            assert ", mutual TLS (" in processes.log(name)
        license_address = f"{ports['license']}@127.0.0.1"

        # The client library, with and without its certificate.
        async with LicenseClient(license_address, tls=pki.client) as client:
            assert await client.license_information() == []
        async with LicenseClient(license_address, tls=pki.anonymous) as client:
            with pytest.raises(LicenseServerUnreachable):
                await client.license_information()
        async with LicenseClient(license_address) as client:
            with pytest.raises(LicenseServerUnreachable):
                await client.license_information()

        # The Administrator reaches both peers over mutual TLS.
        operator = bearer_metadata(OPERATOR_TOKEN)  # tests.processes gives it the Administrator
        async with open_channel(f"127.0.0.1:{ports['admin']}", pki.client) as channel:
            admin = admin_pb2_grpc.AdministratorServiceStub(channel)
            listed = await admin.ListLicenses(
                admin_pb2.ListLicensesRequest(license_server=license_address),
                timeout=10,
                metadata=operator,
            )
            assert listed.host_id
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await admin.GetOrder(
                    admin_pb2.GetOrderRequest(entitlement_id=new_id(ENTITLEMENT_PREFIX)),
                    timeout=10,
                    metadata=operator,
                )
            # The vendor's own answer about an order it does not know, not "unreachable".
            assert refused.value.code() is grpc.StatusCode.NOT_FOUND

        # ... and a peer client without a certificate, or with a stranger's, does not.
        for tls in (None, pki.anonymous, pki.stranger):
            vendor = ActivationServerClient(f"127.0.0.1:{ports['activation']}", tls)
            try:
                with pytest.raises(PeerUnavailable):
                    await vendor.get_order(new_id(ENTITLEMENT_PREFIX))
            finally:
                await vendor.close()
            with pytest.raises(PeerUnavailable):
                await LicenseServerClient.connect(license_address, tls)

        # The CLI, every service over mutual TLS.
        where = [
            "--administrator", f"127.0.0.1:{ports['admin']}",
            "--license-server", license_address,
            "--activation-server", f"127.0.0.1:{ports['activation']}",
            "--operator-token-file", str(tmp_path / "license" / "operator-token"),
        ]  # fmt: skip
        tls_flags = [
            "--tls-ca", str(pki.ca),
            "--tls-cert", str(pki.client_cert),
            "--tls-key", str(pki.client_key),
        ]  # fmt: skip
        code, out = await run_cli(["--json", *where, *tls_flags, "status", "--vendor"], tmp_path)
        assert code == 0, out
        assert [check["state"] for check in json.loads(out)["services"]] == ["serving"] * 3
        code, out = await run_cli(["--json", *where, *tls_flags, "licenses"], tmp_path)
        assert code == 0, out
        code, out = await run_cli(["--json", *where, "--tls-ca", str(pki.ca), "status"], tmp_path)
        assert code == 3, out
        code, out = await run_cli(["--json", *where, "status"], tmp_path)
        assert code == 3, out
    finally:
        processes.kill_all()


async def run_cli(argv: list[str], cwd: Path) -> tuple[int, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    app = App(environ={}, cwd=cwd, stdout=stdout, stderr=stderr, home=cwd)
    code = await app.run(argv)
    return code, stdout.getvalue() + stderr.getvalue()


def test_cli_tls_settings_come_from_flags_environment_or_config(tmp_path: Path) -> None:
    assert resolve(Flags(), {}, tmp_path, tmp_path).tls is None
    by_flag = resolve(Flags(tls_ca="ca.pem"), {"TESSERA_TLS_CA": "/elsewhere"}, tmp_path, tmp_path)
    assert by_flag.tls == ClientTls(ca=tmp_path / "ca.pem")
    assert by_flag.tls_source == "flag --tls-ca"
    by_env = resolve(Flags(), {"TESSERA_TLS": "true"}, tmp_path, tmp_path)
    assert by_env.tls == ClientTls() and by_env.tls_source == "env TESSERA_TLS"
    config = tmp_path / "etc" / "cli.toml"
    config.parent.mkdir()
    config.write_text(
        'tls_ca = "ca.pem"\ntls_cert = "me.pem"\ntls_key = "me.key"\ntls_server_name = "es-host"\n'
    )
    by_config = resolve(Flags(config=str(config)), {}, tmp_path, tmp_path)
    etc = config.parent
    assert by_config.tls == ClientTls(etc / "ca.pem", etc / "me.pem", etc / "me.key", "es-host")
    with pytest.raises(UsageError, match="TLS"):
        resolve(Flags(tls_cert="me.pem"), {}, tmp_path, tmp_path)
    code, out = asyncio.run(
        run_cli(["config", "--json", "--tls-ca", "ca.pem", "--tls-cert", "c", "--tls-key", "k"],
                tmp_path)
    )  # fmt: skip
    assert code == 0
    shown = json.loads(out)["settings"]["tls"]
    assert shown["value"].startswith("mutual TLS: CA ") and "flag --tls-ca" in shown["source"]
