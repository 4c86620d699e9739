"""The command line: every subcommand, its arguments, its help and its examples.

Only parsing lives here; each subcommand names the coroutine in ``commands`` that runs it
(``run`` in the parsed namespace). The connection and output options are accepted both
before and after the subcommand (``tessera --json licenses`` = ``tessera licenses --json``).
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Sequence
from importlib import metadata
from typing import NoReturn

from tessera_cli.commands import config, journal, offline, online, site, vendor
from tessera_cli.failures import UsageError
from tessera_cli.session import Command

EXIT_CODES = """\
exit codes:
  0  done
  1  a service refused (nothing changed), or failed
  2  usage: a flag, argument, ID or file is not valid
  3  a service, or a peer it needs, is unreachable
  4  the bearer token is missing or was not accepted
  5  a check found a problem (trust: storage broken; vendor audit verify: log altered)"""

SETTINGS = """\
settings: each from its flag, else the environment (TESSERA_ADMINISTRATOR,
TESSERA_LICENSE_SERVER, TESSERA_ACTIVATION_SERVER, TESSERA_OPERATOR_TOKEN[_FILE],
TESSERA_VENDOR_TOKEN[_FILE], TESSERA_TIMEOUT, TESSERA_DATA_DIR, TESSERA_CONFIG,
TESSERA_TLS[_CA|_CERT|_KEY|_SERVER_NAME]), else
~/.config/tessera/cli.toml, else the `make up` defaults; tokens also from the `make up`
data directory (./var). `tessera config` shows what is in force.
Guides: docs/operator.md, docs/vendor.md."""


COMMON_NOTE = """\
Every command also takes --no-color and the connection options of `tessera --help`
(--administrator, --license-server, --activation-server, --administrator-token-file,
--operator-token-file, --vendor-token-file, --timeout, --data-dir, --config, --tls,
--tls-ca, --tls-cert, --tls-key, --tls-server-name)."""


class Parser(argparse.ArgumentParser):
    """Usage errors become UsageError, so --json reports them as JSON too."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}", f"`{self.prog} --help` shows how to use it.")


def _version() -> str:
    try:
        return metadata.version("tessera")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare tree
        return "unknown"


