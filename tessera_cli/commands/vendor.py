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
from tessera_cli.arguments import Parser, Subcommands, add_command, positive
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


def register(commands: Subcommands) -> None:
    """Vendor staff's ``tessera vendor`` and its subcommands."""
    p = add_command(
        commands,
        "vendor",
        None,
        "for vendor staff: entitlements, activations, audit log, forced returns, keys",
        "Vendor staff's commands, on the Activation Server (--activation-server). All but "
        "`entitlements show` and `keys` need the vendor-staff token. See docs/vendor.md.",
        [
            'tessera vendor entitlements create --customer "Harbour Tower" '
            "--line client.station=10",
            "tessera vendor activations --entitlement ENT-MSR2-T2S5-0X07",
            "tessera vendor audit verify",
        ],
    )
    vendor_commands = p.add_subparsers(
        title="subcommands", metavar="SUBCOMMAND", required=True, parser_class=Parser
    )

    e = add_command(
        vendor_commands,
        "entitlements",
        None,
        "create or show an order",
        "Create an order (entitlement) or show one.",
        ["tessera vendor entitlements show ENT-MSR2-T2S5-0X07"],
    )
    entitlements = e.add_subparsers(
        title="subcommands", metavar="SUBCOMMAND", required=True, parser_class=Parser
    )
    c = add_command(
        entitlements,
        "create",
        create_entitlement,
        "record an order and issue its Entitlement ID",
        "Record an order: one --line per feature sold. Terms after the count, comma-"
        "separated: local (node-locked, for client hosts), partial (single seats may be "
        "returned), expires=DATE, days=N (licenses expire N days after each activation), "
        "maintenance=DATE, check-in=N (the License Servers must check in with the vendor "
        "every N days, or 12h, 30m; off unless set) and grace=N (how long after a missed "
        "check-in the seats keep serving).",
        [
            'tessera vendor entitlements create --customer "Harbour Tower" '
            "--contact bms@harbour.example --line client.station=10 "
            "--line server.enterprise.base=1 --line server.device.es=40,partial",
            'tessera vendor entitlements create --customer "Site demo" '
            "--line client.station=2,local,days=30",
        ],
    )
    c.add_argument("--customer", required=True, help="the customer organisation")
    c.add_argument("--contact", help="the customer's contact")
    c.add_argument("--line", action="append", required=True, metavar="SPEC", help=LINE_SYNTAX)
    s = add_command(
        entitlements,
        "show",
        show_entitlement,
        "show an order and what is left of it",
        "Show an order.",
        ["tessera vendor entitlements show ENT-MSR2-T2S5-0X07"],
    )
    s.add_argument("entitlement_id", metavar="ENTITLEMENT_ID")

    a = add_command(
        vendor_commands,
        "activations",
        activations,
        "which host holds how many seats of which line",
        "List activations: certificate, order, feature, seats, host and whether the host "
        "still holds them (active, returned, force_returned).",
        ["tessera vendor activations", "tessera vendor activations --host 465R-QBR2-AV5K-9ZV0"],
    )
    a.add_argument("--entitlement", metavar="ENTITLEMENT_ID", help="only this order")
    a.add_argument("--host", metavar="HOST_ID", help="only this License Server host")

    au = add_command(
        vendor_commands,
        "audit",
        audit,
        "the hash-chained audit log of every vendor decision; `audit verify` checks it",
        "Page through the append-only audit log: every grant and refusal, oldest first. "
        "`tessera vendor audit verify` re-computes the hash chain and names the first "
        "edited, deleted or inserted entry (exit 5).",
        [
            "tessera vendor audit",
            "tessera vendor audit --subject ENT-MSR2-T2S5-0X07 --all --json",
            "tessera vendor audit verify",
        ],
    )
    _add_audit_options(au, subcommand=False)
    audit_commands = au.add_subparsers(
        title="subcommands", metavar="[SUBCOMMAND]", parser_class=Parser
    )
    lst = add_command(
        audit_commands,
        "list",
        audit,
        "page through the log (the default)",
        "Page through the audit log.",
        ["tessera vendor audit list --after 100"],
    )
    _add_audit_options(lst, subcommand=True)
    add_command(
        audit_commands,
        "verify",
        verify_audit,
        "check the hash chain",
        "Re-compute the audit log's hash chain; exit 5 when it is not intact.",
        ["tessera vendor audit verify"],
    )

    f = add_command(
        vendor_commands,
        "force-return",
        force_return,
        "credit back a certificate stranded on a dead License Server",
        "Credit a certificate's seats back to its order without the host's signature, for a "
        "License Server that died. The reason goes to the audit log.",
        ['tessera vendor force-return 3f2a91c0 --reason "server destroyed in fire, ticket 4411"'],
    )
    f.add_argument(
        "certificate", metavar="CERTIFICATE", help="the certificate id or a unique prefix"
    )
    f.add_argument("--reason", required=True, help="why (required; audited)")

    ks = add_command(
        vendor_commands,
        "keys",
        keys,
        "the vendor signing keys; `keys rotate` makes a new one",
        "List the vendor public keys License Servers and clients trust (--pub prints them as "
        "a vendor-keys.pub file). `keys rotate` makes a new signing key; the old ones keep "
        "verifying.",
        [
            "tessera vendor keys",
            "tessera vendor keys --pub > vendor-keys.pub",
            "tessera vendor keys rotate",
        ],
    )
    ks.add_argument("--pub", action="store_true", help="print a vendor-keys.pub file")
    key_commands = ks.add_subparsers(
        title="subcommands", metavar="[SUBCOMMAND]", parser_class=Parser
    )
    kl = add_command(
        key_commands,
        "list",
        keys,
        "list the keys (the default)",
        "List the vendor keys.",
        ["tessera vendor keys list --pub"],
    )
    kl.add_argument(
        "--pub", action="store_true", default=argparse.SUPPRESS, help="print a vendor-keys.pub file"
    )
    add_command(
        key_commands,
        "rotate",
        rotate_key,
        "make a new signing key",
        "Make a new vendor signing key the one that signs from now on.",
        ["tessera vendor keys rotate"],
    )


def _add_audit_options(parser: argparse.ArgumentParser, subcommand: bool) -> None:
    def default(value: object) -> object:
        return argparse.SUPPRESS if subcommand else value

    parser.add_argument("--subject", default=default(None), help="only entries about this (an id)")
    parser.add_argument(
        "--after", type=int, default=default(0), metavar="SEQUENCE", help="entries after this one"
    )
    parser.add_argument(
        "--limit",
        type=positive,
        default=default(100),
        help="at most this many (default 100, at most 1000)",
    )
    parser.add_argument("--all", action="store_true", default=default(False), help="every page")
