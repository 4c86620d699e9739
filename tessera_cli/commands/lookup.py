"""Finding what the operator means from what they typed.

An order line from its activation ID, or from the Entitlement ID and a feature; a
certificate, lease or operation from any unique prefix of its id (tables show the first 8
characters), or a certificate from its feature when the License Server holds one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from tessera.admin.v1 import admin_pb2
from tessera.common.v1.common_pb2 import LicenseKind
from tessera.license.v1 import license_pb2 as lpb
from tessera_cli.failures import CliError, Service, UsageError
from tessera_cli.session import Session
from tessera_cli.settings import Token

_FULL_UUID_LENGTH = 36


@dataclass(frozen=True)
class Line:
    activation_id: str
    feature: str


def _ids(items: Sequence[str]) -> str:
    return "\n".join(f"  {item}" for item in items)


async def order_line(session: Session, identifier: str, feature: str | None) -> Line:
    """The network line to activate: an activation ID, or an Entitlement ID (+ feature)."""
    text = identifier.strip().upper()
    if text.startswith("ACT"):
        if feature:
            raise UsageError(
                "--feature goes with an Entitlement ID; an activation ID names its line already"
            )
        return Line(identifier.strip(), "")
    if not text.startswith("ENT"):
        raise UsageError(
            f"{identifier!r} is neither an activation ID (ACT-…) nor an Entitlement ID (ENT-…)",
            "The Entitlement ID is on the entitlement certificate; `tessera order "
            "ENTITLEMENT_ID` lists its lines and their activation IDs.",
        )
    admin = session.connections.administrator()
    reply = await session.connections.administrator_call(
        admin.GetOrder, admin_pb2.GetOrderRequest(entitlement_id=identifier.strip())
    )
    entitlement = reply.entitlement
    lines = [line for line in entitlement.lines if line.kind != LicenseKind.LICENSE_KIND_LOCAL]
    matching = [line for line in lines if not feature or line.feature == feature]
    if len(matching) == 1:
        return Line(matching[0].activation_id, matching[0].feature)
    listing = _ids(
        [f"{line.activation_id}  {line.feature}  ({line.available} left)" for line in lines]
    )
    if not matching:
        raise UsageError(
            f"order {entitlement.entitlement_id} has no network line of {feature}",
            f"Its network lines:\n{listing}" if lines else "It has no network lines at all.",
        )
    which = f" of {feature}" if feature else ""
    raise UsageError(
        f"order {entitlement.entitlement_id} has {len(matching)} network lines{which}",
        f"Name one with --feature or give its activation ID:\n{listing}",
    )


async def certificate(
    session: Session, address: str, identifier: str | None, feature: str | None
) -> lpb.InstalledCertificate | None:
    """The certificate on ``address`` that ``identifier`` (a prefix) and/or ``feature``
    name; None when a whole id matched nothing listed (the service will say why)."""
    if not identifier and not feature:
        raise UsageError("name the certificate: its id (or a unique prefix) or --feature")
    admin = session.connections.administrator()
    reply = await session.connections.administrator_call(
        admin.ListLicenses, admin_pb2.ListLicensesRequest(license_server=address)
    )
    held = list(reply.certificates)
    matching = [
        installed
        for installed in held
        if (not identifier or installed.certificate.certificate_id.startswith(identifier.strip()))
        and (not feature or installed.certificate.feature == feature)
    ]
    if len(matching) == 1:
        return matching[0]
    listing = _ids(
        [
            f"{i.certificate.certificate_id}  {i.certificate.count} x {i.certificate.feature}"
            for i in (matching or held)
        ]
    )
    if not matching:
        if identifier and len(identifier.strip()) == _FULL_UUID_LENGTH and not feature:
            return None
        named = " and ".join(
            part
            for part in (
                f"id starting {identifier.strip()!r}" if identifier else "",
                f"feature {feature}" if feature else "",
            )
            if part
        )
        raise UsageError(
            f"the License Server at {address} holds no certificate with {named}",
            f"It holds:\n{listing}" if held else "It holds no certificates.",
        )
    raise UsageError(
        f"{len(matching)} certificates on {address} match; name one by its id",
        f"Candidates:\n{listing}",
    )


async def lease_id(session: Session, prefix: str, token: Token) -> str:
    """The whole id of the held lease whose id starts with ``prefix``."""
    prefix = prefix.strip()
    if len(prefix) == _FULL_UUID_LENGTH:
        return prefix
    link = await session.connections.license_server()
    reply = await session.connections.call(
        Service.LICENSE_SERVER,
        link.lease_admin.ListLeases,
        lpb.ListLeasesRequest(),
        token=token,
        target=link.target,
    )
    matching = [
        e.lease_id
        for e in reply.leases
        if e.lease_id.startswith(prefix) and e.state == lpb.LEASE_STATE_HELD
    ]
    if len(matching) == 1:
        return matching[0]
    if not matching:
        raise UsageError(
            f"no lease held on {link.target} has an id starting {prefix!r}",
            "`tessera leases` lists who holds what.",
        )
    raise UsageError(
        f"{len(matching)} leases start with {prefix!r}; give more of the id",
        f"Candidates:\n{_ids(matching)}",
    )


async def operation(session: Session, prefix: str) -> admin_pb2.Operation:
    """The journaled operation whose id is, or starts with, ``prefix``."""
    admin = session.connections.administrator()
    try:
        reply = await session.connections.administrator_call(
            admin.GetOperation, admin_pb2.GetOperationRequest(operation_id=prefix)
        )
        return reply.operation
    except CliError as error:
        if error.failure.code not in (
            grpc.StatusCode.NOT_FOUND.name,
            grpc.StatusCode.INVALID_ARGUMENT.name,
        ):
            raise
        not_found = error
    listed = await session.connections.administrator_call(
        admin.ListOperations, admin_pb2.ListOperationsRequest(page_size=1000)
    )
    matching = [op for op in listed.operations if op.operation_id.startswith(prefix)]
    if len(matching) == 1:
        return matching[0]
    if not matching:
        raise not_found
    raise UsageError(
        f"{len(matching)} operations start with {prefix!r}; give more of the id",
        f"Candidates:\n{_ids([op.operation_id for op in matching])}",
    )
