"""The License Server itself, like FlexNet's lmstat and lmremove: License Information,
leases, revoking one, trusted storage's health; and whether the services answer."""

from __future__ import annotations

import argparse

from grpc_health.v1 import health_pb2

from tessera.license.v1 import license_pb2 as lpb
from tessera_cli import records, views
from tessera_cli.arguments import Subcommands, add_command
from tessera_cli.commands import lookup
from tessera_cli.failures import CliError, ExitCode, Failure, Service
from tessera_cli.session import Result, Session
from tessera_cli.settings import Token
from tessera_cli.terminal import Cell, Column, table

LICENSE_SERVER = Service.LICENSE_SERVER


def operator_token(session: Session) -> Token:
    token = session.settings.operator_token
    if token is None:
        raise CliError(
            Failure(
                ExitCode.CREDENTIALS,
                "this command needs the License Server's operator token, and none is set",
                "Set TESSERA_OPERATOR_TOKEN (or --operator-token-file, or operator_token in "
                "the config file). The License Server keeps it in its data directory as "
                "operator-token; with `make up` it is var/license_server/operator-token, "
                "read by itself when you run tessera from the checkout.",
                reason="CREDENTIAL_MISSING",
                service=LICENSE_SERVER.value,
            )
        )
    return token


async def licenses(args: argparse.Namespace, session: Session) -> Result:
    link = await session.connections.license_server()
    info = await session.connections.call(
        LICENSE_SERVER,
        link.leases.GetLicenseInformation,
        lpb.GetLicenseInformationRequest(feature=args.feature or ""),
        target=link.target,
    )
    listed = await session.connections.call(
        LICENSE_SERVER,
        link.trusted_storage.ListCertificates,
        lpb.ListCertificatesRequest(),
        target=link.target,
    )
    certificates = [
        c for c in listed.certificates if not args.feature or c.certificate.feature == args.feature
    ]
    return Result(
        {
            "license_server": link.target,
            "host_id": link.host_id,
            "features": [records.feature(f) for f in info.features],
            "certificates": [records.certificate(c) for c in certificates],
        },
        views.licenses(session.style, link.target, link.host_id, info.features, certificates),
    )


async def leases(args: argparse.Namespace, session: Session) -> Result:
    token = operator_token(session)
    link = await session.connections.license_server()
    reply = await session.connections.call(
        LICENSE_SERVER,
        link.lease_admin.ListLeases,
        lpb.ListLeasesRequest(feature=args.feature or ""),
        token=token,
        target=link.target,
    )
    return Result(
        {"leases": [records.lease(e) for e in reply.leases]},
        views.leases(session.style, reply.leases),
    )


async def revoke(args: argparse.Namespace, session: Session) -> Result:
    token = operator_token(session)
    lease_id = await lookup.lease_id(session, args.lease, token)
    link = await session.connections.license_server()
    reply = await session.connections.call(
        LICENSE_SERVER,
        link.lease_admin.RevokeLease,
        lpb.RevokeLeaseRequest(lease_id=lease_id, reason=args.reason),
        token=token,
        target=link.target,
    )
    if reply.revoked:
        text = (
            session.style.ok("Revoked")
            + f" lease {lease_id}; its holder was told and its seats are free."
        )
    else:
        text = f"Lease {lease_id} had already ended; nothing to revoke."
    return Result({"lease_id": lease_id, "revoked": reply.revoked}, text)


async def trust(args: argparse.Namespace, session: Session) -> Result:
    link = await session.connections.license_server()
    reply = await session.connections.call(
        LICENSE_SERVER,
        link.trusted_storage.GetTrustHealth,
        lpb.GetTrustHealthRequest(),
        target=link.target,
    )
    return Result(
        {"license_server": link.target, "health": records.trust_health(reply.health)},
        views.trust(session.style, reply.health),
        ExitCode.OK if reply.health.healthy else ExitCode.PROBLEM_FOUND,
    )


