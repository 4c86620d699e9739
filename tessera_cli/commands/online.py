"""Online operations through the Administrator: order, activate, return, repair, move,
check-in.

Each journaled operation gets its operation id here, before the call, so that when the
network fails halfway the error can say how to resume it (``--operation-id``): the
Administrator completes an operation exactly once however often it is asked.
"""

from __future__ import annotations

import argparse
import uuid

from tessera.admin.v1 import admin_pb2
from tessera_cli import records, views
from tessera_cli.commands import lookup
from tessera_cli.failures import ExitCode
from tessera_cli.session import Result, Session
from tessera_cli.settings import check_license_server


def operation_id(args: argparse.Namespace, session: Session) -> str:
    chosen = str(args.operation_id or uuid.uuid4())
    session.connections.operation_id = chosen
    return chosen


async def order(args: argparse.Namespace, session: Session) -> Result:
    admin = session.connections.administrator()
    async with session.progress.show("Asking the vendor for the order"):
        reply = await session.connections.administrator_call(
            admin.GetOrder, admin_pb2.GetOrderRequest(entitlement_id=args.entitlement_id)
        )
    return Result(
        {"entitlement": records.entitlement(reply.entitlement)},
        views.entitlement(session.style, reply.entitlement),
    )


async def activate(args: argparse.Namespace, session: Session) -> Result:
    address = session.settings.license_server.value
    line = await lookup.order_line(session, args.id, args.feature)
    request = admin_pb2.ActivateRequest(
        license_server=address,
        activation_id=line.activation_id,
        count=args.count,
        operation_id=operation_id(args, session),
    )
    admin = session.connections.administrator()
    what = f"{args.count} x {line.feature or line.activation_id}"
    async with session.progress.show(f"Activating {what} onto {address}"):
        reply = await session.connections.administrator_call(admin.Activate, request)
    return Result(
        {
            "operation": records.operation(reply.operation),
            "certificate": records.optional_certificate(
                reply.certificate, reply.HasField("certificate")
            ),
        },
        views.activated(session.style, reply),
    )


async def return_(args: argparse.Namespace, session: Session) -> Result:
    address = session.settings.license_server.value
    found = await lookup.certificate(session, address, args.certificate, args.feature)
    certificate_id = found.certificate.certificate_id if found else str(args.certificate)
    request = admin_pb2.ReturnRequest(
        license_server=address,
        certificate_id=certificate_id,
        count=args.count,
        force=args.force,
        operation_id=operation_id(args, session),
    )
    admin = session.connections.administrator()
    feature = found.certificate.feature if found else ""
    async with session.progress.show(f"Returning {feature or certificate_id} to the vendor"):
        reply = await session.connections.administrator_call(admin.Return, request)
    return Result(
        {
            "operation": records.operation(reply.operation),
            "remaining": records.optional_certificate(reply.remaining, reply.HasField("remaining")),
            "revoked_leases": reply.revoked_leases,
        },
        views.returned(session.style, reply, feature),
    )


async def repair(args: argparse.Namespace, session: Session) -> Result:
    address = session.settings.license_server.value
    request = admin_pb2.RepairRequest(
        license_server=address, operation_id=operation_id(args, session), force=args.force
    )
    admin = session.connections.administrator()
    async with session.progress.show(f"Repairing trusted storage of {address}"):
        reply = await session.connections.administrator_call(admin.Repair, request)
    return Result(
        {
            "operation": records.operation(reply.operation),
            "health": records.trust_health(reply.health),
        },
        views.repaired(session.style, reply),
    )


async def check_in(args: argparse.Namespace, session: Session) -> Result:
    address = session.settings.license_server.value
    admin = session.connections.administrator()
    async with session.progress.show(f"Checking {address} in with the vendor"):
        reply = await session.connections.administrator_call(
            admin.CheckIn, admin_pb2.CheckInRequest(license_server=address)
        )
    problem = reply.status.superseded or reply.status.withdrawn_seats > 0
    return Result(
        {
            "license_server": address,
            "host_id": reply.host_id,
            "check_in": records.check_in_status(reply.status),
        },
        views.checked_in(session.style, reply, address),
        ExitCode.PROBLEM_FOUND if problem else ExitCode.OK,
    )


async def move(args: argparse.Namespace, session: Session) -> Result:
    # --from "" is refused like --license-server "", not taken for the default.
    source = (
        session.settings.license_server.value
        if args.source is None
        else check_license_server(args.source, "--from", "from_license_server")
    )
    check_license_server(args.to, "--to", "to_license_server")
    found = await lookup.certificate(session, source, args.certificate, args.feature)
    certificate_id = found.certificate.certificate_id if found else str(args.certificate)
    request = admin_pb2.MoveRequest(
        from_license_server=source,
        to_license_server=args.to,
        certificate_id=certificate_id,
        force=args.force,
        operation_id=operation_id(args, session),
    )
    admin = session.connections.administrator()
    async with session.progress.show(f"Moving {certificate_id} from {source} to {args.to}"):
        reply = await session.connections.administrator_call(admin.Move, request)
    return Result(
        {
            "operation": records.operation(reply.operation),
            "certificate": records.optional_certificate(
                reply.certificate, reply.HasField("certificate")
            ),
        },
        views.moved(session.style, reply),
    )
