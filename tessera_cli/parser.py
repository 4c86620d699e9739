"""The command line: the ``tessera`` parser with every area's subcommands.

Each area in ``tessera_cli.commands`` declares its own subcommands, arguments, help and
examples next to the coroutines that run them (its ``register``); ``build`` makes the
top-level parser and registers the areas in the order ``tessera --help`` lists them. The
connection and output options are accepted both before and after the subcommand
(``tessera --json licenses`` = ``tessera licenses --json``).
"""

from __future__ import annotations

import argparse
from importlib import metadata

from tessera_cli.arguments import EXIT_CODES, Parser, common_options
from tessera_cli.commands import config, journal, offline, online, site, vendor

SETTINGS = """\
settings: each from its flag, else the environment (TESSERA_ADMINISTRATOR,
TESSERA_LICENSE_SERVER, TESSERA_ACTIVATION_SERVER, TESSERA_OPERATOR_TOKEN[_FILE],
TESSERA_VENDOR_TOKEN[_FILE], TESSERA_TIMEOUT, TESSERA_DATA_DIR, TESSERA_CONFIG,
TESSERA_TLS[_CA|_CERT|_KEY|_SERVER_NAME]), else
~/.config/tessera/cli.toml, else the `make up` defaults; tokens also from the `make up`
data directory (./var). `tessera config` shows what is in force.
Guides: docs/operator.md, docs/vendor.md."""


def _version() -> str:
    try:
        return metadata.version("tessera")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare tree
        return "unknown"


def build() -> Parser:
    """The ``tessera`` parser; its namespace names the coroutine to run (``run``, None
    for no command) and the parser whose help to show (``help_of``)."""
    parser = Parser(
        prog="tessera",
        description="Operate Tessera licenses: what EBO's License Administrator and FlexNet's "
        "lmutil do, against the Administrator, the License Server and (for vendor staff) "
        "the Activation Server.",
        epilog=SETTINGS + "\n\n" + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common_options(subcommand=False)],
    )
    parser.add_argument("--version", action="version", version=f"tessera {_version()}")
    parser.set_defaults(run=None, help_of=parser)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=Parser)
    # The order of the areas is the order of the commands in `tessera --help`.
    for area in (online, offline, site, journal, config, vendor):
        area.register(commands)
    return parser