def _common(subcommand: bool) -> Parser:
    """The connection and output options. After a subcommand they default to SUPPRESS so
    they never overwrite the same option given before it."""
    parent = Parser(add_help=False)

    def default(value: object) -> object:
        return argparse.SUPPRESS if subcommand else value

    def shown(text: str) -> str:
        # After a subcommand only --json is listed; COMMON_NOTE names the rest.
        return argparse.SUPPRESS if subcommand else text

    output = parent.add_argument_group("output")
    output.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help='print one JSON document on stdout (the result, or {"error": …})',
    )
    output.add_argument(
        "--no-color",
        action="store_true",
        default=default(False),
        help=shown("no colours (also NO_COLOR=1; colours are only used on a terminal anyway)"),
    )
    where = parent.add_argument_group("connection (see `tessera config`)")
    where.add_argument(
        "--administrator",
        metavar="HOST:PORT",
        default=default(None),
        help=shown("the Administrator [TESSERA_ADMINISTRATOR; 127.0.0.1:27200]"),
    )
    where.add_argument(
        "--license-server",
        metavar="ADDRESS",
        default=default(None),
        help=shown(
            "the License Server, EBO style: @host, port@host, ';'-separated "
            "[TESSERA_LICENSE_SERVER; @localhost]"
        ),
    )
    where.add_argument(
        "--activation-server",
        metavar="HOST:PORT",
        default=default(None),
        help=shown("the vendor's Activation Server [TESSERA_ACTIVATION_SERVER; 127.0.0.1:27100]"),
    )
    where.add_argument(
        "--administrator-token-file",
        metavar="FILE",
        default=default(None),
        help=shown(
            "the Administrator's operator token file [TESSERA_ADMINISTRATOR_TOKEN, "
            "TESSERA_ADMINISTRATOR_TOKEN_FILE; var/administrator/operator-token]"
        ),
    )
    where.add_argument(
        "--operator-token-file",
        metavar="FILE",
        default=default(None),
        help=shown(
            "operator token file [TESSERA_OPERATOR_TOKEN, TESSERA_OPERATOR_TOKEN_FILE; "
            "var/license_server/operator-token]"
        ),
    )
    where.add_argument(
        "--vendor-token-file",
        metavar="FILE",
        default=default(None),
        help=shown(
            "vendor-staff token file [TESSERA_VENDOR_TOKEN, TESSERA_VENDOR_TOKEN_FILE; "
            "var/activation_server/vendor-token]"
        ),
    )
    where.add_argument(
        "--timeout",
        metavar="SECONDS",
        default=default(None),
        help=shown("how long to wait for an answer [TESSERA_TIMEOUT; 60]"),
    )
    where.add_argument(
        "--data-dir",
        metavar="DIR",
        default=default(None),
        help=shown("the `make up` data directory to read token files from [TESSERA_DATA_DIR; var]"),
    )
    where.add_argument(
        "--config",
        metavar="FILE",
        default=default(None),
        help=shown("config file [TESSERA_CONFIG; ~/.config/tessera/cli.toml]"),
    )
    tls = parent.add_argument_group("TLS (one setting for every service; default: plaintext)")
    tls.add_argument(
        "--tls",
        action="store_true",
        default=default(None),
        help=shown("speak TLS, trusting the system's CAs unless --tls-ca [TESSERA_TLS]"),
    )
    tls.add_argument(
        "--tls-ca",
        metavar="FILE",
        default=default(None),
        help=shown("PEM CA that signed the services' certificates; implies --tls [TESSERA_TLS_CA]"),
    )
    tls.add_argument(
        "--tls-cert",
        metavar="FILE",
        default=default(None),
        help=shown("PEM client certificate for mutual TLS [TESSERA_TLS_CERT]"),
    )
    tls.add_argument(
        "--tls-key",
        metavar="FILE",
        default=default(None),
        help=shown("PEM key of --tls-cert, mode 0600 [TESSERA_TLS_KEY]"),
    )
    tls.add_argument(
        "--tls-server-name",
        metavar="NAME",
        default=default(None),
        help=shown(
            "the name the services' certificates carry, when not the host dialled "
            "[TESSERA_TLS_SERVER_NAME]"
        ),
    )
    return parent


_SUB_COMMON = _common(subcommand=True)


def _examples(lines: Sequence[str]) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _add(
    subparsers: argparse._SubParsersAction[Parser],
    name: str,
    run: Command | None,
    summary: str,
    description: str,
    examples: Sequence[str],
) -> Parser:
    parser = subparsers.add_parser(
        name,
        help=summary,
        description=textwrap.fill(description, 88),
        epilog=_examples(examples) + "\n\n" + COMMON_NOTE + "\n\n" + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_SUB_COMMON],
    )
    if run is not None:
        parser.set_defaults(run=run)
    parser.set_defaults(help_of=parser)
    return parser


def _operation_id(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--operation-id",
        metavar="ID",
        help="resume this journaled operation (printed when one was cut off); default: a new one",
    )


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _line_choice(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "id",
        metavar="ID",
        help="an activation ID (ACT-…), or an Entitlement ID (ENT-…) with --feature",
    )
    parser.add_argument(
        "--feature", help="with an Entitlement ID: the line's feature, e.g. client.station"
    )
    parser.add_argument("--count", type=_positive, default=1, help="seats to activate (default 1)")


def _certificate_choice(parser: argparse.ArgumentParser, action: str) -> None:
    parser.add_argument(
        "certificate",
        nargs="?",
        metavar="CERTIFICATE",
        help="the certificate id, or any unique prefix of it (`tessera licenses` lists them)",
    )
    parser.add_argument(
        "--feature",
        help=f"{action} the certificate of this feature (when the License Server holds one)",
    )


def _return_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--count",
        type=_positive,
        default=0,
        help="seats to return, where the certificate allows single seats (default: all)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="revoke leases on the seats instead of refusing while they are in use",
    )


def _repair_force(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--force",
        action="store_true",
        help="repair although trusted storage is healthy; it counts as one of the year's "
        "repairs at the vendor",
    )


def _file_output(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help=f"where to write the {what} (a file, a directory, or - for stdout; default: "
        "the suggested name in this directory)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing file")


