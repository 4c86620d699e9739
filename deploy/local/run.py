"""Run the whole Tessera system on this machine, on SQLite under ./var (``make up``).

Starts the Activation Server, then the License Server and the Administrator, waits until
each reports healthy, creates a demo entitlement on first start, prints where everything
listens and what to try, and stops all three cleanly on Ctrl-C.

Credentials: each service makes its token files in its data directory on first start
(var/activation_server/vendor-token, var/license_server/operator-token and
administrator-token, var/administrator/operator-token); the Administrator presents the
License Server's administrator-token, and `tessera` run from the checkout finds the rest.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import grpc

from tessera.activation.v1 import activation_pb2 as pb
from tessera.activation.v1 import activation_pb2_grpc as pb_grpc
from tessera.auth import bearer_metadata
from tessera.common.v1.common_pb2 import LicenseKind
from tessera.server.serving import PORT_IN_USE, is_serving, listen_problem

ROOT = Path(__file__).resolve().parents[2]
VAR = ROOT / "var"
ACTIVATION_SERVER = "127.0.0.1:27100"
LICENSE_SERVER = "127.0.0.1:27000"
ADMINISTRATOR = "127.0.0.1:27200"
DEMO_FILE = VAR / "demo-entitlement.txt"
DEMO_LINES = [("client.station", 10), ("server.enterprise.base", 1), ("server.device.es", 40)]


async def wait_healthy(target: str, process: asyncio.subprocess.Process, name: str) -> None:
    for _ in range(300):
        if process.returncode is not None:
            raise SystemExit(f"{name} exited with code {process.returncode}; see above")
        if await is_serving(target):
            return
        await asyncio.sleep(0.1)
    raise SystemExit(f"{name} did not become healthy at {target}")


async def start(name: str, module: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, *args, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )


async def demo_entitlement() -> str:
    if DEMO_FILE.exists():
        return DEMO_FILE.read_text().strip()
    token = (VAR / "activation_server" / "vendor-token").read_text().strip()
    async with grpc.aio.insecure_channel(ACTIVATION_SERVER) as channel:
        vendor = pb_grpc.VendorServiceStub(channel)
        reply = await vendor.CreateEntitlement(
            pb.CreateEntitlementRequest(
                customer_organization="Demo Building Owner",
                contact="facilities@example.com",
                lines=[
                    pb.NewEntitlementLine(
                        feature=feature, count=count, kind=LicenseKind.LICENSE_KIND_NETWORK
                    )
                    for feature, count in DEMO_LINES
                ],
            ),
            metadata=bearer_metadata(token),
        )
    DEMO_FILE.write_text(reply.entitlement.entitlement_id + "\n")
    return reply.entitlement.entitlement_id


def busy_ports() -> list[str]:
    """One line for each port of the three that cannot be listened on, checked before
    anything starts: a service refuses a busy port too, but the health check that waits
    for it could meet whatever holds the port and take it for the service."""
    busy = []
    for name, listen, holder in (
        ("Activation Server", ACTIVATION_SERVER, "another `make up`?"),
        ("License Server", LICENSE_SERVER, "another `make up`, License Server or FlexNet's lmgrd?"),
        ("Administrator", ADMINISTRATOR, "another `make up`?"),
    ):
        problem = listen_problem(listen)
        if problem == PORT_IN_USE:
            port = listen.rsplit(":", 1)[1]
            busy.append(f"make up: port {port} ({name}) is in use ({holder}); stop it first")
        elif problem:
            busy.append(f"make up: cannot listen on {listen} ({name}): {problem}")
    return busy


async def main() -> int:
    busy = busy_ports()
    if busy:
        print("\n".join(busy), file=sys.stderr, flush=True)
        return 2
    VAR.mkdir(exist_ok=True)
    processes: list[asyncio.subprocess.Process] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        activation = await start(
            "Activation Server", "services.activation_server", "--listen", ACTIVATION_SERVER
        )
        processes.append(activation)
        await wait_healthy(ACTIVATION_SERVER, activation, "Activation Server")
        license_server = await start(
            "License Server",
            "services.license_server",
            "--listen",
            LICENSE_SERVER,
            "--vendor-keys",
            str(VAR / "activation_server" / "vendor-keys.pub"),
        )
        processes.append(license_server)
        administrator = await start(
            "Administrator",
            "services.administrator",
            "--listen",
            ADMINISTRATOR,
            "--activation-server",
            ACTIVATION_SERVER,
            "--license-server-token-file",
            str(VAR / "license_server" / "administrator-token"),
        )
        processes.append(administrator)
        await wait_healthy(LICENSE_SERVER, license_server, "License Server")
        await wait_healthy(ADMINISTRATOR, administrator, "Administrator")
        entitlement_id = await demo_entitlement()
        print(
            f"""
Tessera is up (SQLite under {VAR}):
  Activation Server  {ACTIVATION_SERVER}   (vendor token in var/activation_server/vendor-token)
  License Server     {LICENSE_SERVER}   (address @localhost; operator token in
                                       var/license_server/operator-token)
  Administrator      {ADMINISTRATOR}   (operator token in var/administrator/operator-token)

Demo Entitlement ID: {entitlement_id}
  ({", ".join(f"{count} x {feature}" for feature, count in DEMO_LINES)})

Try, in another terminal:
  .venv/bin/python examples/thin_path.py
  grpcurl -plaintext -H "authorization: Bearer $(cat var/administrator/operator-token)" \\
      -d '{{"entitlement_id": "{entitlement_id}"}}' \\
      {ADMINISTRATOR} tessera.admin.v1.AdministratorService/GetOrder

Ctrl-C stops all three.""",
            flush=True,
        )
        waiters = [asyncio.create_task(p.wait()) for p in processes]
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait([stopper, *waiters], return_when=asyncio.FIRST_COMPLETED)
        return 0 if stop.is_set() else 1
    finally:
        for process in reversed(processes):
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            await process.wait()
        print("Tessera stopped.", flush=True)


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
