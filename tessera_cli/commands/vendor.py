"""For vendor staff, on the Activation Server: entitlements, activations, the audit log,
forced returns and signing keys. Everything but looking an order up and listing the
public keys needs the vendor-staff token."""

from __future__ import annotations

import argparse
import datetime as dt
import re

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from tessera.activation.v1 import activation_pb2 as apb
from tessera.common.v1.common_pb2 import LicenseKind
from tessera_cli import records, views
from tessera_cli.failures import CliError, ExitCode, Failure, Service, UsageError
from tessera_cli.session import Result, Session
from tessera_cli.settings import Token

VENDOR = Service.ACTIVATION_SERVER
_FEATURE_COUNT = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*=\s*(\d+)\s*$")
_SPAN = re.compile(r"^(\d+)([dhm]?)$")
_SPAN_SECONDS = {"d": 86400, "": 86400, "h": 3600, "m": 60}
LINE_SYNTAX = (
    "FEATURE=COUNT[,local][,partial][,expires=DATE][,days=N][,maintenance=DATE]"
    "[,check-in=N[d|h|m]][,grace=N[d|h|m]], e.g. client.station=10,partial or "
    "server.device.es=40,expires=2027-12-31 or client.station=5,check-in=7d,grace=2d"
)


def vendor_token(session: Session) -> Token:
    token = session.settings.vendor_token
    if token is None:
        raise CliError(
            Failure(
                ExitCode.CREDENTIALS,
                "this command needs the vendor-staff token, and none is set",
                "Set TESSERA_VENDOR_TOKEN (or --vendor-token-file, or vendor_token in the "
                "config file). The Activation Server keeps it in its data directory as "
                "vendor-token; with `make up` it is var/activation_server/vendor-token, read "
                "by itself when you run tessera from the checkout.",
                reason="CREDENTIAL_MISSING",
                service=VENDOR.value,
            )
        )
    return token


def _moment(text: str, what: str) -> Timestamp:
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{what}: {text!r} is not a date (YYYY-MM-DD) or ISO 8601 time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    stamp = Timestamp()
    stamp.FromDatetime(moment.astimezone(dt.UTC))
    return stamp


def parse_line(spec: str) -> apb.NewEntitlementLine:
    """One ``--line``: ``FEATURE=COUNT`` and optional terms, comma-separated."""
    head, *terms = spec.split(",")
    match = _FEATURE_COUNT.match(head)
    if match is None:
        raise UsageError(f"--line {spec!r}: write {LINE_SYNTAX}")
    line = apb.NewEntitlementLine(
        feature=match.group(1), count=int(match.group(2)), kind=LicenseKind.LICENSE_KIND_NETWORK
    )
    for term in terms:
        key, _, value = (part.strip() for part in term.partition("="))
        if key == "local" and not value:
            line.kind = LicenseKind.LICENSE_KIND_LOCAL
        elif key == "partial" and not value:
            line.partial_return_allowed = True
        elif key == "expires" and value:
            line.expires_at.CopyFrom(_moment(value, f"--line {spec!r} expires"))
        elif key == "maintenance" and value:
            line.maintenance_ends_at.CopyFrom(_moment(value, f"--line {spec!r} maintenance"))
        elif key == "days" and value.isdigit() and int(value) > 0:
            line.duration.CopyFrom(Duration(seconds=int(value) * 86400))
        elif key in ("check-in", "grace") and _SPAN.match(value):
            span = _SPAN.match(value)
            assert span is not None
            seconds = int(span.group(1)) * _SPAN_SECONDS[span.group(2)]
            target = line.check_in_interval if key == "check-in" else line.check_in_grace
            target.CopyFrom(Duration(seconds=seconds))
        else:
            raise UsageError(
                f"--line {spec!r}: {term.strip()!r} is not a term; write {LINE_SYNTAX}"
            )
    return line


async def create_entitlement(args: argparse.Namespace, session: Session) -> Result:
    lines = [parse_line(spec) for spec in args.line]
    token = vendor_token(session)
    vendor = session.connections.vendor()
    reply = await session.connections.call(
        VENDOR,
        vendor.CreateEntitlement,
        apb.CreateEntitlementRequest(
            customer_organization=args.customer, contact=args.contact or "", lines=lines
        ),
        token=token,
    )
    return Result(
        {"entitlement": records.entitlement(reply.entitlement)},
        session.style.ok("Created")
        + " the order:\n\n"
        + views.entitlement(session.style, reply.entitlement, hint=False),
    )


async def show_entitlement(args: argparse.Namespace, session: Session) -> Result:
    activation = session.connections.activation()
    reply = await session.connections.call(
        VENDOR, activation.GetOrder, apb.GetOrderRequest(entitlement_id=args.entitlement_id)
    )
    return Result(
        {"entitlement": records.entitlement(reply.entitlement)},
        views.entitlement(session.style, reply.entitlement, hint=False),
    )


