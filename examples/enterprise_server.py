"""A simulated Enterprise Server holding its licenses with the client library.

    .venv/bin/python examples/enterprise_server.py [--devices 40] [--seconds 30]

With `make up` running: it makes sure the License Server at @localhost has the seats it
needs (activating them from the demo order through the Administrator when it has not),
declares how many field-bus devices it serves (EBO's Required), checks the License
Information for a violation, then holds `server.enterprise.base` and N `server.device.es`
until Ctrl-C (or --seconds). The leases heartbeat, resume and fail over by themselves; a
revocation (try `LeaseAdminService/RevokeLease` from another terminal) raises the license
alarm and stops the server, as EBO does. On exit every seat is checked in.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import grpc

from clients import (
    ExpiryWarning,
    Interrupted,
    Lease,
    LeaseEvent,
    License,
    LicenseClient,
    LicenseError,
    Lost,
    Resumed,
)
from tessera.admin.v1 import admin_pb2, admin_pb2_grpc

DEMO_ENTITLEMENT = Path(__file__).resolve().parents[1] / "var" / "demo-entitlement.txt"
OPERATOR_TOKEN = Path(__file__).resolve().parents[1] / "var" / "administrator" / "operator-token"


def read_token(env: str, path: Path | None) -> str | None:
    """A token from the environment variable ``env``, else from the file ``path``."""
    if os.environ.get(env):
        return os.environ[env].strip()
    if path is not None and path.is_file():
        return path.read_text().strip() or None
    return None


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default="@localhost", help="License Server address")
    parser.add_argument("--devices", type=int, default=40, help="field-bus devices served")
    parser.add_argument("--seconds", type=float, default=0, help="run this long (0: until ^C)")
    parser.add_argument("--host", default=f"es-{socket.gethostname()}", help="this server's name")
    parser.add_argument("--administrator", default="127.0.0.1:27200", help="to activate seats")
    parser.add_argument("--entitlement", default="", help="Entitlement ID to activate from")
    parser.add_argument(
        "--operator-token-file",
        type=Path,
        default=OPERATOR_TOKEN,
        help="the Administrator's operator token, to activate [env TESSERA_ADMINISTRATOR_TOKEN]",
    )
    parser.add_argument(
        "--site-token-file",
        type=Path,
        help="the site token, if the License Server requires one [env TESSERA_SITE_TOKEN]",
    )
    return parser.parse_args()


async def ensure_seats(
    client: LicenseClient,
    needed: dict[str, int],
    administrator: str,
    entitlement_id: str,
    operator_token: str | None,
) -> None:
    """Activate from the order what the License Server lacks (the operator's job on a
    real site, done here so the example runs on a fresh `make up`)."""
    activated = {info.feature: info.activated for info in await client.license_information()}
    missing = {f: n - activated.get(f, 0) for f, n in needed.items() if activated.get(f, 0) < n}
    if not missing:
        return
    if not entitlement_id and DEMO_ENTITLEMENT.exists():
        entitlement_id = DEMO_ENTITLEMENT.read_text().strip()
    if not entitlement_id:
        sys.exit(f"the License Server lacks {missing}; activate them or pass --entitlement")
    operator = (("authorization", f"Bearer {operator_token}"),) if operator_token else ()
    async with grpc.aio.insecure_channel(administrator) as channel:
        admin = admin_pb2_grpc.AdministratorServiceStub(channel)
        order = await admin.GetOrder(
            admin_pb2.GetOrderRequest(entitlement_id=entitlement_id), metadata=operator
        )
        for line in order.entitlement.lines:
            if line.feature in missing:
                count = min(missing[line.feature], line.available)
                if count > 0:
                    await admin.Activate(
                        admin_pb2.ActivateRequest(
                            license_server=client.address,
                            activation_id=line.activation_id,
                            count=count,
                        ),
                        metadata=operator,
                    )
                    print(f"Activated {count} x {line.feature} from {entitlement_id}")


async def watch(lease: Lease, alarms: asyncio.Queue[str]) -> None:
    """Log what happens to a lease; a loss raises the license alarm."""
    async for event in lease.events():
        describe(lease, event)
        if isinstance(event, Lost):
            await alarms.put(f"{lease.feature}: {event.error}")


def describe(lease: Lease, event: LeaseEvent) -> None:
    match event:
        case Interrupted(server=server, error=error):
            print(f"  {lease.feature}: stream to {server} broke ({error}); resuming")
        case Resumed(server=server, epoch=epoch):
            print(f"  {lease.feature}: resumed on {server} (epoch {epoch})")
        case ExpiryWarning(remaining=remaining):
            print(f"  {lease.feature}: no License Server reachable; expires in {remaining}")


async def serve(arguments: argparse.Namespace) -> int:
    client = LicenseClient(
        arguments.address,
        client_host=arguments.host,
        display_name="Enterprise Server (example)",
        site_token=read_token("TESSERA_SITE_TOKEN", arguments.site_token_file),
    )
    async with client:
        needed = {"server.enterprise.base": 1, "server.device.es": arguments.devices}
        await ensure_seats(
            client,
            needed,
            arguments.administrator,
            arguments.entitlement,
            read_token("TESSERA_ADMINISTRATOR_TOKEN", arguments.operator_token_file),
        )
        for feature, count in needed.items():
            await client.declare_requirement(feature, count)
        for info in await client.license_information():
            if info.violation:
                print(f"ALARM: license violation: {info.feature} requires {info.required}, "
                      f"{info.activated} activated")  # fmt: skip

        try:
            async with (
                client.license("server.enterprise.base") as base,
                client.lease("server.device.es", count=arguments.devices) as devices,
            ):
                print(f"Enterprise Server {arguments.host} licensed:")
                print(f"  {base.count} x {base.feature} ({base.kind})")
                print(f"  {devices.count} x {devices.feature} (lease {devices.lease_id})")
                status = await run_until_alarm(base, devices, arguments.seconds)
        except LicenseError as refusal:  # NoLicense, NoSeatAvailable, ...
            print(f"The Enterprise Server does not start: {refusal}")
            return 1
        print("Checked in.")
        return status


async def run_until_alarm(base: License, devices: Lease, seconds: float) -> int:
    """Serve until --seconds pass (0), or a license is lost: the alarm (3)."""
    alarms: asyncio.Queue[str] = asyncio.Queue()
    watchers = [
        asyncio.create_task(watch(lease, alarms))
        for lease in (base, devices)
        if isinstance(lease, Lease)
    ]
    try:
        async with asyncio.timeout(seconds or None):
            alarm = await alarms.get()
        print(f"ALARM: license lost: {alarm}; the Enterprise Server stops")
        return 3
    except TimeoutError:
        return 0
    finally:
        for watcher in watchers:
            watcher.cancel()


async def main() -> int:
    # Ctrl-C and SIGTERM cancel the server; leaving the `async with` blocks checks in.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await serve(parse_arguments())
    except asyncio.CancelledError:
        print("Stopped.")
        return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
