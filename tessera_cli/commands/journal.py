"""The Administrator's own records: the operations journal and the registration details."""

from __future__ import annotations

import argparse

from tessera.activation.v1.activation_pb2 import Registration
from tessera.admin.v1 import admin_pb2
from tessera_cli import records, views
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
