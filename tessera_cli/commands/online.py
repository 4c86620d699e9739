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
from tessera_cli.arguments import (
    Subcommands,
    add_certificate_choice,
    add_command,
    add_line_choice,
    add_operation_id,
    add_repair_force,
    add_return_options,
)
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


def register(commands: Subcommands) -> None:
    """The Administrator's online operations: order, activate, return, repair, check-in, move."""
    p = add_command(
        commands,
        "order",
        order,
        "look an order up: its lines and the seats left",
        "Look an order up at the vendor (through the Administrator) by the Entitlement ID "
        "on its entitlement certificate: every line, with its activation ID and the seats "
        "sold, activated and left.",
        ["tessera order ENT-MSR2-T2S5-0X07", "tessera order ENT-MSR2-T2S5-0X07 --json"],
    )
    p.add_argument("entitlement_id", metavar="ENTITLEMENT_ID")

    p = add_command(
        commands,
        "activate",
        activate,
        "activate seats of an order line onto the License Server",
        "Activate seats of one network line onto the License Server (--license-server, "
        "default @localhost). The Administrator journals the operation; if the network fails "
        "halfway, run the same command with the --operation-id the error prints to complete "
        "it exactly once.",
        [
            "tessera activate ENT-MSR2-T2S5-0X07 --feature client.station --count 2",
            "tessera activate ACT-K8TD-297G-HW0T --count 40",
            "tessera activate ACT-K8TD-297G-HW0T --license-server 27001@es-host",
        ],
    )
    add_line_choice(p)
    add_operation_id(p)

    p = add_command(
        commands,
        "return",
        return_,
        "return a certificate's seats to the vendor",
        "Return a certificate to the vendor so its seats can be activated elsewhere. What one "
        "activation brought returns together; single seats only where the line allows it "
        "(--count). The seats stop serving first: while they are leased the return is "
        "refused, unless --force revokes those leases.",
        [
            "tessera return --feature client.station",
            "tessera return 3f2a91c0",
            "tessera return 3f2a91c0 --count 1 --force",
        ],
    )
    add_certificate_choice(p, "return")
    add_return_options(p)
    add_operation_id(p)

    p = add_command(
        commands,
        "repair",
        repair,
        "re-issue the licenses after trusted storage broke",
        "Ask the vendor to re-issue exactly what it records this License Server holds, bound "
        "to this machine, after trusted storage broke (`tessera trust` says why). Needs the "
        "vendor; at most 4 repairs per License Server in any 365 days, so a repair of healthy "
        "trusted storage is refused (NOTHING_TO_REPAIR) unless --force says it may count.",
        ["tessera trust", "tessera repair", "tessera repair --force"],
    )
    add_repair_force(p)
    add_operation_id(p)

    add_command(
        commands,
        "check-in",
        check_in,
        "check the License Server in with the vendor now",
        "Ask the vendor (through the Administrator) whether it still records the licenses "
        "on the License Server as this server's. Certificates it re-bound to another host "
        "(a copy of this server's data directory repaired elsewhere) or no longer records "
        "stop serving; overdue ones serve again. Only needed where the vendor's check-in "
        "policy asks for it, and the Administrator does that by itself when one is due. "
        "Exits 5 when seats do not serve.",
        ["tessera check-in", "tessera check-in --license-server 27001@es-host --json"],
    )

    p = add_command(
        commands,
        "move",
        move,
        "move a certificate's seats to another License Server",
        "Return a certificate from one License Server (--from, default --license-server) and "
        "activate the same seats on another (--to), as one resumable operation. Point the "
        "clients at the new address afterwards.",
        [
            "tessera move --feature server.enterprise.base --to @new-es-host",
            "tessera move 3f2a91c0 --from 27000@old-host --to 27000@new-host --force",
        ],
    )
    add_certificate_choice(p, "move")
    p.add_argument(
        "--to", required=True, metavar="ADDRESS", help="the License Server the seats go to"
    )
    p.add_argument("--from", dest="source", metavar="ADDRESS", help="the License Server they leave")
    p.add_argument(
        "--force", action="store_true", help="revoke leases on the seats instead of refusing"
    )
    add_operation_id(p)