async def status(args: argparse.Namespace, session: Session) -> Result:
    """Whether the Administrator and the License Server answer (and the Activation Server
    with --vendor)."""
    checks: list[dict[str, str]] = []

    async def health(service: Service, target: str) -> None:
        check = session.connections.channel(target).unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        try:
            reply = await session.connections.call(
                service, check, health_pb2.HealthCheckRequest(), target=target
            )
        except CliError as error:
            state, detail = "unreachable", error.failure.message
        else:
            status_name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            state, detail = status_name.lower(), ""
        checks.append(
            {"service": service.value, "target": target, "state": state, "detail": detail}
        )

    await health(Service.ADMINISTRATOR, session.settings.administrator.value)
    try:
        link = await session.connections.license_server()
    except CliError as error:
        checks.append(
            {
                "service": LICENSE_SERVER.value,
                "target": session.settings.license_server.value,
                "state": "unreachable",
                "detail": error.failure.message,
            }
        )
    else:
        await health(LICENSE_SERVER, link.target)
        checks[-1]["detail"] = f"host {link.host_id}"
    if args.vendor:
        await health(Service.ACTIVATION_SERVER, session.settings.activation_server.value)
    tones = {"serving": "ok", "unreachable": "bad"}
    text = table(
        session.style,
        [Column("Service"), Column("Target"), Column("State"), Column("Detail")],
        [
            [
                c["service"],
                c["target"],
                Cell(c["state"], tones.get(c["state"], "warn")),
                c["detail"],
            ]
            for c in checks
        ],
    )
    healthy = all(c["state"] == "serving" for c in checks)
    return Result({"services": checks}, text, ExitCode.OK if healthy else ExitCode.UNREACHABLE)


def register(commands: Subcommands) -> None:
    """The License Server's commands: licenses, leases, revoke, trust, status."""
    p = add_command(
        commands,
        "licenses",
        licenses,
        "License Information: activated, used, available, queued, required, violation",
        "EBO's License Information, straight from the License Server: per feature the seats "
        "activated, used, available, the clients queued and the seats required, and the "
        "violation alarm (fewer activated than required); then the certificates it holds.",
        [
            "tessera licenses",
            "tessera licenses --feature server.device.es",
            "tessera licenses --json",
        ],
    )
    p.add_argument("--feature", help="only this feature")

    p = add_command(
        commands,
        "leases",
        leases,
        "who holds which seats since when, and who waits (needs the operator token)",
        "Every lease on the License Server: client host, user and client, since when, until "
        "when it lives without a heartbeat; and the clients queued for a seat, in order.",
        ["tessera leases", "tessera leases --feature client.station --json"],
    )
    p.add_argument("--feature", help="only this feature")

    p = add_command(
        commands,
        "revoke",
        revoke,
        "free a lease's seats now, like lmremove (needs the operator token)",
        "Revoke a lease: its seats are free at once and its holder is told on its stream "
        "(REVOKED_BY_OPERATOR) with your reason.",
        ["tessera revoke 2712af2f", 'tessera revoke 2712af2f --reason "ws-07 is being replaced"'],
    )
    p.add_argument(
        "lease", metavar="LEASE", help="the lease id or any unique prefix (`tessera leases`)"
    )
    p.add_argument(
        "--reason", default="revoked by the operator", help="told to the holder and logged"
    )

    p = add_command(
        commands,
        "trust",
        trust,
        "trusted storage's health, per certificate, and what a repair would do",
        "Re-verify trusted storage now: whether each certificate serves and if not why "
        "(database copied, backup restored, clock set back, machine changed, edited rows), "
        "and what `tessera repair` would do. Exits 5 when something is broken.",
        ["tessera trust", "tessera trust --json"],
    )

    p = add_command(
        commands,
        "status",
        status,
        "whether the Administrator and the License Server answer",
        "Check that the Administrator and the License Server answer their health checks (and "
        "the Activation Server with --vendor). Exits 3 when one does not.",
        ["tessera status", "tessera status --vendor"],
    )
    p.add_argument("--vendor", action="store_true", help="check the Activation Server too")