def build() -> Parser:
    parser = Parser(
        prog="tessera",
        description="Operate Tessera licenses: what EBO's License Administrator and FlexNet's "
        "lmutil do, against the Administrator, the License Server and (for vendor staff) "
        "the Activation Server.",
        epilog=SETTINGS + "\n\n" + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_common(subcommand=False)],
    )
    parser.add_argument("--version", action="version", version=f"tessera {_version()}")
    parser.set_defaults(run=None, help_of=parser)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=Parser)

    # --- the License Administrator ------------------------------------------------------
    p = _add(
        commands,
        "order",
        online.order,
        "look an order up: its lines and the seats left",
        "Look an order up at the vendor (through the Administrator) by the Entitlement ID "
        "on its entitlement certificate: every line, with its activation ID and the seats "
        "sold, activated and left.",
        ["tessera order ENT-MSR2-T2S5-0X07", "tessera order ENT-MSR2-T2S5-0X07 --json"],
    )
    p.add_argument("entitlement_id", metavar="ENTITLEMENT_ID")

    p = _add(
        commands,
        "activate",
        online.activate,
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
    _line_choice(p)
    _operation_id(p)

    p = _add(
        commands,
        "return",
        online.return_,
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
    _certificate_choice(p, "return")
    _return_options(p)
    _operation_id(p)

    p = _add(
        commands,
        "repair",
        online.repair,
        "re-issue the licenses after trusted storage broke",
        "Ask the vendor to re-issue exactly what it records this License Server holds, bound "
        "to this machine, after trusted storage broke (`tessera trust` says why). Needs the "
        "vendor; at most 4 repairs per License Server in any 365 days, so a repair of healthy "
        "trusted storage is refused (NOTHING_TO_REPAIR) unless --force says it may count.",
        ["tessera trust", "tessera repair", "tessera repair --force"],
    )
    _repair_force(p)
    _operation_id(p)

    _add(
        commands,
        "check-in",
        online.check_in,
        "check the License Server in with the vendor now",
        "Ask the vendor (through the Administrator) whether it still records the licenses "
        "on the License Server as this server's. Certificates it re-bound to another host "
        "(a copy of this server's data directory repaired elsewhere) or no longer records "
        "stop serving; overdue ones serve again. Only needed where the vendor's check-in "
        "policy asks for it, and the Administrator does that by itself when one is due. "
        "Exits 5 when seats do not serve.",
        ["tessera check-in", "tessera check-in --license-server 27001@es-host --json"],
    )

    p = _add(
        commands,
        "move",
        online.move,
        "move a certificate's seats to another License Server",
        "Return a certificate from one License Server (--from, default --license-server) and "
        "activate the same seats on another (--to), as one resumable operation. Point the "
        "clients at the new address afterwards.",
        [
            "tessera move --feature server.enterprise.base --to @new-es-host",
            "tessera move 3f2a91c0 --from 27000@old-host --to 27000@new-host --force",
        ],
    )
    _certificate_choice(p, "move")
    p.add_argument(
        "--to", required=True, metavar="ADDRESS", help="the License Server the seats go to"
    )
    p.add_argument("--from", dest="source", metavar="ADDRESS", help="the License Server they leave")
    p.add_argument(
        "--force", action="store_true", help="revoke leases on the seats instead of refusing"
    )
    _operation_id(p)

    # --- offline, by file ---------------------------------------------------------------
    p = _add(
        commands,
        "export-request",
        None,
        "air-gapped site: write a request file for the vendor",
        "Prepare an activation, return or repair on an air-gapped License Server and write "
        "the signed request (about 700 bytes of text) to a file. Carry it to a machine with "
        "Internet access, `tessera submit` it there, carry the answer back and "
        "`tessera import-response` it here.",
        [
            "tessera export-request activate ENT-MSR2-T2S5-0X07 --feature client.station --count 2",
            "tessera export-request return --feature client.station -o /media/usb",
            "tessera export-request repair -o repair-request.txt",
        ],
    )
    kinds = p.add_subparsers(
        title="what to request", metavar="KIND", required=True, parser_class=Parser
    )
    k = _add(
        kinds,
        "activate",
        offline.export_request,
        "activate seats of an order line",
        "Write an activation request file.",
        ["tessera export-request activate ACT-K8TD-297G-HW0T --count 2"],
    )
    _line_choice(k)
    _file_output(k, "request file")
    _operation_id(k)
    k.set_defaults(kind="activate")
    k = _add(
        kinds,
        "return",
        offline.export_request,
        "return a certificate",
        "Write a return request file; the seats stop serving now.",
        ["tessera export-request return --feature client.station"],
    )
    _certificate_choice(k, "return")
    _return_options(k)
    _file_output(k, "request file")
    _operation_id(k)
    k.set_defaults(kind="return")
    k = _add(
        kinds,
        "repair",
        offline.export_request,
        "repair trusted storage",
        "Write a repair request file (refused while trusted storage is healthy, unless --force).",
        ["tessera export-request repair"],
    )
    _repair_force(k)
    _file_output(k, "request file")
    _operation_id(k)
    k.set_defaults(kind="repair")

    p = _add(
        commands,
        "submit",
        offline.submit,
        "on a machine with Internet access: take a request file to the vendor",
        "Take a request file written by `tessera export-request` to the vendor (through this "
        "machine's Administrator; no License Server needed) and write the vendor's answer. A "
        "refused return is an answer too: importing it lets the seats serve again.",
        [
            "tessera submit tessera-activate-…-request.txt",
            "tessera submit /media/usb/tessera-return-…-request.txt -o /media/usb",
        ],
    )
    p.add_argument("request_file", metavar="REQUEST_FILE")
    _file_output(p, "response file")

    p = _add(
        commands,
        "import-response",
        offline.import_response,
        "air-gapped site: install the vendor's answer file",
        "Install the answer file `tessera submit` wrote on the License Server that exported "
        "the request (any other refuses it). Importing twice changes nothing.",
        ["tessera import-response tessera-activate-…-response.txt"],
    )
    p.add_argument("response_file", metavar="RESPONSE_FILE")

    # --- the License Server (lmstat, lmremove) ------------------------------------------
    p = _add(
        commands,
        "licenses",
        site.licenses,
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

    p = _add(
        commands,
        "leases",
        site.leases,
        "who holds which seats since when, and who waits (needs the operator token)",
        "Every lease on the License Server: client host, user and client, since when, until "
        "when it lives without a heartbeat; and the clients queued for a seat, in order.",
        ["tessera leases", "tessera leases --feature client.station --json"],
    )
    p.add_argument("--feature", help="only this feature")

    p = _add(
        commands,
        "revoke",
        site.revoke,
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

    p = _add(
        commands,
        "trust",
        site.trust,
        "trusted storage's health, per certificate, and what a repair would do",
        "Re-verify trusted storage now: whether each certificate serves and if not why "
        "(database copied, backup restored, clock set back, machine changed, edited rows), "
        "and what `tessera repair` would do. Exits 5 when something is broken.",
        ["tessera trust", "tessera trust --json"],
    )

    p = _add(
        commands,
        "status",
        site.status,
        "whether the Administrator and the License Server answer",
        "Check that the Administrator and the License Server answer their health checks (and "
        "the Activation Server with --vendor). Exits 3 when one does not.",
        ["tessera status", "tessera status --vendor"],
    )
    p.add_argument("--vendor", action="store_true", help="check the Activation Server too")

    # --- the Administrator's records ----------------------------------------------------
    p = _add(
        commands,
        "registration",
        journal.registration,
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
    registration = p.add_subparsers(
        title="subcommands", metavar="[SUBCOMMAND]", parser_class=Parser
    )
    _add(
        registration,
        "show",
        journal.registration,
        "show the details (the default)",
        "Show the registration details.",
        ["tessera registration show"],
    )
    s = _add(
        registration,
        "set",
        journal.set_registration,
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

    p = _add(
        commands,
        "operations",
        journal.operations,
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
    p.add_argument("--limit", type=_positive, default=100, help="at most this many (default 100)")
    ops = p.add_subparsers(title="subcommands", metavar="[SUBCOMMAND]", parser_class=Parser)
    s = _add(
        ops,
        "show",
        journal.operation,
        "show one operation",
        "Show one journaled operation.",
        ["tessera operations show dd1b9de2"],
    )
    s.add_argument("operation_id", metavar="OPERATION_ID", help="the id or any unique prefix")

    p = _add(
        commands,
        "config",
        config.show,
        "the settings in force and where each came from",
        "Show the addresses, timeout and token sources in force, and where each came from: "
        "a flag, the environment, the config file, the `make up` data directory, a default.",
        ["tessera config", "TESSERA_LICENSE_SERVER=27001@es-host tessera config"],
    )

    _vendor(commands)
    return parser


def _vendor(commands: argparse._SubParsersAction[Parser]) -> None:
    p = _add(
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

    e = _add(
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
    c = _add(
        entitlements,
        "create",
        vendor.create_entitlement,
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
    c.add_argument(
        "--line", action="append", required=True, metavar="SPEC", help=vendor.LINE_SYNTAX
    )
    s = _add(
        entitlements,
        "show",
        vendor.show_entitlement,
        "show an order and what is left of it",
        "Show an order.",
        ["tessera vendor entitlements show ENT-MSR2-T2S5-0X07"],
    )
    s.add_argument("entitlement_id", metavar="ENTITLEMENT_ID")

    a = _add(
        vendor_commands,
        "activations",
        vendor.activations,
        "which host holds how many seats of which line",
        "List activations: certificate, order, feature, seats, host and whether the host "
        "still holds them (active, returned, force_returned).",
        ["tessera vendor activations", "tessera vendor activations --host 465R-QBR2-AV5K-9ZV0"],
    )
    a.add_argument("--entitlement", metavar="ENTITLEMENT_ID", help="only this order")
    a.add_argument("--host", metavar="HOST_ID", help="only this License Server host")

    au = _add(
        vendor_commands,
        "audit",
        vendor.audit,
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
    _audit_options(au, subcommand=False)
    audit_commands = au.add_subparsers(
        title="subcommands", metavar="[SUBCOMMAND]", parser_class=Parser
    )
    lst = _add(
        audit_commands,
        "list",
        vendor.audit,
        "page through the log (the default)",
        "Page through the audit log.",
        ["tessera vendor audit list --after 100"],
    )
    _audit_options(lst, subcommand=True)
    _add(
        audit_commands,
        "verify",
        vendor.verify_audit,
        "check the hash chain",
        "Re-compute the audit log's hash chain; exit 5 when it is not intact.",
        ["tessera vendor audit verify"],
    )

    f = _add(
        vendor_commands,
        "force-return",
        vendor.force_return,
        "credit back a certificate stranded on a dead License Server",
        "Credit a certificate's seats back to its order without the host's signature, for a "
        "License Server that died. The reason goes to the audit log.",
        ['tessera vendor force-return 3f2a91c0 --reason "server destroyed in fire, ticket 4411"'],
    )
    f.add_argument(
        "certificate", metavar="CERTIFICATE", help="the certificate id or a unique prefix"
    )
    f.add_argument("--reason", required=True, help="why (required; audited)")

    ks = _add(
        vendor_commands,
        "keys",
        vendor.keys,
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
    kl = _add(
        key_commands,
        "list",
        vendor.keys,
        "list the keys (the default)",
        "List the vendor keys.",
        ["tessera vendor keys list --pub"],
    )
    kl.add_argument(
        "--pub", action="store_true", default=argparse.SUPPRESS, help="print a vendor-keys.pub file"
    )
    _add(
        key_commands,
        "rotate",
        vendor.rotate_key,
        "make a new signing key",
        "Make a new vendor signing key the one that signs from now on.",
        ["tessera vendor keys rotate"],
    )


def _audit_options(parser: argparse.ArgumentParser, subcommand: bool) -> None:
    def default(value: object) -> object:
        return argparse.SUPPRESS if subcommand else value

    parser.add_argument("--subject", default=default(None), help="only entries about this (an id)")
    parser.add_argument(
        "--after", type=int, default=default(0), metavar="SEQUENCE", help="entries after this one"
    )
    parser.add_argument(
        "--limit",
        type=_positive,
        default=default(100),
        help="at most this many (default 100, at most 1000)",
    )
    parser.add_argument("--all", action="store_true", default=default(False), help="every page")
