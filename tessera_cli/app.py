"""The ``tessera`` console script: parse, resolve settings, run a command, print, exit.

``App.run`` is the whole program as a coroutine with its streams, environment and working
directory passed in, so tests run it in-process next to in-process services.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from tessera_cli import parser as cli_parser
from tessera_cli.connections import Connections
from tessera_cli.failures import CliError, ExitCode, Failure, UsageError
from tessera_cli.session import Result, Session
from tessera_cli.settings import Flags, resolve
from tessera_cli.terminal import Progress, Style, wants_colour

_FLAG_NAMES = (
    "administrator",
    "license_server",
    "activation_server",
    "administrator_token_file",
    "operator_token_file",
    "vendor_token_file",
    "timeout",
    "data_dir",
    "config",
    "tls",
    "tls_ca",
    "tls_cert",
    "tls_key",
    "tls_server_name",
)


def _flags(args: argparse.Namespace) -> Flags:
    return Flags(**{name: getattr(args, name, None) for name in _FLAG_NAMES})


def failure_json(failure: Failure) -> dict[str, Any]:
    return {
        "error": {
            "message": failure.message,
            "hint": failure.hint,
            "code": failure.code,
            "reason": failure.reason,
            "metadata": dict(failure.metadata),
            "service": failure.service,
            "exit_code": int(failure.exit_code),
        }
    }


def _wrap(text: str, width: int, indent: str) -> str:
    lines = []
    for line in text.splitlines():
        if line.startswith(" "):
            lines.append(indent + line)
        else:
            lines.append(
                textwrap.fill(
                    line,
                    width,
                    initial_indent=indent,
                    subsequent_indent=indent,
                    break_long_words=False,
                    break_on_hyphens=False,
                )
            )
    return "\n".join(lines)


class App:
    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        stdout: TextIO | None = None,
        stderr: TextIO | None = None,
        home: Path | None = None,
    ) -> None:
        self.environ = os.environ if environ is None else environ
        self.cwd = cwd or Path.cwd()
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.home = home
        self.connections: Connections | None = None

    @property
    def operation_id(self) -> str:
        """The journaled operation under way, if any (for Ctrl-C's advice)."""
        return self.connections.operation_id if self.connections else ""

    async def run(self, argv: Sequence[str]) -> int:
        wants_json = "--json" in argv
        no_color = "--no-color" in argv
        try:
            with contextlib.redirect_stdout(self.stdout), contextlib.redirect_stderr(self.stderr):
                args = cli_parser.build().parse_args(argv)
        except SystemExit as done:  # --help, --version
            return int(done.code or 0)
        except CliError as error:
            return self.report(error.failure, wants_json, no_color)
        wants_json = bool(args.json)
        no_color = bool(args.no_color)
        if args.run is None:
            if wants_json:
                missing = UsageError("no command given", "`tessera --help` lists the commands.")
                return self.report(missing.failure, wants_json, no_color)
            args.help_of.print_help(self.stdout)
            return int(ExitCode.USAGE)
        try:
            settings = resolve(_flags(args), self.environ, self.cwd, self.home)
        except CliError as error:
            return self.report(error.failure, wants_json, no_color)
        self.connections = Connections(settings)
        session = Session(
            settings=settings,
            connections=self.connections,
            style=Style(not wants_json and wants_colour(self.stdout, self.environ, no_color)),
            progress=Progress(self.stderr, not wants_json and _isatty(self.stderr)),
            json=wants_json,
            cwd=self.cwd,
            stdout=self.stdout,
        )
        try:
            result = await args.run(args, session)
        except CliError as error:
            return self.report(error.failure, wants_json, no_color)
        finally:
            await self.connections.close()
        self.emit(result, wants_json)
        return int(result.exit_code)

    def emit(self, result: Result, wants_json: bool) -> None:
        if wants_json:
            self.stdout.write(json.dumps(result.data, indent=2, ensure_ascii=False) + "\n")
        elif result.text:
            self.stdout.write(result.text.rstrip("\n") + "\n")
        self.stdout.flush()

    def report(self, failure: Failure, wants_json: bool, no_color: bool) -> int:
        """Tell what went wrong: JSON on stdout, or words on stderr."""
        if wants_json:
            self.stdout.write(
                json.dumps(failure_json(failure), indent=2, ensure_ascii=False) + "\n"
            )
            self.stdout.flush()
            return int(failure.exit_code)
        style = Style(wants_colour(self.stderr, self.environ, no_color))
        width = max(40, min(100, shutil.get_terminal_size((100, 24)).columns) - 2)
        lines = [_wrap(f"{style.bad('error:')} {failure.message}", width, "")]
        if failure.reason and failure.code and failure.reason not in ("UNREACHABLE", failure.code):
            where = f" from the {failure.service}" if failure.service else ""
            lines.append(style.dim(f"  ({failure.code} {failure.reason}{where})"))
        if failure.hint:
            lines.append(_wrap(failure.hint, width, "  "))
        self.stderr.write("\n".join(lines) + "\n")
        self.stderr.flush()
        return int(failure.exit_code)


def _isatty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty is not None and isatty())


def main() -> None:
    """The console script."""
    app = App()
    try:
        code = asyncio.run(app.run(sys.argv[1:]))
    except KeyboardInterrupt:
        message = "\ninterrupted."
        if app.operation_id:
            message += (
                f" Operation {app.operation_id} may be under way: run the same command with "
                f"--operation-id {app.operation_id} to complete it, or see "
                "`tessera operations --unfinished`."
            )
        sys.stderr.write(message + "\n")
        code = int(ExitCode.INTERRUPTED)
    except BrokenPipeError:
        # The reader went away (e.g. `| head`); say nothing more.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = 0
    sys.exit(code)
