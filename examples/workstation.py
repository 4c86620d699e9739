"""A simulated WorkStation: EBO's start-up rule with the client library, synchronously.

    .venv/bin/python examples/workstation.py [--seconds 30] [--local-licenses DIR]

With `make up` running: it makes sure the License Server at @localhost has a
`client.station` seat to lend (activating 2 from the demo order through the Administrator
when it has none), then starts the way EBO's WorkStation does: a valid local license
(with --local-licenses, a local license store directory) first, else a network lease of
`client.station`, else it refuses to start and says why (exit status 1). It runs until
Ctrl-C (or --seconds) and checks the seat in on exit.

A WorkStation is a desktop application with its own UI thread, so this example uses
SyncLicenseClient: the client's event loop runs in a thread of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import signal
import socket
import sys
from pathlib import Path

import grpc

from clients import LeaseEvent, LicenseClient, LicenseError, Lost, NoLicense, SyncLicenseClient
from tessera.admin.v1 import admin_pb2, admin_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
DEMO_ENTITLEMENT = ROOT / "var" / "demo-entitlement.txt"
VENDOR_KEYS = ROOT / "var" / "activation_server" / "vendor-keys.pub"
OPERATOR_TOKEN = ROOT / "var" / "administrator" / "operator-token"


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
    parser.add_argument("--seconds", type=float, default=0, help="run this long (0: until ^C)")
    parser.add_argument("--host", default=f"ws-{socket.gethostname()}", help="this host's name")
    parser.add_argument("--user", default=getpass.getuser())
    parser.add_argument("--local-licenses", type=Path, help="local license store directory")
    parser.add_argument("--vendor-keys", type=Path, default=VENDOR_KEYS)
    parser.add_argument("--administrator", default="127.0.0.1:27200", help="to activate seats")
    parser.add_argument("--entitlement", default="", help="Entitlement ID to activate from")
    parser.add_argument("--no-activate", action="store_true", help="never activate seats")
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


async def ensure_a_seat(
    address: str,
    administrator: str,
    entitlement_id: str,
    operator_token: str | None,
    site_token: str | None,
) -> None:
    """Activate 2 client.station seats from the order when the License Server has none
    (the operator's job on a real site, done here so the example runs on a fresh
    `make up`)."""
    try:
        async with LicenseClient(address, site_token=site_token) as client:
            information = await client.license_information()
    except LicenseError:
        return  # the start-up rule will say what is wrong
    if any(info.feature == "client.station" and info.activated for info in information):
        return
    if not entitlement_id and DEMO_ENTITLEMENT.exists():
        entitlement_id = DEMO_ENTITLEMENT.read_text().strip()
    if not entitlement_id:
        return  # nothing to activate from: the start-up rule will say what is missing
    operator = (("authorization", f"Bearer {operator_token}"),) if operator_token else ()
    async with grpc.aio.insecure_channel(administrator) as channel:
        admin = admin_pb2_grpc.AdministratorServiceStub(channel)
        order = await admin.GetOrder(
            admin_pb2.GetOrderRequest(entitlement_id=entitlement_id), metadata=operator
        )
        line = next(line for line in order.entitlement.lines if line.feature == "client.station")
        await admin.Activate(  # the operator's step (as in examples/thin_path.py)
            admin_pb2.ActivateRequest(
                license_server=address, activation_id=line.activation_id, count=2
            ),
            metadata=operator,
        )
        print(f"Activated 2 x client.station from {entitlement_id}")


def on_event(event: LeaseEvent) -> None:
    # Runs in the client's thread: a real WorkStation would post this to its UI thread.
    print(f"  license event: {event}")
    if isinstance(event, Lost):
        print("  The WorkStation lost its license and closes.")


def main() -> int:
    arguments = parse_arguments()
    local = arguments.local_licenses
    site_token = read_token("TESSERA_SITE_TOKEN", arguments.site_token_file)
    # An invalid address is refused here, before any network call.
    client = SyncLicenseClient(
        arguments.address,
        client_host=arguments.host,
        user=arguments.user,
        display_name="WorkStation (example)",
        local_licenses=local,
        vendor_keys=arguments.vendor_keys if local is not None else None,
        site_token=site_token,
    )
    if not arguments.no_activate:
        asyncio.run(
            ensure_a_seat(
                arguments.address,
                arguments.administrator,
                arguments.entitlement,
                read_token("TESSERA_ADMINISTRATOR_TOKEN", arguments.operator_token_file),
                site_token,
            )
        )
    # SIGTERM leaves through the `with` blocks below like Ctrl-C, so the seat is checked in.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    with client:
        try:
            with client.license("client.station", on_event=on_event) as license:
                print(f"WorkStation started for {arguments.user} on a {license.kind} license")
                try:
                    if license.wait_lost(arguments.seconds or None) is not None:
                        return 2
                except TimeoutError:
                    pass
                except KeyboardInterrupt:
                    print("Stopping.")
        except NoLicense as refusal:
            print(f"The WorkStation does not start: {refusal}")
            return 1
    print("Checked in.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
