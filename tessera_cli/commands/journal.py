"""The Administrator's own records: the operations journal and the registration details."""

from __future__ import annotations

import argparse

from tessera.activation.v1.activation_pb2 import Registration
from tessera.admin.v1 import admin_pb2
from tessera_cli import records, views
from tessera_cli.arguments import Parser, Subcommands, add_command, positive
from tessera_cli.commands import lookup
from tessera_cli.session import Result, Session

REGISTRATION_FIELDS = ("organization", "contact_name", "email", "phone", "site")


async def operations(args: argparse.Namespace, session: Session) -> Result:
    admin = session.connections.administrator()
    reply = await session.connections.administrator_call(
        admin.ListOperations,
        admin_pb2.ListOperationsRequest(page_size=args.limit, unfinished_only=args.unfinished),
    )
    return Result(
        {"operations": [records.operation(op) for op in reply.operations]},
        views.operations(session.style, reply.operations),
    )


async def operation(args: argparse.Namespace, session: Session) -> Result:
    found = await lookup.operation(session, args.operation_id)
    return Result({"operation": records.operation(found)}, views.operation(session.style, found))


async def registration(args: argparse.Namespace, session: Session) -> Result:
    admin = session.connections.administrator()
    reply = await session.connections.administrator_call(
        admin.GetRegistration, admin_pb2.GetRegistrationRequest()
    )
    return Result(
        {"registration": records.registration(reply.registration)},
        views.registration(session.style, reply.registration),
    )


async def set_registration(args: argparse.Namespace, session: Session) -> Result:
    """Change the given fields and keep the others (an empty value clears one)."""
    admin = session.connections.administrator()
    current = await session.connections.administrator_call(
        admin.GetRegistration, admin_pb2.GetRegistrationRequest()
    )
    details = Registration()
    details.CopyFrom(current.registration)
    for field in REGISTRATION_FIELDS:
        value = getattr(args, field)
        if value is not None:
            setattr(details, field, value)
    reply = await session.connections.administrator_call(
        admin.SetRegistration, admin_pb2.SetRegistrationRequest(registration=details)
    )
    return Result(
        {"registration": records.registration(reply.registration)},
        views.registration(session.style, reply.registration),
    )


def register(commands: Subcommands) -> None:
    """The Administrator's records: registration (show, set), operations (show)."""
    p = add_command(
        commands,
        "registration",
        registration,
        "show or set the registration details sent with every activation",
        "The organisation, contact, e-mail, phone and site the Administrator sends to the "
        "vendor with every activation, as EBO's License Administrator asks before it "
        "activates.",
        [
            "tessera registration",
            'tessera registration set --organization "Harbour Tower" --contact-name "J. Smith" '
            "--email bms@harbour.example",
            'tessera registration set --site "Building 4, plant room"',
        ],
    )
    registration_commands = p.add_subparsers(
        title="subcommands", metavar="[SUBCOMMAND]", parser_class=Parser
    )
    add_command(
        registration_commands,
        "show",
        registration,
        "show the details (the default)",
        "Show the registration details.",
        ["tessera registration show"],
    )
    s = add_command(
        registration_commands,
        "set",
        set_registration,
        "change some details, keep the rest",
        "Change the details given; the others stay as they are (an empty value clears one). "
        "The organisation is required.",
        ['tessera registration set --organization "Harbour Tower" --email bms@harbour.example'],
    )
    s.add_argument("--organization")
    s.add_argument("--contact-name")
    s.add_argument("--email")
    s.add_argument("--phone")
    s.add_argument("--site", help='where the License Server runs, e.g. "Building 4, plant room"')

    p = add_command(
        commands,
        "operations",
        operations,
        "the Administrator's journal of activations, returns, repairs and moves",
        "List the journal, newest first: what each operation did, where it stands and, for "
        "one that is stuck, why (last error). `operations show ID` shows one.",
        [
            "tessera operations",
            "tessera operations --unfinished",
            "tessera operations show dd1b9de2",
        ],
    )
    p.add_argument("--unfinished", action="store_true", help="only operations not completed yet")
    p.add_argument("--limit", type=positive, default=100, help="at most this many (default 100)")
    ops = p.add_subparsers(title="subcommands", metavar="[SUBCOMMAND]", parser_class=Parser)
    s = add_command(
        ops,
        "show",
        operation,
        "show one operation",
        "Show one journaled operation.",
        ["tessera operations show dd1b9de2"],
    )
    s.add_argument("operation_id", metavar="OPERATION_ID", help="the id or any unique prefix")
