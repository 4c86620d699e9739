"""Walk Tessera's thin path against `make up`: order -> activate -> lease -> check in.

    .venv/bin/python examples/thin_path.py [ENTITLEMENT_ID]

Without an argument it uses the demo entitlement that `make up` created. The Administrator
needs the operator token: TESSERA_ADMINISTRATOR_TOKEN, else the file `make up` leaves in
var/administrator/operator-token. A License Server that requires a site token gets
TESSERA_SITE_TOKEN.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import grpc

from tessera.admin.v1 import admin_pb2, admin_pb2_grpc
from tessera.license.v1 import license_pb2, license_pb2_grpc

ADMINISTRATOR = "127.0.0.1:27200"
LICENSE_SERVER_ADDRESS = "@localhost"  # EBO style: ports 27000-27009 on this machine
LICENSE_SERVER = "127.0.0.1:27000"
VAR = Path(__file__).resolve().parents[1] / "var"


def bearer(env: str, path: Path | None = None) -> tuple[tuple[str, str], ...]:
    """Call metadata with the token in ``env`` (else in the file ``path``), if any."""
    token = os.environ.get(env, "").strip()
    if not token and path is not None and path.is_file():
        token = path.read_text().strip()
    return (("authorization", f"Bearer {token}"),) if token else ()


async def next_response(
    stream: grpc.aio.StreamStreamCall[license_pb2.LeaseRequest, license_pb2.LeaseResponse],
) -> license_pb2.LeaseResponse:
    response = await stream.read()
    if not isinstance(response, license_pb2.LeaseResponse):
        sys.exit("the License Server closed the lease stream")
    return response


async def main(entitlement_id: str) -> None:
    operator = bearer("TESSERA_ADMINISTRATOR_TOKEN", VAR / "administrator" / "operator-token")
    site = bearer("TESSERA_SITE_TOKEN")
    async with grpc.aio.insecure_channel(ADMINISTRATOR) as admin_channel:
        admin = admin_pb2_grpc.AdministratorServiceStub(admin_channel)
        order = await admin.GetOrder(
            admin_pb2.GetOrderRequest(entitlement_id=entitlement_id), metadata=operator
        )
        print(f"Order {entitlement_id} for {order.entitlement.customer_organization}:")
        for line in order.entitlement.lines:
            print(f"  {line.activation_id}  {line.feature:<24} {line.available}/{line.count} left")
        station = next(line for line in order.entitlement.lines if line.feature == "client.station")
        if station.available < 2:
            sys.exit("fewer than 2 client.station seats left on this order; create another one")
        activated = await admin.Activate(
            admin_pb2.ActivateRequest(
                license_server=LICENSE_SERVER_ADDRESS, activation_id=station.activation_id, count=2
            ),
            metadata=operator,
        )
        certificate = activated.certificate.certificate
        print(
            f"Activated {certificate.count} x {certificate.feature} onto host "
            f"{certificate.host_id} (operation {activated.operation.operation_id})"
        )

    async with grpc.aio.insecure_channel(LICENSE_SERVER) as channel:
        leases = license_pb2_grpc.LeaseServiceStub(channel)
        stream = leases.Lease(metadata=site)
        await stream.write(
            license_pb2.LeaseRequest(
                acquire=license_pb2.LeaseAcquire(
                    feature="client.station", count=1, client_host="ws-01", user="operator"
                )
            )
        )
        granted = (await next_response(stream)).granted
        print(f"WorkStation holds lease {granted.lease_id} (TTL {granted.ttl.seconds} s)")
        await stream.write(license_pb2.LeaseRequest(heartbeat=license_pb2.LeaseHeartbeat()))
        ack = (await next_response(stream)).heartbeat_ack
        print(f"Heartbeat acknowledged; lease now expires at {ack.expires_at.ToDatetime()} UTC")
        info = await leases.GetLicenseInformation(
            license_pb2.GetLicenseInformationRequest(), metadata=site
        )
        print("License Information:")
        for feature in info.features:
            print(
                f"  {feature.feature:<24} activated {feature.activated:>3}  used {feature.used:>3}"
                f"  available {feature.available:>3}"
            )
        await stream.write(license_pb2.LeaseRequest(release=license_pb2.LeaseRelease()))
        await next_response(stream)
        await stream.done_writing()
        print("Checked in.")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        entitlement = sys.argv[1]
    else:
        entitlement = (
            (Path(__file__).resolve().parents[1] / "var" / "demo-entitlement.txt")
            .read_text()
            .strip()
        )
    asyncio.run(main(entitlement))
