"""What every service's serving plumbing promises (``tessera.server.serving``): a port of its own,
never shared; one line and exit 2 for every refusal to start; server reflection as both
``grpc.reflection.v1`` and ``v1alpha``.

The start-up refusals run the services as real processes on loopback, against real
sockets holding their ports.
"""

from __future__ import annotations

import asyncio
import importlib.util
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2

from services.activation_server.server import SERVICE_NAMES as ACTIVATION_SERVICES
from services.administrator.server import SERVICE_NAMES as ADMINISTRATOR_SERVICES
from services.license_server.server import SERVICE_NAMES as LICENSE_SERVICES
from tessera.license.v1 import license_pb2, license_pb2_grpc
from tessera.rpc import reason_of
from tessera.server.serving import Endpoint, ListenRefused, listen_problem
from tests.support.in_process_site import Site
from tests.support.processes import ROOT, Processes, free_port

SERVICES = {
    "license_server": "another License Server or FlexNet's lmgrd?",
    "administrator": "another Administrator?",
    "activation_server": "another Activation Server?",
}


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port another program listens on (a plain socket, as lmgrd's would be)."""
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


def run_service(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m services.<module> args`` to its end (a service that starts instead of
    refusing runs into the timeout and fails the test)."""
    return subprocess.run(
        [sys.executable, "-m", f"services.{module}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def only_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, f"a refusal to start is one line, not:\n{stderr}"
    return lines[0]


# -- a port in use --------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--listen", "--metrics-listen"])
@pytest.mark.parametrize("service", list(SERVICES))
def test_a_port_another_program_holds_ends_start_up_in_one_line(
    tmp_path: Path, held_port: int, service: str, flag: str
) -> None:
    """Exit 2 and one line naming the port, the likely holder and the way out, before
    the service makes anything (no data directory, key or database)."""
    data_dir = tmp_path / "data"
    listen = f"127.0.0.1:{held_port}" if flag == "--listen" else f"127.0.0.1:{free_port()}"
    args = ["--listen", listen, "--data-dir", str(data_dir)]
    if flag == "--metrics-listen":
        args += ["--metrics-listen", f"127.0.0.1:{held_port}"]
    done = run_service(service, *args)
    assert done.returncode == 2, done.stderr
    line = only_line(done.stderr)
    holder = SERVICES[service] if flag == "--listen" else "another service or exporter?"
    assert line.endswith(
        f"ERROR tessera.server.serving: refusing to start: port {held_port} is in use ({holder}); "
        f"choose {flag}"
    ), line
    assert "Traceback" not in done.stderr + done.stdout
    assert not data_dir.exists()


async def test_a_second_license_server_on_the_same_port_is_refused(
    tmp_path: Path, processes: Processes
) -> None:
    """gRPC's default SO_REUSEPORT let a second License Server start silently on the
    first one's port, the kernel splitting clients between two trusted storages. The
    second is refused in one line; every client still reaches the first."""
    port = free_port()
    listen = f"127.0.0.1:{port}"
    processes.start(
        "first", "services.license_server", "--listen", listen, "--data-dir", str(tmp_path / "a")
    )
    await processes.wait_serving("first", port)

    second = await asyncio.to_thread(
        run_service, "license_server", "--listen", listen, "--data-dir", str(tmp_path / "b")
    )
    assert second.returncode == 2, second.stderr
    assert only_line(second.stderr).endswith(
        f"refusing to start: port {port} is in use "
        "(another License Server or FlexNet's lmgrd?); choose --listen"
    )
    assert not (tmp_path / "b").exists()

    host_ids = set()
    for _ in range(20):  # new connections: with a shared port some would reach the second
        async with grpc.aio.insecure_channel(listen) as channel:
            identity = await license_pb2_grpc.TrustedStorageServiceStub(channel).GetHostIdentity(
                license_pb2.GetHostIdentityRequest(), timeout=10
            )
            host_ids.add(identity.host_id)
    assert len(host_ids) == 1


async def test_the_bind_itself_shares_no_port() -> None:
    """Without the start-up probe (a service built in-process, or a port taken while it
    started): an Endpoint's bind refuses a port a gRPC server holds with gRPC's default
    SO_REUSEPORT (as Tessera did), and a gRPC server with that default cannot join an
    Endpoint's port."""
    sharing = grpc.aio.server()  # SO_REUSEPORT on: gRPC's default
    port = sharing.add_insecure_port("127.0.0.1:0")
    await sharing.start()
    endpoint = Endpoint(["tessera.test.v1.Nothing"], error_domain="tessera.test")
    try:
        with pytest.raises(ListenRefused, match=f"^port {port} is in use .*; choose --listen$"):
            endpoint.bind(f"127.0.0.1:{port}")
    finally:
        await sharing.stop(0)

    own = endpoint.bind("127.0.0.1:0")
    await endpoint.start()
    try:
        with pytest.raises(RuntimeError, match="Failed to bind"):
            grpc.aio.server().add_insecure_port(f"127.0.0.1:{own}")
        assert listen_problem(f"127.0.0.1:{own}") == "in use"
    finally:
        await endpoint.stop(0)
    assert listen_problem(f"127.0.0.1:{own}") == ""  # free again once stopped


async def test_a_metrics_port_in_use_is_refused_by_the_endpoint(held_port: int) -> None:
    endpoint = Endpoint(["tessera.test.v1.Nothing"], error_domain="tessera.test")
    endpoint.bind("127.0.0.1:0")
    try:
        with pytest.raises(ListenRefused, match=f"^port {held_port} is in use .*metrics-listen$"):
            await endpoint.start(f"127.0.0.1:{held_port}")
    finally:
        await endpoint.stop(0)


def test_an_address_that_is_not_this_hosts_is_one_line_too(tmp_path: Path) -> None:
    # 192.0.2.0/24 is TEST-NET-1: never an address of this machine.
    done = run_service(
        "activation_server",
        "--listen", "192.0.2.1:27100", "--allow-plaintext", "--data-dir", str(tmp_path / "d"),
    )  # fmt: skip
    assert done.returncode == 2
    assert only_line(done.stderr).endswith(
        "refusing to start: cannot listen on 192.0.2.1:27100: Cannot assign requested "
        "address; choose --listen"
    )


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--listen", "27000"], "--listen: '27000' is not HOST:PORT"),
        (["--shutdown-grace", "soon"], "--shutdown-grace: 'soon' is not a number"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_a_setting_refused_at_start_up_is_one_line(args: list[str], words: str) -> None:
    """Not argparse's usage of every option before it: the service, what is wrong, and
    where help is."""
    done = run_service("administrator", *args)
    assert done.returncode == 2
    assert only_line(done.stderr) == (
        f"python -m services.administrator: {words} (--help lists the options)"
    )


def test_a_database_or_data_directory_it_cannot_use_is_one_line(tmp_path: Path) -> None:
    """No traceback for what the machine or the configuration is to blame for: a
    database URL it cannot use (refused with the settings, its password not shown), a
    database server that is not there, a data directory that cannot be made."""
    (tmp_path / "file").write_text("")
    listen = ["--listen", "127.0.0.1:0"]
    cases = [
        (
            ["--database-url", "nonsense://", "--data-dir", str(tmp_path / "a")],
            "python -m services.license_server: --database-url: not a database URL Tessera "
            "can use; write sqlite+aiosqlite:///PATH or postgresql+asyncpg://USER@HOST/DATABASE "
            "(--help lists the options)",
        ),
        (
            [
                "--database-url",
                "postgresql://site:hunter2@db/ls",
                "--data-dir",
                str(tmp_path / "b"),
            ],
            "python -m services.license_server: --database-url: postgresql://site:***@db/ls "
            "names a driver without asyncio; write sqlite+aiosqlite:// or postgresql+asyncpg:// "
            "(--help lists the options)",
        ),
        (
            ["--data-dir", str(tmp_path / "file" / "data")],
            f"ERROR tessera.server.serving: cannot start: {tmp_path / 'file' / 'data'}: Not a "
            "directory; check --data-dir (and the other paths given) and who may write there",
        ),
    ]
    for args, expected in cases:
        done = run_service("license_server", *listen, *args)
        assert done.returncode == 2, done.stderr
        assert only_line(done.stderr).endswith(expected)
        assert "hunter2" not in done.stderr

    # No database server on that port: the Administrator says so (its token file, made
    # before it reached for the database, is a warning line before).
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/admin"
    done = run_service(
        "administrator", *listen, "--database-url", url, "--data-dir", str(tmp_path / "c")
    )
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1].endswith(
        "ERROR tessera.server.serving: cannot start: the database cannot be reached "
        "(ConnectionRefusedError); check --database-url and that the database server runs"
    )
    assert "Traceback" not in done.stderr


def load_make_up() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_up", ROOT / "deploy" / "local" / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_make_up_names_the_busy_port_and_starts_nothing(
    tmp_path: Path,
    held_port: int,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    make_up = load_make_up()
    monkeypatch.setattr(make_up, "VAR", tmp_path / "var")
    monkeypatch.setattr(make_up, "ACTIVATION_SERVER", f"127.0.0.1:{free_port()}")
    monkeypatch.setattr(make_up, "ADMINISTRATOR", f"127.0.0.1:{free_port()}")
    monkeypatch.setattr(make_up, "LICENSE_SERVER", f"127.0.0.1:{held_port}")
    assert await make_up.main() == 2
    err = capsys.readouterr().err
    assert only_line(err) == (
        f"make up: port {held_port} (License Server) is in use (another `make up`, License "
        "Server or FlexNet's lmgrd?); stop it first"
    )
    assert not (tmp_path / "var").exists()


# -- server reflection ----------------------------------------------------------------------


REFLECTION = {
    "v1": "grpc.reflection.v1.ServerReflection",
    "v1alpha": "grpc.reflection.v1alpha.ServerReflection",
}
COMMON = {"grpc.health.v1.Health", *REFLECTION.values()}


async def reflect(
    target: str, version: str, *requests: reflection_pb2.ServerReflectionRequest
) -> list[reflection_pb2.ServerReflectionResponse]:
    """One ServerReflectionInfo stream of ``version``, as a client that speaks only it:
    the generic stream API on that version's method path, no token. v1 and v1alpha
    messages are the same on the wire, so v1alpha's classes encode both."""
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.stream_stream(
            f"/{REFLECTION[version]}/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )()
        replies = []
        for request in requests:
            await call.write(request)
            reply = await call.read()
            assert isinstance(reply, reflection_pb2.ServerReflectionResponse)
            replies.append(reply)
        await call.done_writing()
        return replies


@pytest.mark.parametrize("version", list(REFLECTION))
async def test_reflection_lists_and_describes_every_service_in_v1_and_v1alpha(
    real_clock_site: Site, version: str
) -> None:
    """A client that speaks only one version finds each service's services, and the
    file that defines each of them (what ``grpcurl list`` and ``describe`` ask)."""
    for port, names in (
        (real_clock_site.license.port, LICENSE_SERVICES),
        (real_clock_site.admin.port, ADMINISTRATOR_SERVICES),
        (real_clock_site.activation.port, ACTIVATION_SERVICES),
    ):
        target = f"127.0.0.1:{port}"
        [listing] = await reflect(
            target, version, reflection_pb2.ServerReflectionRequest(list_services="")
        )
        listed = {service.name for service in listing.list_services_response.service}
        assert listed == {*names, *COMMON}, target
        files = await reflect(
            target,
            version,
            *(
                reflection_pb2.ServerReflectionRequest(file_containing_symbol=name)
                for name in sorted(listed)
            ),
        )
        for name, reply in zip(sorted(listed), files, strict=True):
            assert reply.WhichOneof("message_response") == "file_descriptor_response", name
            defined = set()
            for serialized in reply.file_descriptor_response.file_descriptor_proto:
                file = descriptor_pb2.FileDescriptorProto.FromString(serialized)
                defined |= {f"{file.package}.{service.name}" for service in file.service}
            assert name in defined, name


async def test_reflection_v1_refuses_bytes_that_do_not_parse(real_clock_site: Site) -> None:
    """v1 goes through the same wrappers as v1alpha: garbage is INVALID_ARGUMENT /
    MALFORMED_REQUEST, not UNKNOWN."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{real_clock_site.license.port}") as channel:
        call: grpc.aio.StreamStreamCall[bytes, bytes] = channel.stream_stream(
            f"/{REFLECTION['v1']}/ServerReflectionInfo",
            request_serializer=None,
            response_deserializer=None,
        )()
        await call.write(b"\xff\xff\xff\xff")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call.read()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason_of(refused.value) == "MALFORMED_REQUEST"
