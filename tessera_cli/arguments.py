"""What each area's ``register`` builds its subcommands with.

``Parser`` (usage errors become UsageError), ``add_command`` (one subcommand with its help,
examples, the connection options and the exit codes), and the arguments more than one
area declares: an order line, a certificate, a return's and a repair's options,
``--operation-id`` and whole numbers. The areas (``tessera_cli.commands``) import this
module; it imports none of them.
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Sequence
from typing import NoReturn, TypeAlias

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

COMMON_NOTE = """\
Every command also takes --no-color and the connection options of `tessera --help`
(--administrator, --license-server, --activation-server, --administrator-token-file,
--operator-token-file, --vendor-token-file, --timeout, --data-dir, --config, --tls,
--tls-ca, --tls-cert, --tls-key, --tls-server-name)."""


class Parser(argparse.ArgumentParser):
    """Usage errors become UsageError, so --json reports them as JSON too."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}", f"`{self.prog} --help` shows how to use it.")


#: The subcommands of a command, to which ``add_command`` adds one.
Subcommands: TypeAlias = "argparse._SubParsersAction[Parser]"


def common_options(subcommand: bool) -> Parser:
    """The connection and output options, of the top-level parser or (``subcommand``) of
    every subcommand. After a subcommand they default to SUPPRESS so they never overwrite
    the same option given before it."""
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


_SUB_COMMON = common_options(subcommand=True)


def _examples(lines: Sequence[str]) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def add_command(
    subparsers: Subcommands,
    name: str,
    run: Command | None,
    summary: str,
    description: str,
    examples: Sequence[str],
) -> Parser:
    """Add subcommand ``name`` running ``run`` (None: it only groups subcommands of its
    own), with its one-line ``summary``, a ``description`` paragraph, ``examples``, the
    connection options and the exit codes; its own arguments are added to the result."""
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


def add_operation_id(parser: argparse.ArgumentParser) -> None:
    """``--operation-id``: resume a journaled operation (activate, return, repair, move)."""
    parser.add_argument(
        "--operation-id",
        metavar="ID",
        help="resume this journaled operation (printed when one was cut off); default: a new one",
    )


def positive(text: str) -> int:
    """An argparse ``type``: a whole number of 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def add_line_choice(parser: argparse.ArgumentParser) -> None:
    """Which order line to activate, and how many seats: ``ID [--feature] [--count]``."""
    parser.add_argument(
        "id",
        metavar="ID",
        help="an activation ID (ACT-…), or an Entitlement ID (ENT-…) with --feature",
    )
    parser.add_argument(
        "--feature", help="with an Entitlement ID: the line's feature, e.g. client.station"
    )
    parser.add_argument("--count", type=positive, default=1, help="seats to activate (default 1)")


def add_certificate_choice(parser: argparse.ArgumentParser, action: str) -> None:
    """Which certificate to ``action``: ``[CERTIFICATE] [--feature]``."""
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


def add_return_options(parser: argparse.ArgumentParser) -> None:
    """A return's ``--count`` and ``--force``."""
    parser.add_argument(
        "--count",
        type=positive,
        default=0,
        help="seats to return, where the certificate allows single seats (default: all)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="revoke leases on the seats instead of refusing while they are in use",
    )


def add_repair_force(parser: argparse.ArgumentParser) -> None:
    """A repair's ``--force`` (repair healthy trusted storage)."""
    parser.add_argument(
        "--force",
        action="store_true",
        help="repair although trusted storage is healthy; it counts as one of the year's "
        "repairs at the vendor",
    )