async def activations(args: argparse.Namespace, session: Session) -> Result:
    token = vendor_token(session)
    vendor = session.connections.vendor()
    reply = await session.connections.call(
        VENDOR,
        vendor.ListActivations,
        apb.ListActivationsRequest(entitlement_id=args.entitlement or "", host_id=args.host or ""),
        token=token,
    )
    return Result(
        {"activations": [records.activation(a) for a in reply.activations]},
        views.activations(session.style, reply.activations),
    )


async def audit(args: argparse.Namespace, session: Session) -> Result:
    token = vendor_token(session)
    vendor = session.connections.vendor()
    request = apb.GetAuditLogRequest(
        subject=args.subject or "", after_sequence=args.after, page_size=args.limit
    )
    reply = await session.connections.call(VENDOR, vendor.GetAuditLog, request, token=token)
    if args.all:
        entries = list(reply.entries)
        while reply.next_after_sequence:
            request.after_sequence = reply.next_after_sequence
            reply = await session.connections.call(VENDOR, vendor.GetAuditLog, request, token=token)
            entries.extend(reply.entries)
        del reply.entries[:]
        reply.entries.extend(entries)
    return Result(
        {
            "entries": [records.audit_entry(e) for e in reply.entries],
            "next_after_sequence": reply.next_after_sequence,
            "head_sequence": reply.head_sequence,
            "head_hash": reply.head_hash.hex(),
        },
        views.audit_log(session.style, reply),
    )


async def verify_audit(args: argparse.Namespace, session: Session) -> Result:
    token = vendor_token(session)
    vendor = session.connections.vendor()
    async with session.progress.show("Re-computing the audit log's hash chain"):
        reply = await session.connections.call(
            VENDOR, vendor.VerifyAuditLog, apb.VerifyAuditLogRequest(), token=token
        )
    return Result(
        {
            "intact": reply.intact,
            "entries_checked": reply.entries_checked,
            "first_bad_sequence": reply.first_bad_sequence,
            "problem": reply.problem,
            "head_sequence": reply.head_sequence,
            "head_hash": reply.head_hash.hex(),
        },
        views.audit_verified(session.style, reply),
        ExitCode.OK if reply.intact else ExitCode.PROBLEM_FOUND,
    )


async def _certificate_id(session: Session, token: Token, prefix: str) -> str:
    """The certificate of an active activation whose id starts with ``prefix``."""
    vendor = session.connections.vendor()
    reply = await session.connections.call(
        VENDOR, vendor.ListActivations, apb.ListActivationsRequest(), token=token
    )
    matching = sorted(
        {a.certificate_id for a in reply.activations if a.certificate_id.startswith(prefix)}
    )
    if len(matching) == 1:
        return matching[0]
    if not matching:
        return prefix  # the Activation Server says what is wrong with it
    raise UsageError(
        f"{len(matching)} certificates start with {prefix!r}; give more of the id",
        "Candidates:\n" + "\n".join(f"  {c}" for c in matching),
    )


async def force_return(args: argparse.Namespace, session: Session) -> Result:
    if not args.reason.strip():
        raise UsageError("--reason must say why (it goes to the audit log)")
    token = vendor_token(session)
    certificate_id = await _certificate_id(session, token, args.certificate.strip())
    vendor = session.connections.vendor()
    reply = await session.connections.call(
        VENDOR,
        vendor.ForceReturn,
        apb.ForceReturnRequest(certificate_id=certificate_id, reason=args.reason),
        token=token,
    )
    return Result(
        {"activation": records.activation(reply.activation)},
        views.force_returned(session.style, reply.activation),
    )


async def keys(args: argparse.Namespace, session: Session) -> Result:
    activation = session.connections.activation()
    reply = await session.connections.call(
        VENDOR, activation.GetVendorKeys, apb.GetVendorKeysRequest()
    )
    if args.pub:
        text = "# Tessera vendor public keys: trust every key listed here.\n" + "\n".join(
            f"{k.public_key.hex()}  # {k.key_id}" for k in reply.keys
        )
    else:
        text = views.vendor_keys(session.style, reply.keys)
    return Result({"keys": [records.vendor_key(k) for k in reply.keys]}, text)


async def rotate_key(args: argparse.Namespace, session: Session) -> Result:
    token = vendor_token(session)
    vendor = session.connections.vendor()
    reply = await session.connections.call(
        VENDOR, vendor.RotateSigningKey, apb.RotateSigningKeyRequest(), token=token
    )
    text = "\n".join(
        [
            session.style.ok("Rotated")
            + f": {reply.key.key_id} signs from now on; the older keys keep verifying.",
            "",
            views.vendor_keys(session.style, reply.keys),
            "",
            "License Servers must trust the new key before they install anything it signs:",
            "give them the new vendor-keys.pub (`tessera vendor keys --pub`).",
        ]
    )
    return Result(
        {"key": records.vendor_key(reply.key), "keys": [records.vendor_key(k) for k in reply.keys]},
        text,
    )
